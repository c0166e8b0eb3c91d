"""The Beam ingest driver writes what the in-process one writes (pip install .[beam])."""

import csv
import hashlib
import shutil

import apache_beam  # noqa: F401  the driver's dependency: a missing one fails here
import numpy as np
import pytest
import tensorflow as tf

from pipeline.run_dir import Examples
from pipeline.stages import ingest
from sdim_tf import data
from tests import image_files


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of mixed sizes and modes, an undecodable file, a train/test duplicate."""
    root = tmp_path_factory.mktemp("beam") / "src"
    image_files.class_folders(root, {"train": {"a": 7, "b": 6}, "test": {"a": 3, "b": 3}})
    rng = np.random.default_rng(1)
    image_files.write(root / "train" / "a" / "grey.png", image_files.noise(rng, 9, 30), mode="L")
    image_files.write(root / "train" / "b" / "photo.jpg", image_files.smooth(rng, 40, 25),
                      "JPEG")
    (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(root / "train" / "a" / "003.png", root / "test" / "b" / "copy.png")
    return root


@pytest.fixture(scope="module")
def local(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "ingest"
    return out, ingest.ingest("image_folder", out, str(folder), progress=False)


def _example_hashes(out) -> dict[str, list[str]]:
    """Per split, the sorted sha256 of every serialized example (order-independent)."""
    return {split: sorted(hashlib.sha256(r).hexdigest() for r in
                          tf.data.TFRecordDataset(Examples(out).shard_files(split))
                          .as_numpy_iterator()) for split in data.SPLITS}


def _rows(path) -> list[tuple]:
    with open(path, newline="") as f:
        return sorted(tuple(r.values()) for r in csv.DictReader(f))


def _same_output(local_out, local_meta, beam_out, beam_meta):
    assert _example_hashes(beam_out) == _example_hashes(local_out)
    for split in data.SPLITS:
        beam_split, local_split = dict(beam_meta["splits"][split]), dict(
            local_meta["splits"][split])
        assert beam_split.pop("files") == local_split.pop("files")
        assert beam_split == local_split
    for key in ("duplicates", "class_names", "image_shape", "num_classes"):
        assert beam_meta[key] == local_meta[key]
    assert _rows(beam_out / ingest.SKIPPED) == _rows(local_out / ingest.SKIPPED)
    assert _rows(beam_out / data.FILES) == _rows(local_out / data.FILES)


@pytest.mark.parametrize("args", [
    ("--direct_running_mode=in_memory",),
    ("--direct_running_mode=multi_processing", "--direct_num_workers=2"),
], ids=["in_memory", "multi_processing"])
def test_beam_writes_the_examples_of_the_local_driver(folder, local, tmp_path, args):
    local_out, local_meta = local
    assert local_meta["folder"]["skipped"] == 1 and local_meta["duplicates"]["train_test"] == 1
    options = data.FolderOptions(ingest_driver="beam", beam_pipeline_args=args)
    beam_meta = ingest.ingest("image_folder", tmp_path / "out", str(folder), options)
    _same_output(local_out, local_meta, tmp_path / "out", beam_meta)
    assert list(beam_meta["folder"]["options"]["beam_pipeline_args"]) == list(args)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ingest.outputs(beam_meta))  # Beam's side outputs are gone


def test_beam_on_bad_file_fail(folder, tmp_path):
    options = data.FolderOptions(ingest_driver="beam", on_bad_file="fail")
    with pytest.raises(data.DataError, match=r"broken\.png: undecodable: .*on_bad_file=skip"):
        ingest.ingest("image_folder", tmp_path / "out", str(folder), options)
    assert not (tmp_path / "out").exists()


def test_beam_pipeline_args_reach_beam(folder, tmp_path):
    options = data.FolderOptions(ingest_driver="beam",
                                 beam_pipeline_args=("--runner=NoSuchRunner",))
    with pytest.raises(ValueError, match="NoSuchRunner"):
        ingest.ingest("image_folder", tmp_path / "out", str(folder), options)
