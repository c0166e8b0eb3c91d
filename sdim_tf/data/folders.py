"""Your own images: what is in a folder (or a manifest), which files are skipped and why,
and the train/test split.

Layouts, in the order they are tried:

- a manifest (`manifest=`): CSV with a header `path,label[,split]` or JSON lines
  `{"path": ..., "label": ...[, "split": ...]}`; paths relative to the manifest's folder;
- `DIR/train/<class>/...` and, optionally, `DIR/test/<class>/...`;
- `DIR/<class>/...`.

Without a test split (no test/ folder, no `split` column), `test_split` of each class's
images are drawn for it, seeded per class. Files in class folders are found recursively.
Every file must lie under the dataset's folder (DIR, or the manifest's folder) once its
symlinks are followed.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import pathlib
import stat
import zlib
from collections import Counter
from typing import Optional

import numpy as np

from sdim_tf.data.images import RESIZE, sniff
from sdim_tf.data.registry import SPLITS, DataError
from sdim_tf.settings import setting

ON_BAD_FILE = ("skip", "fail")
DRIVERS = ("local", "beam")
MIN_PER_CLASS = 2  # images of each class in each split
MAX_FILE_BYTES = 1 << 28  # a larger file is skipped before it is read
SKIPPED_HEADER = ("split", "path", "reason")


def flag(name: str) -> str:
    """How an option is spelled on the command line, for error messages."""
    return f"--{name}"


@dataclasses.dataclass(frozen=True)
class FolderOptions:
    """How a folder of your own images becomes examples (dataset `image_folder`). A bad value
    is a DataError "<field> must ...", raised when the options are made."""

    image_size: int = setting(
        32, "Side of the square the images are brought to (the model's input is 32x32).")
    channels: Optional[int] = setting(
        None, "1 (grey) or 3 (colour); default: what most images of the folder hold.")
    resize: str = setting(
        "stretch", "stretch: to the square whatever the aspect ratio (as the exported model "
        "resizes); pad: fit the longer side, black bands; crop: the centred square, then "
        "resize.", RESIZE)
    test_split: float = setting(
        0.2, "Without a test/ folder (or a split column): the share of each class's images "
        "held out as the test split.")
    split_seed: int = setting(0, "Seed of that per-class draw.")
    manifest: Optional[str] = setting(
        None, "CSV (path,label[,split]) or JSON lines listing the images instead of class "
        "folders; paths relative to the manifest's folder.")
    on_bad_file: str = setting(
        "skip", "skip: list undecodable, unreadable, empty, hidden and outside-pointing "
        "files in ingest/skipped.csv and go on; fail: stop at the first one.", ON_BAD_FILE)
    max_source_side: int = setting(
        4096, "Images whose header declares a longer side are skipped, never decoded (the "
        "exported model refuses them too, see --max_image_side).")
    ingest_driver: str = setting(
        "local", "local: decode in parallel in this process; beam: an Apache Beam pipeline "
        "(pip install sdim-tf[beam]).", DRIVERS)
    beam_pipeline_args: tuple[str, ...] = setting(
        (), "Options of the Beam pipeline (--runner=..., --direct_num_workers=...); "
        "default the in-process DirectRunner.")

    def __post_init__(self):
        problems = [f"{name} must be one of {', '.join(field.metadata['choices'])}, got "
                    f"{getattr(self, name)!r}" for name, field in self.__dataclass_fields__.items()
                    if field.metadata["choices"] and getattr(self, name) not in
                    field.metadata["choices"]]
        if self.channels not in (None, 1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        if not 0 <= self.test_split < 1:
            problems.append(f"test_split must be in [0, 1), got {self.test_split}")
        problems += [f"{name} must be >= 1, got {getattr(self, name)}"
                     for name in ("image_size", "max_source_side") if getattr(self, name) < 1]
        if problems:
            raise DataError("; ".join(problems))


@dataclasses.dataclass(frozen=True, slots=True)  # one per file: slots halve its memory
class Item:
    """One image file to ingest."""

    path: str
    label: int


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file left out, and why (`code: detail`)."""

    split: str
    path: str
    reason: str

    def row(self) -> tuple[str, str, str]:
        return self.split, self.path, self.reason


@dataclasses.dataclass
class Listing:
    """What a folder holds: the files of each split, the class names, what was skipped."""

    folder: pathlib.Path  # DIR, or the manifest's folder: every file lies under it
    layout: str  # "manifest", "train_test_folders" or "class_folders"
    class_names: list[str]
    items: dict[str, list[Item]]
    skipped: list[Skipped]
    test_source: str  # how the test split was made
    # files whose header declares grey ("1") or colour ("3") images, of those kept
    channel_votes: dict[str, int] = dataclasses.field(default_factory=dict)
    where: str = ""  # the folder or manifest, for messages

    def counts(self, split: str) -> list[int]:
        counts = np.bincount([i.label for i in self.items[split]],
                             minlength=len(self.class_names))
        return counts.astype(int).tolist()


def bad_file(path: str, reason: str) -> DataError:
    """The on_bad_file=fail refusal of one file."""
    return DataError(f"{path}: {reason}; remove or fix it, or pass "
                     f"{flag('on_bad_file')}=skip to list it in ingest/skipped.csv and go on")


def layout_hint(root: pathlib.Path) -> str:
    return (f"expected {root}/train/<class>/*.png (test/<class>/ optional), "
            f"{root}/<class>/*.png, or {flag('manifest')}=FILE.csv with columns path,label")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_file(path: str, root_real: str, real_dir=os.path.realpath, walked: bool = False
               ) -> str:
    """Why `path` cannot be an example before it is read ("" when it may): missing,
    symlink_outside, broken_symlink, outside, not_a_file, empty, too_large. `real_dir`:
    os.path.realpath of a folder (a cache of it: resolving every file is slow); `walked`:
    found by walking the root without following symlinks, so under it unless a symlink."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "missing: no such file"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if stat.S_ISLNK(info.st_mode):
        real = os.path.realpath(path)
        if not _inside(real, root_real):
            return f"symlink_outside: points to {real}, outside {root_real}"
        try:
            info = os.stat(path)
        except OSError:
            return f"broken_symlink: points to {real}, which does not exist"
    elif not walked:
        real = os.path.join(real_dir(os.path.dirname(path)), os.path.basename(path))
        if not _inside(real, root_real):
            return f"outside: {real} is not under {root_real}"
    if not stat.S_ISREG(info.st_mode):
        return "not_a_file: neither a regular file nor a symlink to one"
    if info.st_size == 0:
        return "empty: 0 bytes"
    if info.st_size > MAX_FILE_BYTES:
        return f"too_large: {info.st_size} bytes, over {MAX_FILE_BYTES}"
    return ""


def _visible_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class _Collector:
    """Accumulates the files of class folders, and the entries it skips."""

    def __init__(self, root: pathlib.Path, options: FolderOptions):
        self.root_real = os.path.realpath(root)
        self.on_bad_file, self.max_side = options.on_bad_file, options.max_source_side
        self.skipped: list[Skipped] = []
        self.votes: Counter = Counter()  # files per channel count their headers declare
        self.real_dir = functools.lru_cache(maxsize=4096)(os.path.realpath)

    def skip(self, split: str, path: str, reason: str) -> None:
        if self.on_bad_file == "fail":
            raise bad_file(path, reason)
        self.skipped.append(Skipped(split, path, reason))

    def accept(self, split: str, path: str, walked: bool = False) -> bool:
        """Whether `path` may be decoded: a file under the root whose header (when it is an
        image the header reader knows) declares what the decoder reads, within max_side."""
        reason = check_file(path, self.root_real, self.real_dir, walked)
        if not reason:
            header = sniff(path)
            if header is not None:
                reason = header.problem(self.max_side)
                if not reason:
                    self.votes[1 if header.channels == 1 else 3] += 1
        if reason:
            self.skip(split, path, reason)
        return not reason

    def class_files(self, split: str, folder: pathlib.Path) -> list[str]:
        """The acceptable files under a class folder, recursively, sorted."""
        if folder.is_symlink() and not _inside(os.path.realpath(folder), self.root_real):
            self.skip(split, str(folder), f"symlink_outside: folder points to "
                      f"{os.path.realpath(folder)}, outside {self.root_real}")
            return []
        found = []
        for parent, dirs, files in os.walk(folder):
            for name in sorted(dirs):
                path = os.path.join(parent, name)
                if name.startswith("."):
                    self.skip(split, path, "hidden: a folder whose name starts with '.'")
                elif os.path.islink(path):
                    self.skip(split, path, "symlink_folder: symlinked folders inside a "
                              "class folder are not followed")
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and not os.path.islink(os.path.join(parent, d)))
            for name in sorted(files):
                path = os.path.join(parent, name)
                if name.startswith("."):
                    self.skip(split, path, "hidden: a file whose name starts with '.'")
                elif self.accept(split, path, walked=True):
                    found.append(path)
        return found

    def channel_votes(self) -> dict[str, int]:
        return {"1": self.votes[1], "3": self.votes[3]}

    def stray_files(self, split: str, folder: pathlib.Path) -> None:
        """Files beside the class folders of a split folder belong to no class."""
        for entry in sorted(folder.iterdir()):
            if not entry.is_dir():
                reason = ("hidden: a file whose name starts with '.'"
                          if entry.name.startswith(".") else "no_class: not in a class folder")
                self.skip(split, str(entry), reason)


def _flat_folder_error(folder: pathlib.Path, root: pathlib.Path) -> DataError:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    what = f"{len(files)} files but no class folders" if files else "no class folders"
    return DataError(f"{folder}: {what}; {layout_hint(root)}")


def _from_folders(root: pathlib.Path, options: FolderOptions,
                  class_names: Optional[list[str]]) -> Listing:
    collector = _Collector(root, options)
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir():
        layout = "train_test_folders"
        split_dirs = {"train": train_dir}
        if test_dir.is_dir():
            split_dirs["test"] = test_dir
    elif test_dir.is_dir():
        raise DataError(f"{root}: a test/ folder but no train/; {layout_hint(root)}")
    else:
        layout, split_dirs = "class_folders", {"train": root}
    folders = {split: _visible_dirs(d) for split, d in split_dirs.items()}
    if not folders["train"]:
        raise _flat_folder_error(split_dirs["train"], root)
    names = class_names or [f.name for f in folders["train"]]
    for split, found in folders.items():
        unknown = sorted({f.name for f in found} - set(names))
        if unknown:
            known = "the training classes" if class_names is None else "the dataset's classes"
            raise DataError(f"{split_dirs[split]}: classes {unknown} are not in {known} "
                            f"({', '.join(names)}); rename or remove those folders")
    labels = {name: label for label, name in enumerate(names)}
    items: dict[str, list[Item]] = {}
    for split, found in folders.items():
        if layout == "train_test_folders":
            collector.stray_files(split, split_dirs[split])
        items[split] = [Item(path, labels[folder.name]) for folder in found
                        for path in collector.class_files(split, folder)]
    test_source = "test/ folder" if "test" in items else ""
    return Listing(root, layout, list(names), items, collector.skipped, test_source,
                   collector.channel_votes())


def _manifest_rows(path: pathlib.Path) -> list[tuple[int, dict]]:
    """(line number, {path, label[, split]}) of a CSV or JSON-lines manifest."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"manifest {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DataError(f"manifest {path}: not UTF-8 text") from None
    rows = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"path", "label"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"manifest {path}: needs a header with columns path,label "
                            f"(optionally split); got {','.join(reader.fieldnames or [])!r}")
        rows = [(number, row) for number, row in enumerate(reader, start=2)]
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"manifest {path} line {number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "path" not in row or "label" not in row:
                raise DataError(f"manifest {path} line {number}: expected an object with "
                                "\"path\" and \"label\"")
            rows.append((number, row))
    else:
        raise DataError(f"manifest {path}: must end in .csv (path,label[,split]) or .jsonl")
    if not rows:
        raise DataError(f"manifest {path}: no rows")
    return rows


def _from_manifest(manifest: pathlib.Path, options: FolderOptions,
                   class_names: Optional[list[str]]) -> Listing:
    root = manifest.parent
    collector = _Collector(root, options)
    entries: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    for number, row in _manifest_rows(manifest):
        split = str(row.get("split") or "").strip()  # blank: train
        if split not in ("", *SPLITS):
            raise DataError(f"manifest {manifest} line {number}: split {split!r} is not "
                            f"{' or '.join(SPLITS)}")
        file_path = str(row["path"]).strip()
        label = str(row["label"]).strip()
        if not file_path or not label:
            raise DataError(f"manifest {manifest} line {number}: empty path or label")
        entries[split or "train"].append((os.path.join(root, file_path), label))
    names = class_names or sorted({label for _, label in entries["train"]})
    unknown = sorted({label for rows in entries.values() for _, label in rows} - set(names))
    if unknown:
        raise DataError(f"manifest {manifest}: labels {unknown[:5]} are not among the "
                        f"training labels ({', '.join(names[:10])}); fix those rows")
    labels = {name: label for label, name in enumerate(names)}
    items = {split: [Item(path, labels[label]) for path, label in sorted(entries[split])
                     if collector.accept(split, path)]
             for split in SPLITS if entries[split] or split == "train"}
    test_source = "manifest" if entries["test"] else ""
    return Listing(root, "manifest", list(names), items, collector.skipped, test_source,
                   collector.channel_votes())


def split_off_test(listing: Listing, fraction: float, seed: int) -> None:
    """Draws `fraction` of each class's training items as the test split (at least
    MIN_PER_CLASS each side), seeded by `seed` and the class name."""
    if fraction <= 0:
        raise DataError(f"{listing.folder}: no test split (no test/ folder or split column) and "
                        f"{flag('test_split')}={fraction}; add a test/ folder or set "
                        f"{flag('test_split')} (e.g. 0.2)")
    by_class: dict[int, list[Item]] = {}
    for item in listing.items["train"]:
        by_class.setdefault(item.label, []).append(item)
    train, test = [], []
    for label, items in sorted(by_class.items()):
        name = listing.class_names[label]
        if len(items) < 2 * MIN_PER_CLASS:
            raise DataError(
                f"class {name!r} has {len(items)} usable image{'s' * (len(items) != 1)} in "
                f"{listing.folder}; splitting "
                f"off a test split needs {2 * MIN_PER_CLASS} ({MIN_PER_CLASS} to train, "
                f"{MIN_PER_CLASS} to test): add images, or give a test/ folder")
        n_test = min(max(round(len(items) * fraction), MIN_PER_CLASS),
                     len(items) - MIN_PER_CLASS)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        chosen = set(rng.permutation(len(items))[:n_test].tolist())
        for i, item in enumerate(items):
            (test if i in chosen else train).append(item)
    listing.items = {"train": train, "test": sorted(test, key=lambda i: (i.label, i.path))}
    listing.test_source = (f"drawn from train: {flag('test_split')}={fraction} of each "
                           f"class, {flag('split_seed')}={seed}")


def check_class_count(names: list[str], where: str) -> None:
    if len(names) < 2:
        found = f"1 class ({names[0]!r})" if names else "no class"
        raise DataError(f"{where}: {found}; a classifier needs at least 2: add a folder "
                        f"(or manifest label) per class")


def check_class_sizes(names: list[str], counts: dict[str, list[int]], where: str) -> None:
    """At least MIN_PER_CLASS images of each class in each split ({split: counts})."""
    for split, split_counts in counts.items():
        for name, count in zip(names, split_counts, strict=True):
            if count < MIN_PER_CLASS:
                raise DataError(
                    f"class {name!r} has {count} usable image{'s' * (count != 1)} in the "
                    f"{split} split of {where}; each class needs at least {MIN_PER_CLASS} "
                    f"per split: add images of it (ingest/skipped.csv lists files left "
                    f"out), or remove the class")


def list_images(root: Optional[str | os.PathLike], options: FolderOptions,
                class_names: Optional[list[str]] = None) -> Listing:
    """The files of a folder (or `options.manifest`), split into train and test, checked.

    `class_names`: a dataset's fixed classes (folders must be among them); None reads them
    from the training folders or labels, sorted.
    """
    if options.manifest:
        manifest = pathlib.Path(options.manifest)
        if not manifest.is_absolute() and root is not None:
            manifest = pathlib.Path(root) / manifest
        if not manifest.is_file():
            raise DataError(f"{flag('manifest')} {manifest}: no such file")
        listing = _from_manifest(manifest.resolve(), options, class_names)
        where = f"manifest {manifest}"
    else:
        if root is None:
            raise DataError(f"no folder given: pass {flag('data_dir')}=DIR; "
                            f"{layout_hint(pathlib.Path('DIR'))}")
        root = pathlib.Path(root)
        if not root.is_dir():
            raise DataError(f"{flag('data_dir')} {root}: no such folder")
        listing = _from_folders(root, options, class_names)
        where = str(root)
    check_class_count(listing.class_names, where)
    if not listing.items.get("test"):
        split_off_test(listing, options.test_split, options.split_seed)
    listing.where = where
    check_class_sizes(listing.class_names, {s: listing.counts(s) for s in SPLITS}, where)
    return listing


def majority_channels(listing: Listing) -> int:
    """1 or 3: what most headers of the kept files declare (3 on a tie)."""
    votes = listing.channel_votes
    return 1 if votes.get("1", 0) > votes.get("3", 0) else 3
