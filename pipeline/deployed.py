"""An exported model as its users find it: `saved_models/<name>/<version>/` with its assets.

Shared by the tools that work on a deployed model (`pipeline.predict`, `pipeline.monitor`);
they read what the export wrote into the version folder and never the run directory, so
they work on any copy of the model.
"""

from __future__ import annotations

import json
import pathlib


class DeployedModelError(ValueError):
    """A model folder that is missing, empty or lacks what the export writes."""


def version_dir(model: str, version: int | None = None,
                marker: str = "saved_model.pb") -> pathlib.Path:
    """The version folder of `model`: a folder of numbered versions (the newest, or
    `version`) or a version folder itself. A version is a folder holding `marker` (a tool
    that reads only the assets may ask for assets/thresholds.json instead)."""
    path = pathlib.Path(model)
    if not path.is_dir():
        raise DeployedModelError(f"--model_dir={model}: no such folder")
    if (path / marker).is_file():
        if version is not None:
            raise DeployedModelError(f"--model_dir={model} is a version folder; drop --version "
                                     "or point --model_dir at the folder of versions")
        return path
    versions = sorted(int(p.name) for p in path.iterdir()
                      if p.name.isdigit() and (p / marker).is_file())
    if not versions:
        raise DeployedModelError(f"--model_dir={model}: no exported version (no <N>/{marker})")
    if version is None:
        return path / str(versions[-1])
    if version not in versions:
        raise DeployedModelError(f"--model_dir={model}: no version {version}; found "
                                 f"{', '.join(map(str, versions))}")
    return path / str(version)


def asset(path: pathlib.Path, name: str) -> dict:
    """A JSON file of the version's assets/ (model_card.json, thresholds.json)."""
    file = path / "assets" / name
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise DeployedModelError(
            f"{file}: missing; was this model exported by pipeline.run?") from None
    except json.JSONDecodeError as e:
        raise DeployedModelError(f"{file}: not valid JSON ({e})") from None
