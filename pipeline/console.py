"""What the pipeline's commands print: their own lines, not TensorFlow's.

Imported first by `pipeline.run`, `pipeline.predict` and `pipeline.monitor`: when one of them
is the program, TensorFlow is imported here with its C++ start-up lines (written before its
logging reads TF_CPP_MIN_LOG_LEVEL, and a `cuInit` error on machines without a GPU) sent to
/dev/null, unless `--verbose`. `setup` then shortens the log lines and hides TensorFlow's
Python log (retracing notes, SavedModel writing); `Progress` reports long loops: a bar on a
terminal, a line a minute in a log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import time

from absl import flags

COMMANDS = ("run", "predict", "monitor")  # this package's programs
VERBOSE_HELP = ("Show TensorFlow's own log lines (C++ start-up, retracing, SavedModel "
                "writing) and absl's full log prefix (level, time, thread, file:line).")
PROGRESS_EVERY = 60.0  # seconds between progress lines when stderr is not a terminal


def verbose_requested(argv: list[str]) -> bool:
    """Whether `argv` asks for --verbose, read before absl parses it (the last of
    --verbose, --noverbose, --verbose=true|false wins)."""
    verbose = False
    for arg in argv[1:]:
        if arg == "--":
            break
        name, equals, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-"):
            continue
        if name == "verbose":
            verbose = not equals or value.lower() in ("true", "t", "1")
        elif name == "noverbose":
            verbose = False
    return verbose


def define_flags(module_name: str | None = None, flag_values=flags.FLAGS) -> None:
    """--verbose, listed by --help as a flag of `module_name` (default: the program)."""
    if "verbose" not in flag_values:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP, flag_values=flag_values,
                          module_name=module_name or sys.argv[0])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with a bad flag as one `error:` line (exit code 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e} (--help lists the flags)")


@contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 (C++ writes to it directly) pointed at /dev/null meanwhile."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_tensorflow() -> None:
    """Imports TensorFlow without its start-up lines; TF_CPP_MIN_LOG_LEVEL=2 (unless set)
    keeps its later C++ notes and warnings out. An import error still shows: Python prints
    it after stderr is back."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _stderr_to_devnull():
        import tensorflow as tf

        # CUDA starts on the first device query: on a machine without a GPU it logs an error.
        tf.config.list_physical_devices("GPU")


def _program() -> str | None:
    """The name of this package's command being run ("run", ...), else None."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path:
        return None
    path = pathlib.Path(path).resolve()
    here = pathlib.Path(__file__).resolve().parent
    return path.stem if path.parent == here and path.stem in COMMANDS else None


class ShortFormatter(logging.Formatter):
    """"12:04:31 train: ..." ("warning: " / "error: " after the time for those levels)."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}" \
               f"{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class OwnLines(logging.Filter):
    """Passes this project's log lines and other libraries' errors: TensorFlow's and
    Keras' notes (SavedModel writing, retracing) are not the user's business."""

    def __init__(self, folders: tuple[pathlib.Path, ...]):
        super().__init__()
        self.folders = tuple(str(f) + os.sep for f in folders)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.pathname.startswith(self.folders)


def _project_folders() -> tuple[pathlib.Path, ...]:
    """The folders of the packages `pipeline`, `sdim_tf` and `bench` (beside this one)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    return tuple(root / name for name in ("pipeline", "sdim_tf", "bench"))


def setup(verbose: bool) -> None:
    """After the flags are parsed: short log lines of this project (and errors), unless
    `verbose`."""
    if verbose:
        return
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    handler.setFormatter(ShortFormatter())
    if not any(isinstance(f, OwnLines) for f in handler.filters):
        handler.addFilter(OwnLines(_project_folders()))
    # TensorFlow's own handler (added when it loaded before absl's) would print them again.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def duration(seconds: float) -> str:
    """"42 s", "9 min 41 s", "2 h 05 min"."""
    s = round(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Work done of `total` `unit`s: a bar (tqdm) when stderr is a terminal, else a log line
    every `every` seconds (a loop shorter than that prints none); nothing unless `shown`.

    `update(done, **figures)` takes the count done so far and figures to show beside it.
    """

    def __init__(self, label: str, total: int, unit: str = "step",
                 every: float = PROGRESS_EVERY, shown: bool = True, stream=None):
        self.label, self.total, self.unit = label, total, unit
        self.every = every if shown else float("inf")
        stream = stream or sys.stderr
        self.started = self.last = time.monotonic()
        self.bar = None
        if shown and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=unit, leave=False, file=stream,
                            dynamic_ncols=True)

    def update(self, done: int, **figures) -> None:
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in figures.items())
        if self.bar is not None:
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(done - self.bar.n)
            if done >= self.total:  # the last state, drawn whatever the redraw interval
                self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last < self.every or done >= self.total:
            return
        self.last = now
        from absl import logging as absl_logging

        elapsed = now - self.started
        left = elapsed * (self.total - done) / done if done else None
        absl_logging.info("%s", self.line(done, elapsed, left, text))

    def line(self, done: int, elapsed: float, left: float | None, text: str = "") -> str:
        """"train: epoch 3/50: 120/390 steps (31%), 45 s, about 1 min 41 s left  loss 12.3"."""
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        eta = f", about {duration(left)} left" if left is not None else ""
        return (f"{self.label}: {done}/{self.total} {self.unit}s{share}, {duration(elapsed)}"
                f"{eta}" + (f"  {text}" if text else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if _program() is not None and not verbose_requested(sys.argv):
    quiet_tensorflow()
