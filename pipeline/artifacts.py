"""Run-directory helpers: atomic folder and file writes, hashes.

Every write goes to a temporary name beside its target (`.<name>.tmp-<pid>...`), then one
rename publishes it; a failed write removes its temporary, and one left by a killed process
is removed by `remove_stale_temps` (the runner calls it) and never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline import faults

BEFORE_RENAME = "artifacts.before_rename"  # the fault point of every publishing rename
# `.<name>.tmp-<pid>...` and `.<name>.old-<pid>`: the temporaries of this module
TEMP = re.compile(r"^\..+\.(tmp|old)-(\d+)(-.*|\..*)?$")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary folder beside `final`; renames it into place only on success.

    A crash or exception leaves `final` as it was (absent or the previous complete version).
    """
    final = pathlib.Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-",
                                        dir=final.parent))
    try:
        yield tmp
        faults.point(BEFORE_RENAME, final.name)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON through a temporary file and an atomic rename."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path` (ending in `suffix`, for writers that want
    one); renames it over `path` on success, removes it on failure (a full disk)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Renames the complete file `tmp` over `final` (atomic on one file system)."""
    faults.point(BEFORE_RENAME, pathlib.Path(final).name)
    os.replace(tmp, final)


def remove_stale_temps(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Removes the temporaries under `folder` whose writer is dead (a killed run's); returns
    them. Nothing reads them, but a checkpoint's or a dataset's can weigh megabytes."""
    from sdim_tf import temporaries  # here: sdim_tf imports TensorFlow, this module does not

    return temporaries.remove_dead(folder, _writer)


def _writer(name: str) -> int | None:
    match = TEMP.match(name)
    return None if match is None else int(match.group(2))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


class Parts:
    """A long stage's finished parts (`<name>.json`: a summary; `<name>.npz`: arrays), kept
    as they finish. One is reused while the model (`model_key`: the upstream manifests'
    hashes) and its own settings are unchanged, so a killed stage resumes and a changed flag
    redoes only the parts it affects."""

    def __init__(self, folder: pathlib.Path, model_key: dict):
        self.folder, self.model_key = folder, model_key
        folder.mkdir(parents=True, exist_ok=True)

    def _key(self, settings: dict) -> str:
        return config_hash({"model": self.model_key, **settings})

    def get(self, name: str, settings: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
        """(summary, arrays) of the part kept under these settings, else None."""
        path = self.folder / f"{name}.json"
        if not path.exists():
            return None
        stored = read_json(path)
        if stored.get("key") != self._key(settings):
            return None
        arrays = self.folder / f"{name}.npz"
        if not arrays.exists():
            return stored["summary"], {}
        with np.load(arrays) as loaded:
            return stored["summary"], {k: loaded[k] for k in loaded.files}

    def put(self, name: str, settings: dict, summary: dict,
            arrays: dict[str, np.ndarray] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
        """Keeps a finished part (the arrays first: its JSON vouches for them); returns it
        as `get` will."""
        if arrays:
            with atomic_file(self.folder / f"{name}.npz", suffix=".npz") as tmp:
                np.savez_compressed(tmp, **arrays)
        write_json(self.folder / f"{name}.json",
                   {"key": self._key(settings), "settings": settings, "summary": summary})
        return self.get(name, settings)

    def drop(self, name: str) -> None:
        """Removes a part (its JSON first: arrays without it are never read)."""
        for suffix in (".json", ".npz"):
            (self.folder / f"{name}{suffix}").unlink(missing_ok=True)


MANIFEST = "manifest.json"


def config_hash(fields: dict) -> str:
    """A stable hash of the config fields a stage depends on."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in ("tensorflow", "keras", "tensorflow-probability", "tensorflow-datasets",
                 "numpy", "sdim-tf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def input_hashes(stage_dirs: dict[str, pathlib.Path]) -> dict[str, str]:
    """Upstream stages' manifests, hashed: a rerun upstream invalidates this stage."""
    hashes = {}
    for name, folder in stage_dirs.items():
        manifest = pathlib.Path(folder) / MANIFEST
        hashes[name] = sha256_file(manifest) if manifest.exists() else "missing"
    return hashes


def manifest_matches(stage_dir: str | os.PathLike, digest: str, inputs: dict) -> bool:
    """True when the stage's manifest records this config and these inputs, outputs intact
    (see `changed_outputs`)."""
    manifest = _manifest(stage_dir)
    return (manifest is not None and manifest.get("config_hash") == digest
            and manifest.get("inputs") == inputs and not changed_outputs(stage_dir))


def _manifest(stage_dir) -> dict | None:
    try:
        return read_json(pathlib.Path(stage_dir) / MANIFEST)
    except (OSError, ValueError):
        return None


def output_hashes(stage_dir: str | os.PathLike, outputs: list[str]) -> dict[str, str]:
    return {name: sha256_file(pathlib.Path(stage_dir) / name) for name in outputs}


def changed_outputs(stage_dir: str | os.PathLike) -> list[str]:
    """The outputs the stage's manifest lists that are missing or differ from the sha256 it
    recorded (a manifest without hashes, from an older version: missing ones only)."""
    manifest = _manifest(stage_dir) or {}
    recorded = manifest.get("output_hashes", {})
    changed = []
    for name in manifest.get("outputs", []):
        path = pathlib.Path(stage_dir) / name
        if not path.is_file() or (name in recorded and sha256_file(path) != recorded[name]):
            changed.append(name)
    return changed


def write_manifest(stage_dir: str | os.PathLike, *, stage: str, digest: str, config: dict,
                   inputs: dict, outputs: list[str], started: float, finished: float,
                   schema_version: int) -> None:
    import datetime

    def iso(t):
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()

    write_json(pathlib.Path(stage_dir) / MANIFEST, {
        "stage": stage, "schema_version": schema_version, "config_hash": digest,
        "config": config, "inputs": inputs,
        "outputs": outputs, "output_hashes": output_hashes(stage_dir, outputs),
        "started": iso(started), "finished": iso(finished),
        "seconds": round(finished - started, 2), "versions": package_versions()})
