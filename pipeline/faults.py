"""Deterministic crashes for tests: SDIM_FAULT=<point>:<k> kills the process with SIGKILL
the k-th time it reaches `faults.point(<point>)`, so a kill lands at a chosen place
whatever the machine's speed.

The points (tests/test_faults.py kills a run at each kind and reruns it):

- `train.step`: after each training step (k counts the steps of this process, across
  epochs: with 4 steps per epoch, `train.step:6` lands in the middle of the second epoch).
- `train.epoch_done`: after an epoch is committed (its state.json written, its checkpoints
  in place).
- `artifacts.before_rename`: every atomic write of `pipeline.artifacts` (JSON, text, the
  train stage's checkpoints, density.npz, ingest's folder), after the temporary file or
  folder is complete and before the rename that publishes it. `artifacts.before_rename/<name>`
  counts the writes of one name only: `manifest.json`, `state.json`, `history.csv`,
  `thresholds.json`, `density.npz`, `report.json`, `export.json`, `ingest` (ingest's folder);
  a checkpoint is written as `last.keras.next` (and `best.keras.next`), committed by
  state.json, then renamed to `last.keras` (`best.keras`).
- `evaluate.part_done`: after each finished part of evaluate is kept in evaluate/parts/
  (in order `test`, `ood_<set>` per OOD set, then with the shift suite `shift_clean` and
  `shift_<corruption>`); `evaluate.part_done/<part>` counts one part only.
- `attack.epsilon_done`: after each epsilon of an adaptive PGD curve is kept in
  attack/parts/ (`attack.epsilon_done/<curve>`, e.g. `pgd_accepted_linf_sdim`;
  tests/test_attack_stage.py stops a curve there).
- `serving.before_rename`: in `sdim_tf.publish.export`, the SavedModel complete in its
  temporary folder, before the rename that publishes the version (the export stage passes
  this point as its `before_rename`).
"""

from __future__ import annotations

import collections
import os
import signal

ENV = "SDIM_FAULT"
_reached: collections.Counter = collections.Counter()


def point(name: str, detail: str | None = None) -> None:
    """A place where a test may kill the process (no effect unless SDIM_FAULT names it):
    SDIM_FAULT may name `name`, or `name/detail` to count only the visits with that detail."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, k = spec.rpartition(":")
    if target != name and (detail is None or target != f"{name}/{detail}"):
        return
    _reached[target] += 1
    if _reached[target] == int(k):
        os.kill(os.getpid(), signal.SIGKILL)
