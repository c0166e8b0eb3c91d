"""Where a dataset comes from: --data_dir, then SDIM_DATA_DIR, then tensorflow-datasets.

A folder (`data_dir` or the environment variable) holds `<name>/` with the MNIST-format IDX
files or image folders; `image_folder` is your own folder itself. A folder named explicitly
that lacks the data, or an environment variable naming no folder, is an error, never a
silent fallback.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Optional

import numpy as np

from sdim_tf.data import examplegen, folders
from sdim_tf.data.idx import IDX_NAMES, idx_files, load_idx_split
from sdim_tf.data.images import ImagePolicy
from sdim_tf.data.registry import DATA_DIR_ENV, SPLITS, DataError, DatasetSpec, get_spec
from sdim_tf.data.tfds_source import folder_layout, load_tfds


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a dataset's files are: IDX files or image folders under `root`, or tfds."""

    kind: str  # "idx", "image_folder" or "tfds"
    spec: DatasetSpec
    root: Optional[pathlib.Path] = None

    def describe(self) -> str:
        """"idx:<folder>", "image_folder:<folder>" or "tfds:<name>"."""
        return f"tfds:{self.spec.tfds_name}" if self.kind == "tfds" else \
            f"{self.kind}:{self.root}"


def _has_folders(root: pathlib.Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())


def _dataset_root(spec: DatasetSpec, folder: pathlib.Path) -> Optional[Source]:
    root = folder / spec.name
    if root.is_dir():
        if any(idx_files(root, split) is not None for split in SPLITS):
            return Source("idx", spec, root)
        if _has_folders(root):
            return Source("image_folder", spec, root)
    return None


def find_source(name: str, data_dir: Optional[str | os.PathLike] = None,
                manifest: Optional[str] = None) -> Source:
    """The source of dataset `name` (see the module docstring); `manifest` lets
    `image_folder` go without a folder."""
    spec = get_spec(name)
    if data_dir is not None and not pathlib.Path(data_dir).is_dir():
        raise DataError(f"{folders.flag('data_dir')} {data_dir}: no such folder")
    if spec.name == "image_folder":
        if data_dir is None and not manifest:
            raise DataError(f"dataset 'image_folder' reads your own folder: pass "
                            f"{folders.flag('data_dir')}=DIR; "
                            f"{folders.layout_hint(pathlib.Path('DIR'))}")
        return Source("image_folder", spec, pathlib.Path(data_dir) if data_dir else None)
    if data_dir is not None:
        root = _dataset_root(spec, pathlib.Path(data_dir))
        if root is None:  # the user pointed at this folder: do not fall back silently
            raise DataError(f"{folders.flag('data_dir')} {data_dir}: no data for {name!r} "
                            f"(expected {folder_layout(spec)} with FOLDER={data_dir})")
        return root
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        if not pathlib.Path(env).is_dir():
            raise DataError(f"{DATA_DIR_ENV}={env}: no such folder; unset it or point it at "
                            f"a folder FOLDER holding {folder_layout(spec)}")
        # Absolute, so the recorded source names the folder whatever the reader's cwd.
        root = _dataset_root(spec, pathlib.Path(env).resolve())
        if root is not None:
            return root
    if spec.tfds_name is None:
        raise DataError(f"dataset {name!r} has no download; pass "
                        f"{folders.flag('data_dir')}")
    return Source("tfds", spec)


def policy_for(spec: DatasetSpec, listing: folders.Listing,
               options: folders.FolderOptions) -> ImagePolicy:
    """The image policy of a folder: a registered dataset's own size and channels, else the
    options' (channels by majority of the headers when unset)."""
    channels = spec.channels or options.channels or folders.majority_channels(listing)
    height, width = spec.source_size or (options.image_size, options.image_size)
    return ImagePolicy(height, width, channels, options.resize)


def list_folder(source: Source, options: folders.FolderOptions) -> folders.Listing:
    names = list(source.spec.class_names) if source.spec.class_names else None
    return folders.list_images(source.root, options, names)


@dataclasses.dataclass
class Split:
    """One split of a dataset as arrays, with where it came from."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    source: str  # "idx:<folder>", "image_folder:<folder>" or "tfds:<name>"
    files: list[pathlib.Path]
    class_names: Optional[list[str]] = None


def load_split_with_source(name: str, split: str, data_dir: Optional[str] = None,
                           allow_download: bool = True,
                           options: Optional[folders.FolderOptions] = None) -> Split:
    """Like `load_split`, also saying where the data came from.

    `allow_download=False` never lets tfds reach the network (optional data, e.g. OOD sets).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    options = options or folders.FolderOptions()
    source = find_source(name, data_dir, options.manifest)
    if source.kind == "idx":
        loaded = load_idx_split(source.root, split)
        if loaded is None:
            raise DataError(f"{source.root}: no {split} data (expected "
                            f"{IDX_NAMES[split][0]}.gz and {IDX_NAMES[split][1]}.gz)")
        images, labels, files = loaded
        return Split(images, labels, source.describe(), files)
    if source.kind == "image_folder":
        listing = list_folder(source, options)
        policy = policy_for(source.spec, listing, options)
        items = listing.items[split]
        images = np.zeros([len(items), *policy.shape], np.uint8)
        kept = []
        for item, outcome in examplegen.encoded_items(items, policy):
            if outcome.reason:
                if options.on_bad_file == "fail":
                    raise folders.bad_file(item.path, outcome.reason)
                continue
            images[len(kept)] = outcome.image
            kept.append(item)
        return Split(images[:len(kept)], np.asarray([i.label for i in kept], np.int64),
                     f"image_folder:{listing.folder}", [pathlib.Path(i.path) for i in kept],
                     listing.class_names)
    images, labels = load_tfds(source.spec, split, allow_download)
    return Split(images, labels, source.describe(), [])


def load_split(name: str, split: str, data_dir: Optional[str] = None,
               allow_download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(images uint8 [N,H,W,C], labels int64 [N])` of a dataset split.

    Sources, in order: `data_dir`, the SDIM_DATA_DIR environment variable (each a folder
    holding `<name>/train-images-idx3-ubyte.gz` etc.), then tfds (prepared data first, a
    download only when missing and its server answers). An explicit `data_dir` that lacks
    the data is an error.
    """
    loaded = load_split_with_source(name, split, data_dir, allow_download)
    return loaded.images, loaded.labels
