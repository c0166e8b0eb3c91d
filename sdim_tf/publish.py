"""Publishing a `serving.RejectingClassifier` as a new version of a model folder (TF Serving
layout: `<export_dir>/<model_name>/<version>/`), never a partial one.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import tempfile
from collections.abc import Callable

from sdim_tf import temporaries
from sdim_tf.serving import RejectingClassifier


def next_version(model_dir: pathlib.Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] \
        if model_dir.exists() else []
    return max(versions, default=0) + 1


# An export writes into `.export-tmp-<pid>-<host>-<random>/` (never a version: not a
# number); a kill -9 before the rename leaves it, and a later export removes it once that
# process is gone. Another host's (a shared model folder) is left alone: its pids are not ours.
TEMP_PREFIX = ".export-tmp-"


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{socket.gethostname()}-"


def _writer(name: str) -> int | None:
    """The pid of the export on this host writing into the temporary folder `name`."""
    pid, _, rest = name.removeprefix(TEMP_PREFIX).partition("-")
    host = rest.rpartition("-")[0]  # mkdtemp's random part holds no "-"
    if name.startswith(TEMP_PREFIX) and pid.isdigit() and host == socket.gethostname():
        return int(pid)
    return None


def export(module: RejectingClassifier, export_dir: str | os.PathLike, model_name: str,
           extra_assets: dict[str, bytes] | None = None,
           assets_extra: dict[str, bytes] | None = None,
           before_rename: Callable[[pathlib.Path], None] | None = None,
           fold_batch_norm: bool = True) -> pathlib.Path:
    """Saves `module` as `<export_dir>/<model_name>/<next version>/` (TF Serving layout).

    Written into a temporary folder and renamed into place, so a polling server never sees
    a partial version; an existing version is never overwritten. Temporary folders of
    killed exports are removed first. `before_rename(folder)` is called with the temporary
    folder once the SavedModel in it is complete, before the rename (a fault point for tests
    that kill an export there). The SavedModel computes on the encoder with its batch norms
    folded into the layers before them (`RejectingClassifier.folded`) unless
    `fold_batch_norm` is False.
    """
    model_dir = pathlib.Path(export_dir) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    temporaries.remove_dead(model_dir, _writer, recursive=False)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=model_dir))
    try:
        module.archive(fold_batch_norm).write_out(str(tmp), verbose=False)
        for folder, files in (("assets", extra_assets), ("assets.extra", assets_extra)):
            (tmp / folder).mkdir(exist_ok=True)
            for name, content in (files or {}).items():
                (tmp / folder / name).write_bytes(content)
        if before_rename is not None:
            before_rename(tmp)
        while True:
            final = model_dir / str(next_version(model_dir))
            try:
                os.rename(tmp, final)  # fails if another export took this version
                return final
            except OSError:
                if not final.exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def json_bytes(obj) -> bytes:
    """`obj` as an asset file's content: indented, sorted JSON."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
