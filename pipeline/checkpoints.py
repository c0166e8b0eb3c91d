"""The train stage's commit-and-resume protocol: checkpoints committed by state.json.

Two checkpoints: `checkpoints/best.keras` (least training loss, what later stages use) and
`checkpoints/last.keras` (with optimizer state, for resuming). An epoch's checkpoints are
written beside the live ones (`<name>.next`), committed with their sha256 by state.json, then
renamed into place, so a kill anywhere leaves one committed epoch whole, and a resumed run
never trains on, nor later stages use, bytes nobody wrote.
"""

from __future__ import annotations

import csv
import io
import pathlib
import shutil
from collections.abc import Callable

import keras
from absl import logging

from pipeline import artifacts
from pipeline.config import TrainConfig
from pipeline.run_dir import SCHEMA_VERSION, ArtifactError, TrainedModel, load_checkpoint

BEST, LAST, STATE, HISTORY = (TrainedModel.BEST, TrainedModel.LAST, TrainedModel.STATE,
                              TrainedModel.HISTORY)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, corrupt checkpoint); the message says why."""


def _next(path: pathlib.Path) -> pathlib.Path:
    """Where an epoch's checkpoint waits, complete, until state.json commits the epoch."""
    return path.with_name(path.name + ".next")


def stage(model: keras.Model, folder: pathlib.Path, best: bool, committed: dict) -> dict:
    """Writes this epoch's checkpoints beside the live ones (`<name>.next`); returns the
    sha256 of each checkpoint as it will be once `settle` puts them in place. `committed`:
    the digests state.json holds (an unchanged best keeps its own)."""
    with artifacts.atomic_file(_next(folder / LAST), suffix=".keras") as tmp:
        model.save(tmp)
    last = artifacts.sha256_file(_next(folder / LAST))
    if best:
        with artifacts.atomic_file(_next(folder / BEST)) as tmp:
            shutil.copyfile(_next(folder / LAST), tmp)
        return {LAST: last, BEST: last}
    return {LAST: last, BEST: committed.get(BEST) or artifacts.sha256_file(folder / BEST)}


def settle(folder: pathlib.Path, recorded: dict) -> None:
    """Puts in place the checkpoints state.json committed (`recorded`: name -> sha256).

    A `.next` checkpoint it records is renamed into place (a kill came between the commit
    and the rename); one it does not record is dropped (the kill came before the commit).
    A checkpoint that then differs is an error naming it.
    """
    for name, digest in recorded.items():
        final, pending = folder / name, _next(folder / name)
        if pending.exists():
            if artifacts.sha256_file(pending) == digest:
                artifacts.publish(pending, final)
            else:
                pending.unlink()
        if not final.is_file() or artifacts.sha256_file(final) != digest:
            raise TrainingError(f"checkpoint {final} changed since train wrote it (sha256 "
                                f"differs from {folder / STATE}); restore it or rerun with "
                                "--force")


def commit(trained: TrainedModel, state: dict) -> None:
    """Writes history.csv, then state.json, which commits the staged checkpoints by their
    sha256; then puts them in place."""
    rows = state["history"]
    out = io.StringIO()
    writer = csv.DictWriter(out, list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    artifacts.write_text(trained.folder / HISTORY, out.getvalue())
    trained.write_state(state)
    settle(trained.folder, state["checkpoints"])


def load_last(trained: TrainedModel, state: dict) -> keras.Model:
    """The committed last checkpoint, settled first (a kill may have left it pending)."""
    settle(trained.folder, state.get("checkpoints", {}))
    try:
        return load_checkpoint(trained.last_path)
    except ArtifactError as e:
        raise TrainingError(str(e)) from None


def clear(folder: pathlib.Path) -> None:
    """Starts afresh: no checkpoint, log, state or history is left."""
    for name in ("checkpoints", "logs"):
        shutil.rmtree(folder / name, ignore_errors=True)
    for name in (STATE, HISTORY):
        (folder / name).unlink(missing_ok=True)


def resume_state(trained: TrainedModel, training: TrainConfig,
                 resume_hash: Callable[..., str]) -> dict | None:
    """The state to resume from, or None to start afresh. `resume_hash(**changes)`: the
    hash of the configuration with `changes` (TrainConfig fields). Where starting afresh
    would delete a model the same flags could not have made, says so instead."""
    path = trained.folder / STATE
    if training.fresh or not path.exists():
        return None
    try:
        state = trained.state()
    except ArtifactError:
        raise TrainingError(f"{path} is corrupt; rerun with --force") from None
    if state.get("schema_version", 1) != SCHEMA_VERSION:
        raise TrainingError(f"{path} was written under run-directory schema "
                            f"{state.get('schema_version', 1)}, this code reads {SCHEMA_VERSION}: "
                            "rerun with --force to start afresh, or pass a new --run_dir")
    if state.get("resume_hash") == resume_hash():
        if state["epoch"] <= training.epochs:
            return state
        logging.info("train: %d epochs done, %d asked: starting afresh", state["epoch"],
                     training.epochs)
        return None
    for planned in {state.get("epochs"), state.get("epoch")} - {None, training.epochs}:
        if state.get("resume_hash") == resume_hash(epochs=planned):
            raise TrainingError(
                f"{trained.folder} holds {state['epoch']} of {planned} epochs trained with "
                f"--lr_schedule={training.lr_schedule}, whose learning rate decays over the "
                f"run's planned length, so --epochs={training.epochs} cannot continue it: "
                f"rerun with --epochs={planned} to resume it, --force to start afresh, or "
                f"train into another --run_dir (--lr_schedule=constant runs can be extended)")
    if training.lr_schedule != "constant" and state.get("resume_hash") == resume_hash(
            lr_schedule="constant"):
        raise TrainingError(
            f"{trained.folder} holds {state['epoch']} epoch(s) trained with "
            f"--lr_schedule=constant: rerun with --lr_schedule=constant to resume or use it, "
            f"--force to start afresh, or train into another --run_dir")
    logging.info("train: configuration changed, starting afresh")
    return None
