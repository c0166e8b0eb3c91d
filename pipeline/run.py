"""`python -m pipeline.run --dataset=fashion_mnist`: every stage in order, skipping unchanged ones.

Each stage writes `<run_dir>/<stage>/` with a manifest (config hash, input hashes, outputs,
times, versions); a stage whose manifest matches is skipped, `--force` reruns it.
"""

from __future__ import annotations

# First: as the program, it imports TensorFlow without TensorFlow's start-up lines.
from pipeline import console

# isort: split
import contextlib
import dataclasses
import errno
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator

import tensorflow as tf
from absl import app, flags, logging

from pipeline import artifacts, sections, summary
from pipeline import config as configs
from pipeline import run_dir as run_dirs
from pipeline.config import ConfigError, PipelineConfig
from pipeline.stages import attack, calibrate, evaluate, explain, export, ingest, train
from sdim_tf import data


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    config: tuple[str, ...]  # the PipelineConfig sections it receives; a change reruns it
    needs: tuple[str, ...]  # upstream stages whose outputs it reads
    # (its sections, its own folder, {input name: typed view, pipeline.run_dir}) -> outputs
    run: Callable[[object, pathlib.Path, dict], list[str]]
    default: bool = True  # part of a run without --stages
    # Rerun when an output changed since the stage wrote it; else (train: hours of work) a
    # one-line error naming the file.
    rerun_on_change: bool = True
    uses: tuple[str, ...] = ()  # upstream stages it reads when they have run
    # config -> {input name: view} of other runs' stages it reads; their reruns rerun it too
    external: Callable[[PipelineConfig], dict] | None = None


def _discriminative(config: PipelineConfig) -> dict:
    """An SDIM run's evaluation reports the discriminative run beside it, when evaluated."""
    if config.model.model != "sdim":
        return {}
    other = pathlib.Path(config.run_dir).parent / f"{config.data.dataset}-discriminative"
    return run_dirs.Run(other).views(("evaluate",), "discriminative")


def _attack_inputs(config: PipelineConfig) -> dict:
    """The attack stage's other runs: --attack_baseline's stages, and those of
    --attack_transfer_from when it names a run directory rather than a SavedModel."""
    settings, views = config.attack, {}
    if settings.attack_baseline:
        views |= run_dirs.Run(settings.attack_baseline).views(attack.BASELINE_STAGES,
                                                              attack.BASELINE)
    source = settings.attack_transfer_from
    if source and attack.transfer_saved_model(source) is None:
        views |= run_dirs.Run(source).views(attack.BASELINE_STAGES, attack.TRANSFER)
    return views


STAGES = (
    Stage("ingest", ("data",), (), ingest.run),
    Stage("train", ("model", "train"), ("ingest",), train.run, rerun_on_change=False),
    Stage("calibrate", ("calibrate",), ("ingest", "train"), calibrate.run),
    Stage("evaluate", ("data", "evaluate"), ("ingest", "train", "calibrate"), evaluate.run,
          external=_discriminative),
    Stage("explain", ("data",), ("ingest", "train", "calibrate"), explain.run),
    Stage("export", ("export",), ("ingest", "train", "calibrate", "evaluate"), export.run),
    Stage("attack", ("attack",), ("ingest", "train", "calibrate"), attack.run, default=False,
          uses=("export",), external=_attack_inputs),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


class StorageError(RuntimeError):
    """A stage could not write its outputs: the disk is full or a file size limit was hit."""


USER_ERRORS = (ConfigError, data.DataError, train.TrainingError, run_dirs.ArtifactError,
               StorageError)
# ENOSPC, EFBIG (a file size limit), EDQUOT. TensorFlow's C++ writers report them as an
# OpError (ResourceExhausted, OutOfRange) whose message carries the C library's text.
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextlib.contextmanager
def _storage_errors(writer: str) -> Iterator[None]:
    """Turns a full disk or a file size limit met by `writer` into a StorageError."""
    try:
        yield
    except Exception as e:
        problem = _storage_problem(e)
        if problem is None:
            raise
        # Every write goes through a temporary, so nothing is half-written: without its
        # manifest the stage reruns; earlier checkpoints and SavedModel versions stay valid.
        raise StorageError(f"{writer}: a write failed ({problem}): the disk is full or a file "
                           "size limit was reached; nothing was half-written, free space and "
                           "rerun the same command") from None


def _storage_problem(error: BaseException | None) -> str | None:
    """What ran out ("No space left on device: <file>"), when `error` or an exception it
    came from is a full disk or a file size limit; else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL:
            return os.strerror(error.errno) + (f": {error.filename}" if error.filename else "")
        if isinstance(error, tf.errors.OpError):
            for code in _FULL:
                text = os.strerror(code)
                if text in error.message:  # "<file>; File too large [Op:SaveV2]"
                    path = error.message.partition(f"; {text}")[0].rpartition("}} ")[2]
                    return f"{text}: {path}" if path != error.message else text
        error = error.__cause__ or error.__context__
    return None


def _check_writable(run_dir: pathlib.Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--run_dir {run_dir} is not writable ({e.strerror or e})") from None


def command(config: PipelineConfig) -> str:
    """The command line of `config`: its dataset and the flags that differ from the
    defaults."""
    default = PipelineConfig().flat()

    def text(v):
        if isinstance(v, tuple):
            return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        return v

    flags_used = [f"--{name}={text(v)}" for name, v in config.flat().items()
                  if v != default[name] and name not in ("dataset", "run_dir", "force")]
    return " ".join(["python -m pipeline.run", f"--dataset={config.data.dataset}",
                     *flags_used, f"--run_dir={config.run_dir}"])


def _write_run_readme(run_dir: pathlib.Path, config: PipelineConfig, given: PipelineConfig
                      ) -> None:
    """README.md: the headline figures, the command (`given`: the flags as passed), each
    stage's reports and outputs."""
    figures = summary.headline(run_dir)
    lines = [f"# Run: {config.data.dataset} ({config.model.model})", ""]
    if figures:
        lines += summary.markdown(figures) + [""]
    lines += [f"Command: `{command(given.replace(run_dir=str(run_dir)))}`", "",
              "| stage | report | finished | outputs |", "|---|---|---|---|"]
    for stage in STAGES:
        manifest = run_dir / stage.name / artifacts.MANIFEST
        if not manifest.exists():
            continue
        m = artifacts.read_json(manifest)
        links = ", ".join(f"[{o}]({stage.name}/{o})" for o in m["outputs"][:8])
        reports = ", ".join(f"[{o}]({stage.name}/{o})" for o in m["outputs"] if o.endswith(".md"))
        lines.append(f"| [{stage.name}]({stage.name}/) | {reports or '—'} | {m['finished']} | "
                     f"{links} |")
    artifacts.write_text(run_dir / "README.md", "\n".join(lines) + "\n")


def stage_settings(stage: Stage, config: PipelineConfig) -> dict:
    """{flag: value} of the sections `stage` reads, what its cache key hashes."""
    return {k: v for name in stage.config
            for k, v in getattr(config, name).flat(keyed_only=True).items()}


def _inputs(stage: Stage, store: run_dirs.Run, config: PipelineConfig) -> dict:
    """{input name: view} of what `stage` reads, upstream stages checked."""
    upstream = {name: store.artifact(name) for name in stage.needs}
    upstream.update({name: view for name in stage.uses
                     if (view := store.artifact(name)).exists()})
    missing = [name for name, view in upstream.items() if not view.exists()]
    if missing:
        one = len(missing) == 1
        raise ConfigError(f"stage {stage.name} needs the outputs of {', '.join(missing)} in "
                          f"{upstream[missing[0]].folder if one else store.root}; run "
                          f"{'it' if one else 'them'} first "
                          f"(--stages={','.join([*missing, stage.name])})")
    for name, view in upstream.items():
        view.check_schema()
        changed = artifacts.changed_outputs(view.folder)
        if changed:
            raise run_dirs.ArtifactError(
                f"{view.folder / changed[0]} changed since {name} wrote it (sha256 differs "
                f"from its manifest); rerun {name} with --force --stages={name}")
    return upstream | (stage.external(config) if stage.external else {})


def run(config: PipelineConfig) -> pathlib.Path:
    """Runs the selected stages of `config`; returns the run directory."""
    given, config = config, config.resolve(STAGE_NAMES)
    run_dir = pathlib.Path(config.run_dir)
    _check_writable(run_dir)
    selected = [s for s in STAGES
                if (s.name in config.stages if config.stages else s.default)]
    logging.info("run: %s (%s) in %s; stages %s", config.data.dataset, config.model.model,
                 run_dir, ", ".join(s.name for s in selected))
    for stale in artifacts.remove_stale_temps(run_dir):
        logging.info("removed %s, left by a process that died while writing it", stale)
    store = run_dirs.Run(run_dir)
    if not config.force and (problem := store.schema_problem()):
        raise run_dirs.ArtifactError(problem)
    for stage in selected:
        stage_dir = run_dir / stage.name
        upstream = _inputs(stage, store, config)
        settings = stage_settings(stage, config)
        digest = artifacts.config_hash({"stage": stage.name, **settings})
        # an optional stage that has not run hashes as missing: running it reruns this one
        inputs = artifacts.input_hashes(
            {name: store.artifact(name).folder for name in (*stage.needs, *stage.uses)}
            | {name: view.folder for name, view in upstream.items()})
        changed = artifacts.changed_outputs(stage_dir)
        if changed and not (config.force or stage.rerun_on_change):
            raise run_dirs.ArtifactError(
                f"{stage_dir / changed[0]} changed since {stage.name} wrote it (sha256 differs "
                f"from its manifest); restore it or rerun with --force")
        if not config.force and artifacts.manifest_matches(stage_dir, digest, inputs):
            logging.info("%s: unchanged since its last run, skipped (--force reruns it)",
                         stage.name)
            continue
        if changed:
            logging.warning("%s: %s changed since it was written; rerunning the stage",
                            stage.name, ", ".join(changed))
        logging.info("%s: running", stage.name)
        (stage_dir / artifacts.MANIFEST).unlink(missing_ok=True)
        started = time.time()
        with _storage_errors(f"stage {stage.name}"):
            stage_dir.mkdir(parents=True, exist_ok=True)
            outputs = stage.run(config.view(stage.config), stage_dir, upstream)
            artifacts.write_manifest(stage_dir, stage=stage.name, digest=digest,
                                     config=settings, inputs=inputs, outputs=outputs,
                                     started=started, finished=time.time(),
                                     schema_version=run_dirs.SCHEMA_VERSION)
        logging.info("%s: done in %.1f s", stage.name, time.time() - started)
    with _storage_errors(f"{run_dir / 'README.md'}"):
        _write_run_readme(run_dir, config, given)
    return run_dir


FLAGS = flags.FLAGS
# --help lists these groups in this order; the attack stage's flags, defined by another module
# (absl's --help shows the main module's), only --helpfull.
HELP_GROUPS = {"data": "Data", "model": "Model", "train": "Training", "calibrate": "Rejection",
               "evaluate": "Evaluation", "export": "Export", "run": "Run"}
_MAIN_MODULE = sys.argv[0] if __name__ == "__main__" else __name__


def define_flags(flag_values=flags.FLAGS) -> None:
    """pipeline.run's flags: the config's fields and --verbose."""
    sections.define_flags(PipelineConfig, tuple(HELP_GROUPS), module_name=_MAIN_MODULE,
                          flag_values=flag_values)
    configs.define_attack_flags(flag_values)
    console.define_flags(module_name=_MAIN_MODULE, flag_values=flag_values)


define_flags()


def help_text() -> str:
    verbose = flags.text_wrap(f"--[no]verbose: {console.VERBOSE_HELP} (default: 'false')",
                              indent="      ", firstline_indent="  ")
    return (__doc__.strip() + "\n\nMost runs set only --dataset, --data_dir, --epochs, "
            "--run_dir and --export_dir.\n" + sections.help_text(PipelineConfig, HELP_GROUPS) + "\n"
            + verbose + "\n\nThe attack stage's flags (--attack*): --helpfull.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing; --help lists the flags by group, in the order a run uses them; a bad
    flag is one `error:` line."""
    if any(a in ("--help", "-help", "--helpshort", "-helpshort", "-?") for a in argv[1:]):
        print(help_text())
        sys.exit(0)
    return console.parse_flags(argv)


def config_from_flags() -> PipelineConfig:
    return PipelineConfig.from_flat(**{leaf.name: FLAGS[leaf.name].value
                                       for leaf in sections.leaves(PipelineConfig)})


def closing(run_dir: pathlib.Path, seconds: float) -> str:
    """The lines a finished run ends with: where its report is, then its headline figures."""
    figures = summary.headline(run_dir)
    return (f"Run finished in {console.duration(seconds)}; its report: {run_dir / 'README.md'}"
            + ("\n" + summary.text(figures) if figures else ""))


def main(argv):
    console.setup(FLAGS.verbose)
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]} (flags are --name=value)")
    started = time.time()
    try:
        run_dir = run(config_from_flags())
        print(closing(run_dir, time.time() - started))
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: rerun the same command to resume")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
