"""Your own images (sdim_tf.data.folders, images): layouts, the split, the image policy
against numpy/Pillow references, the files that are skipped and the one-line refusals."""

import dataclasses
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from sdim_tf import data
from sdim_tf.data import folders, images
from tests import image_files

OPTIONS = data.FolderOptions()


def _listing(root, **options) -> data.Listing:
    return data.list_images(root, data.FolderOptions(**options))


def _names(paths) -> list[str]:
    return sorted(pathlib.Path(p).name for p in paths)


# ----------------------------------------------------------------------------- layouts

def test_train_and_test_folders(tmp_path):
    written = image_files.class_folders(tmp_path, {"train": {"dog": 3, "cat": 2},
                                                   "test": {"dog": 2, "cat": 2}})
    listing = _listing(tmp_path)
    assert listing.layout == "train_test_folders" and listing.class_names == ["cat", "dog"]
    assert listing.test_source == "test/ folder" and listing.skipped == []
    expected = {split: sorted((p, 0 if "/cat/" in p else 1) for p in written
                              if f"/{split}/" in p) for split in data.SPLITS}
    for split in data.SPLITS:
        assert sorted((i.path, i.label) for i in listing.items[split]) == expected[split]
    assert listing.counts("train") == [2, 3] and listing.counts("test") == [2, 2]


def test_class_folders_at_the_root_get_a_seeded_test_split(tmp_path):
    image_files.class_folders(tmp_path, {"": {"a": 10, "b": 8}})
    listing = _listing(tmp_path, test_split=0.25, split_seed=3)
    assert listing.layout == "class_folders"
    # round(10 * 0.25) = 2 and round(8 * 0.25) = 2 held out per class, the rest trains
    assert listing.counts("test") == [2, 2] and listing.counts("train") == [8, 6]
    assert "--test_split=0.25" in listing.test_source and "--split_seed=3" in listing.test_source
    train = {i.path for i in listing.items["train"]}
    assert not train & {i.path for i in listing.items["test"]}
    again = _listing(tmp_path, test_split=0.25, split_seed=3)
    assert [i.path for i in again.items["test"]] == [i.path for i in listing.items["test"]]
    other = _listing(tmp_path, test_split=0.25, split_seed=4)
    assert {i.path for i in other.items["test"]} != {i.path for i in listing.items["test"]}


def test_a_class_s_split_does_not_depend_on_the_other_classes(tmp_path):
    image_files.class_folders(tmp_path / "two", {"train": {"a": 12, "b": 9}})
    image_files.class_folders(tmp_path / "three", {"train": {"a": 12, "b": 9, "c": 7}})

    def held_out(root, label):
        return _names(i.path for i in _listing(root).items["test"] if i.label == label)

    assert held_out(tmp_path / "two", 0) == held_out(tmp_path / "three", 0)
    assert held_out(tmp_path / "two", 1) == held_out(tmp_path / "three", 1)


@pytest.mark.parametrize("count, fraction, expected", [
    (10, 0.2, 2), (4, 0.2, 2), (5, 0.5, 2), (20, 0.05, 2), (100, 0.33, 33), (6, 0.9, 4)])
def test_held_out_count_is_the_fraction_with_two_each_side(tmp_path, count, fraction, expected):
    image_files.class_folders(tmp_path, {"train": {"a": count, "b": 4}}, sides=(4, 6))
    listing = _listing(tmp_path, test_split=fraction)
    assert listing.counts("test")[0] == expected
    assert listing.counts("train")[0] == count - expected


def test_manifest_csv_with_a_split_column(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i in range(4):
        for label in ("zebra", "ant"):
            split = "test" if i >= 2 else "train"
            image_files.write(tmp_path / "pics" / f"{label}{i}.jpg", image_files.smooth(
                rng, 20, 30), "JPEG")
            rows.append(f"pics/{label}{i}.jpg,{label},{split}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    listing = data.list_images(None, data.FolderOptions(manifest=str(tmp_path / "list.csv")))
    assert listing.layout == "manifest" and listing.class_names == ["ant", "zebra"]
    assert listing.test_source == "manifest"
    assert _names(i.path for i in listing.items["test"]) == ["ant2.jpg", "ant3.jpg",
                                                              "zebra2.jpg", "zebra3.jpg"]
    assert listing.counts("train") == [2, 2] and listing.channel_votes == {"1": 0, "3": 8}


def test_manifest_jsonl_relative_to_data_dir_without_split(tmp_path):
    image_files.class_folders(tmp_path, {"imgs": {"x": 5, "y": 5}})
    lines = [f'{{"path": "imgs/{c}/{i:03d}.png", "label": "{c}"}}'
             for c in ("x", "y") for i in range(5)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n\n")
    listing = _listing(tmp_path, manifest="m.jsonl")
    assert listing.counts("train") == [3, 3] and listing.counts("test") == [2, 2]
    assert listing.test_source.startswith("drawn from train")


@pytest.mark.parametrize("name, text, message", [
    ("m.csv", "file,class\na.png,x\n", r"needs a header with columns path,label"),
    ("m.jsonl", '{"path": "a.png", "label": "x"}\nnot json\n', r"line 2: not JSON"),
    ("m.jsonl", '["a.png", "x"]\n', r"line 1: expected an object"),
    ("m.csv", "path,label,split\na.png,x,val\n", r"line 2: split 'val' is not train or test"),
    ("m.csv", "path,label,split\na.png,x,train\nb.png,y,test\n",
     r"labels \['y'\] are not among the training labels"),
    ("m.txt", "a.png x\n", r"must end in \.csv"),
    ("m.csv", "path,label\n", r"no rows"),
])
def test_manifest_errors_are_one_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(data.DataError, match=message) as raised:
        data.list_images(None, data.FolderOptions(manifest=str(tmp_path / name)))
    assert "\n" not in str(raised.value) and name in str(raised.value)


def test_manifest_rows_naming_missing_files_are_skipped(tmp_path):
    image_files.class_folders(tmp_path, {"": {"a": 4, "b": 4}})
    rows = ["path,label"] + [f"{c}/{i:03d}.png,{c}" for c in "ab" for i in range(4)]
    (tmp_path / "m.csv").write_text("\n".join(rows + ["a/gone.png,a", "/etc/hostname,b"]))
    listing = _listing(tmp_path, manifest="m.csv", test_split=0.5)
    assert sorted((pathlib.Path(s.path).name, s.reason.split(":")[0])
                  for s in listing.skipped) == [("gone.png", "missing"), ("hostname", "outside")]


# ------------------------------------------------------------------------ refusals

def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_flat_folder_is_refused_with_the_layout(tmp_path):
    for i in range(3):
        image_files.write(tmp_path / f"{i}.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(data.DataError) as raised:
        _listing(tmp_path)
    text = _one_line(raised)
    assert f"{tmp_path}: 3 files but no class folders" in text
    assert f"{tmp_path}/train/<class>/*.png" in text and "--manifest=" in text
    assert "idx" not in text


def test_flat_train_folder_is_refused(tmp_path):
    image_files.write(tmp_path / "train" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(data.DataError, match=r"train: 1 files but no class folders"):
        _listing(tmp_path)


def test_one_class_is_refused(tmp_path):
    image_files.class_folders(tmp_path, {"train": {"only": 6}})
    with pytest.raises(data.DataError) as raised:
        _listing(tmp_path)
    assert "1 class ('only'); a classifier needs at least 2" in _one_line(raised)


def test_a_class_too_small_for_the_test_folder(tmp_path):
    image_files.class_folders(tmp_path, {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 1}})
    with pytest.raises(data.DataError) as raised:
        _listing(tmp_path)
    assert ("class 'b' has 1 usable image in the test split" in _one_line(raised)
            and "at least 2 per split" in str(raised.value))


def test_a_class_too_small_to_split(tmp_path):
    image_files.class_folders(tmp_path, {"train": {"a": 3, "b": 9}})
    with pytest.raises(data.DataError) as raised:
        _listing(tmp_path)
    assert "class 'a' has 3 usable images" in _one_line(raised)
    assert "needs 4 (2 to train, 2 to test)" in str(raised.value)
    image_files.class_folders(tmp_path / "one", {"train": {"a": 9, "b": 1}})
    with pytest.raises(data.DataError) as raised:
        _listing(tmp_path / "one")
    assert "class 'b' has 1 usable image in" in _one_line(raised)


def test_no_test_folder_and_no_fraction(tmp_path):
    image_files.class_folders(tmp_path, {"train": {"a": 5, "b": 5}})
    with pytest.raises(data.DataError, match=r"--test_split=0\.0; add a test/ folder"):
        _listing(tmp_path, test_split=0.0)


def test_unknown_test_class(tmp_path):
    image_files.class_folders(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"c": 2}})
    with pytest.raises(data.DataError, match=r"classes \['c'\] are not in the training"):
        _listing(tmp_path)


def test_test_folder_without_train(tmp_path):
    image_files.class_folders(tmp_path, {"test": {"a": 2, "b": 2}})
    with pytest.raises(data.DataError, match="a test/ folder but no train/"):
        _listing(tmp_path)


@pytest.mark.parametrize("options, message", [
    ({"resize": "squash"}, r"^resize must be one of stretch, pad, crop, got 'squash'$"),
    ({"channels": 2}, r"^channels must be 1 or 3, got 2$"),
    ({"test_split": 1.0}, r"^test_split must be in \[0, 1\), got 1\.0$"),
    ({"on_bad_file": "ignore"}, r"^on_bad_file must be one of skip, fail, got 'ignore'$"),
    ({"ingest_driver": "spark"}, r"^ingest_driver must be one of local, beam, got 'spark'$"),
    ({"image_size": 0, "max_source_side": 0},
     r"^image_size must be >= 1, got 0; max_source_side must be >= 1, got 0$"),
])
def test_bad_options(options, message):
    with pytest.raises(data.DataError, match=message):
        data.FolderOptions(**options)


def test_every_option_has_help_and_choices_for_flags():
    fields = {f.name: f.metadata for f in dataclasses.fields(data.FolderOptions)}
    assert fields["resize"]["choices"] == ("stretch", "pad", "crop")
    assert fields["ingest_driver"]["choices"] == ("local", "beam")
    for name, metadata in fields.items():
        assert len(metadata["help"]) > 20, name


# -------------------------------------------------------------------- skipped files

def _messy_folder(root: pathlib.Path) -> dict[str, str]:
    """A folder with one of each bad entry: {path: expected reason code}."""
    image_files.class_folders(root, {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2,
                                                                               "dog": 2}})
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    (cat / ".DS_Store").write_bytes(b"\0\0")
    (cat / ".thumbnails").mkdir()
    (cat / "empty.png").write_bytes(b"")
    os.symlink("/etc/hostname", dog / "outside.png")
    os.symlink(dog / "gone.png", dog / "broken.png")
    os.symlink(dog / "000.png", dog / "again.png")  # inside: kept
    os.symlink(root / "train" / "cat", dog / "linked")
    os.mkfifo(dog / "pipe.png")
    (dog / "huge.png").write_bytes(image_files.png_header_only(5000, 20))
    image_files.write(dog / "cmyk.jpg", np.zeros((8, 8, 3), np.uint8), "JPEG", "CMYK")
    image_files.write(root / "train" / "stray.png", np.zeros((4, 4, 3), np.uint8))
    return {str(cat / ".DS_Store"): "hidden", str(cat / ".thumbnails"): "hidden",
            str(cat / "empty.png"): "empty", str(dog / "outside.png"): "symlink_outside",
            str(dog / "broken.png"): "broken_symlink", str(dog / "linked"): "symlink_folder",
            str(dog / "pipe.png"): "not_a_file", str(dog / "huge.png"): "too_large",
            str(dog / "cmyk.jpg"): "unsupported", str(root / "train" / "stray.png"): "no_class"}


def test_bad_entries_are_skipped_with_their_reason(tmp_path):
    expected = _messy_folder(tmp_path)
    listing = _listing(tmp_path)
    got = {s.path: s.reason.split(":")[0] for s in listing.skipped}
    assert got == expected
    assert all(s.split == "train" for s in listing.skipped)
    reasons = {s.path: s.reason for s in listing.skipped}
    assert reasons[str(tmp_path / "train/dog/outside.png")] == (
        f"symlink_outside: points to /etc/hostname, outside {tmp_path}")
    assert "5000x20 pixels, a side over max_source_side=4096" in reasons[
        str(tmp_path / "train/dog/huge.png")]
    assert listing.counts("train") == [4, 5]  # dog/again.png, a symlink inside, is kept
    assert listing.channel_votes == {"1": 0, "3": 4 + 5 + 4}


def test_max_source_side_is_an_option(tmp_path):
    image_files.class_folders(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}},
                              sides=(30, 31))
    image_files.write(tmp_path / "train" / "a" / "big.png", np.zeros((50, 20, 3), np.uint8))
    skipped = _listing(tmp_path, max_source_side=40).skipped
    assert [(pathlib.Path(s.path).name, s.reason) for s in skipped] == [
        ("big.png", "too_large: 20x50 pixels, a side over max_source_side=40")]


def test_on_bad_file_fail_refuses_the_first_one(tmp_path):
    _messy_folder(tmp_path)
    with pytest.raises(data.DataError) as raised:
        _listing(tmp_path, on_bad_file="fail")
    text = _one_line(raised)
    assert text.startswith(f"{tmp_path}/train/stray.png: no_class")
    assert "--on_bad_file=skip" in text and "ingest/skipped.csv" in text


# ---------------------------------------------------------------- headers and channels

@pytest.mark.parametrize("fmt, mode, channels", [
    ("PNG", "L", 1), ("PNG", "LA", 1), ("PNG", "RGB", 3), ("PNG", "RGBA", 3), ("PNG", "P", 3),
    ("PNG", "I;16", 1), ("JPEG", "L", 1), ("JPEG", "RGB", 3), ("GIF", "P", 3), ("BMP", "L", 1),
    ("BMP", "RGB", 3)])
def test_sniff_reads_size_and_channels(tmp_path, fmt, mode, channels):
    rng = np.random.default_rng(0)
    pixels = image_files.smooth(rng, 13, 21)
    path = tmp_path / f"x.{fmt.lower()}"
    if mode == "I;16":
        Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(path)
    else:
        image_files.write(path, pixels, fmt, mode)
    header = images.sniff(path)
    with Image.open(path) as reference:
        assert (header.width, header.height) == reference.size == (21, 13)
    assert header.channels == channels and header.problem(4096) == ""


def test_sniff_progressive_and_cmyk_jpeg(tmp_path):
    pixels = image_files.smooth(np.random.default_rng(0), 40, 30)
    progressive = image_files.write(tmp_path / "p.jpg", pixels, "JPEG", progressive=True)
    cmyk = image_files.write(tmp_path / "c.jpg", pixels, "JPEG", "CMYK")
    assert images.sniff(progressive) == images.Header(40, 30, 3, True)
    assert images.sniff(cmyk).channels == 4
    assert images.sniff(cmyk).problem(4096).startswith("unsupported:")
    (tmp_path / "t.txt").write_text("not an image")
    assert images.sniff(tmp_path / "t.txt") is None


def test_channels_by_majority(tmp_path):
    rng = np.random.default_rng(0)
    for split in data.SPLITS:
        for c in ("a", "b"):
            for i, mode in enumerate(("L", "L", "RGB")):
                image_files.write(tmp_path / split / c / f"{i}.png", image_files.noise(
                    rng, 6, 6), mode=mode)
    listing = _listing(tmp_path)
    assert listing.channel_votes == {"1": 8, "3": 4}
    assert data.policy_for(data.get_spec("image_folder"), listing, OPTIONS).channels == 1
    forced = data.policy_for(data.get_spec("image_folder"), listing,
                             data.FolderOptions(channels=3))
    assert forced.channels == 3 and forced.shape == [32, 32, 3]
    listing.channel_votes = {"1": 4, "3": 4}
    assert folders.majority_channels(listing) == 3  # a tie keeps colour


# --------------------------------------------------------------------- the policy

def _image(raw: bytes, channels: int, size: int = 32, resize: str = "stretch") -> np.ndarray:
    return images.image(tf.constant(raw), images.ImagePolicy(size, size, channels,
                                                             resize)).numpy()


@pytest.mark.parametrize("resize", ["stretch", "pad", "crop"])
@pytest.mark.parametrize("shape", [(20, 45), (45, 20), (28, 28), (64, 50), (7, 90)])
def test_resize_policies_match_the_numpy_reference(resize, shape):
    pixels = image_files.noise(np.random.default_rng(1), *shape)
    got = _image(image_files.encode(pixels), 3, resize=resize)
    expected = image_files.fit(pixels, 32, resize)
    assert got.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - expected).max() <= 1  # float32 vs float64 rounding
    assert (got.astype(int) != expected).mean() < 0.01


def test_stretch_equals_what_the_exported_model_does():
    """An image stored at 32x32 by ingest is, once scaled to [0, 1], the exported model's
    own preprocessing of the source image (to within uint8 rounding)."""
    pixels = image_files.noise(np.random.default_rng(2), 45, 20)
    stored = _image(image_files.encode(pixels), 3) / 255.0
    served = data.preprocess(pixels[None]).numpy()[0]
    assert np.abs(stored - served).max() <= 0.5 / 255 + 1e-6


def test_pad_keeps_black_bands_and_crop_the_centre():
    pixels = np.full((16, 64, 3), 200, np.uint8)
    padded = _image(image_files.encode(pixels), 3, resize="pad")
    assert (padded[:12] == 0).all() and (padded[20:] == 0).all() and (padded[12:20] == 200).all()
    stripes = np.zeros((64, 16, 3), np.uint8)
    stripes[24:40] = 255  # the centre square of a tall image is 16 rows around the middle
    cropped = _image(image_files.encode(stripes), 3, resize="crop")
    assert (cropped == 255).all()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_colour_modes_to_colour(mode):
    rng = np.random.default_rng(3)
    pixels = image_files.noise(rng, 32, 32, 4 if mode == "RGBA" else 3)
    raw = image_files.encode(pixels, mode=mode)
    with Image.open(image_files.io.BytesIO(raw)) as reference:  # palette expanded by Pillow
        expected = np.asarray(reference.convert("RGB")) if mode == "P" else pixels[..., :3]
    np.testing.assert_array_equal(_image(raw, 3), expected)  # alpha dropped


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_colour_modes_to_grey_by_luma(mode):
    pixels = image_files.noise(np.random.default_rng(4), 32, 32, 4 if mode == "RGBA" else 3)
    raw = image_files.encode(pixels, mode=mode)
    with Image.open(image_files.io.BytesIO(raw)) as opened:
        rgb = np.asarray(opened.convert("RGB"))
    got = _image(raw, 1).astype(int)
    assert got.shape == (32, 32, 1) and np.abs(got - np.round(image_files.luma(rgb))).max() <= 1


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey_modes(mode):
    grey = image_files.noise(np.random.default_rng(5), 32, 32, 2 if mode == "LA" else 1)
    raw = image_files.encode(grey if mode == "LA" else grey[..., 0], mode=mode)
    np.testing.assert_array_equal(_image(raw, 1), grey[..., :1])
    np.testing.assert_array_equal(_image(raw, 3), np.repeat(grey[..., :1], 3, -1))


def test_16_bit_png_keeps_the_high_byte():
    rng = np.random.default_rng(6)
    grey16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (32, 32, 3), dtype=np.uint16)
    np.testing.assert_array_equal(_image(tf.io.encode_png(grey16[..., None]).numpy(), 1),
                                  (grey16 >> 8)[..., None].astype(np.uint8))
    np.testing.assert_array_equal(_image(tf.io.encode_png(rgb16).numpy(), 3),
                                  (rgb16 >> 8).astype(np.uint8))


def test_jpeg_within_a_few_levels_of_pillow():
    pixels = image_files.smooth(np.random.default_rng(7), 32, 32)
    raw = image_files.encode(pixels, "JPEG", quality=95)
    with Image.open(image_files.io.BytesIO(raw)) as reference:
        expected = np.asarray(reference.convert("RGB")).astype(int)
    got = _image(raw, 3).astype(int)
    assert np.abs(got - expected).max() <= 4 and np.abs(got - expected).mean() < 1


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_gif_and_bmp_to_grey(fmt):
    pixels = image_files.noise(np.random.default_rng(8), 32, 32)
    raw = image_files.encode(pixels, fmt, "L" if fmt == "BMP" else None)
    with Image.open(image_files.io.BytesIO(raw)) as opened:
        rgb = np.asarray(opened.convert("RGB"))
    grey = _image(raw, 1).astype(int)
    assert np.abs(grey - np.round(image_files.luma(rgb))).max() <= 1
    np.testing.assert_array_equal(_image(raw, 3), rgb)


def test_undecodable_bytes_give_a_reason(tmp_path):
    good = image_files.encode(image_files.noise(np.random.default_rng(9), 20, 20))
    encoder = images.ImageEncoder(images.ImagePolicy(32, 32, 3))
    for name, raw in (("t.png", good[: len(good) // 2]), ("n.png", b"plain text")):
        (tmp_path / name).write_bytes(raw)
        outcome = encoder.encode(tmp_path / name, 0)
        assert outcome.example is None and outcome.reason.startswith("undecodable: ")
    (tmp_path / "ok.png").write_bytes(good)
    outcome = encoder.encode(tmp_path / "ok.png", 1)
    assert outcome.reason == "" and outcome.image.shape == (32, 32, 3)
    assert outcome.example == data.serialize_example(outcome.image, 1)
