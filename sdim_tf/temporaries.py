"""Temporaries a killed writer left behind: a writer names each after its process id, and
once that process is gone nothing finishes or reads it, so it is removed."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import BinaryIO


def running(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's included)."""
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except OSError as e:
        return e.errno != errno.ESRCH  # EPERM: another user's, alive
    return True


def remove_dead(folder: str | os.PathLike, writer: Callable[[str], int | None],
                recursive: bool = True) -> list[pathlib.Path]:
    """Removes the files and folders in `folder` (`recursive`: and in its subfolders) whose
    writer is dead; returns them. `writer(name)`: the pid of the process on this host that
    writes the entry `name`, None for an entry that is no such temporary."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            pid = writer(name)
            if pid is None or running(pid):
                continue
            path = pathlib.Path(root) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        if not recursive:
            break
    return removed


def replace_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object],
                       suffix: str = "") -> None:
    """`write` fills a temporary beside `path` (`.<name>.tmp-<pid><suffix>`), which one rename
    then puts over `path`: a reader sees the old file or the complete new one; a failed write
    removes its temporary."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
