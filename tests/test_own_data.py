"""Your own images, model side: held-out images per class, batches that fit, the budget's
promise that the held-out images support, the export gate, the model's name and place, and
answers that all name the decided class."""

import json
import math
import pathlib
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import artifacts, run
from pipeline.config import ConfigError, PipelineConfig, TrainConfig
from pipeline.run_dir import Run
from pipeline.selection import per_class_held_out, split_examples
from pipeline.stages import export
from sdim_tf import conformal, data

CLASSES = ("checker", "horizontal", "vertical")  # sorted: ingest's class order


def _texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    period, phase = rng.uniform(4, 9), rng.uniform(0, 9)
    pattern = {"horizontal": np.sin(2 * np.pi * (y + phase) / period),
               "vertical": np.sin(2 * np.pi * (x + phase) / period),
               "checker": np.sign(np.sin(2 * np.pi * x / period)
                                  * np.sin(2 * np.pi * y / period))}[kind]
    return np.uint8(np.clip(127.5 + 100 * pattern + rng.normal(0, 20, (32, 32)), 0, 255))


def make_folder(root: pathlib.Path, classes=CLASSES, train: int = 30, test: int = 8,
                seed: int = 0) -> pathlib.Path:
    """root/train/<class>/*.png and root/test/<class>/*.png: grey 32x32 stripes and checks."""
    rng = np.random.default_rng(seed)
    for kind in classes:
        for split, count in (("train", train), ("test", test)):
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_texture(kind, rng)).save(folder / f"{i:03d}.png")
    return root


# --- held-out images per class, batches -------------------------------------------------------

def test_per_class_held_out_counts_are_the_rule_and_seeded():
    labels = np.repeat([0, 1, 2, 3], [30, 160, 7, 2])  # class order, as ingest writes
    held = per_class_held_out(labels, 0.2, seed=0)
    # round(0.2 n), at least min(5, n // 2), at most n - 1: 6, 32, max(1, 3) = 3, max(0, 1) = 1
    assert np.bincount(labels[held], minlength=4).tolist() == [6, 32, 3, 1]
    assert np.array_equal(held, np.sort(held)) and len(set(held.tolist())) == len(held)
    np.testing.assert_array_equal(per_class_held_out(labels, 0.2, seed=0), held)
    assert not np.array_equal(per_class_held_out(labels, 0.2, seed=1), held)
    # the order of the images does not matter: the same counts when shuffled
    shuffled = np.random.default_rng(0).permutation(labels)
    assert np.bincount(shuffled[per_class_held_out(shuffled, 0.2, 0)]).tolist() == [6, 32, 3, 1]


def test_split_examples_by_range_or_per_class():
    labels = np.repeat([0, 1, 2], 30)
    fraction = TrainConfig(validation_split=0, validation_fraction=0.2, seed=3)
    trained, held_out = split_examples(fraction, 90, lambda: labels)
    assert sorted(trained["indices"] + held_out["indices"]) == list(range(90))
    assert np.bincount(labels[held_out["indices"]]).tolist() == [6, 6, 6]
    limited = TrainConfig(validation_split=0, validation_fraction=0.2, seed=3, train_limit=20)
    subset, same = split_examples(limited, 90, lambda: labels)
    assert same == held_out and len(subset["indices"]) == 20
    assert set(subset["indices"]) <= set(trained["indices"])
    assert len(np.unique(labels[subset["indices"]])) == 3  # drawn, not the first 20
    last = TrainConfig(validation_split=5000, validation_fraction=0.0, train_limit=1024)
    unread = lambda: pytest.fail("labels are read for --validation_fraction only")  # noqa: E731
    assert split_examples(last, 60000, unread) == ({"skip": 0, "limit": 1024},
                                                   {"skip": 55000, "limit": 5000})
    with pytest.raises(ConfigError, match="--validation_split=5000 leaves 0 of the 90"):
        split_examples(TrainConfig(validation_split=5000, validation_fraction=0.0), 90, unread)
    # fewer images than a batch: the batch shrinks to them
    assert (fraction.batch(72), fraction.batch(500)) == (72, 128)


def test_image_folder_presets_and_refusals():
    resolved = PipelineConfig.from_flat(dataset="image_folder").resolve()
    assert (resolved.train.validation_split, resolved.train.validation_fraction,
            resolved.calibrate.reject_budget) == (0, 0.2, 0.04)
    assert PipelineConfig.from_flat().resolve().train.validation_fraction == 0
    with pytest.raises(ConfigError, match="both hold images out; set one to 0"):
        PipelineConfig.from_flat(validation_fraction=0.1).resolve()
    with pytest.raises(ConfigError, match="--train_limit=1024 trains on a subset, which "
                                          "--export_dir=/srv/models would serve"):
        PipelineConfig.from_flat(train_limit=1024, export_dir="/srv/models").resolve()
    PipelineConfig.from_flat(train_limit=1024, export_dir="/srv/models",
                             export_subset=True).resolve()
    PipelineConfig.from_flat(train_limit=1024).resolve()  # into its own run directory
    with pytest.raises(ConfigError, match="--model_name='my model'"):
        PipelineConfig.from_flat(model_name="my model").resolve()


def test_the_promise_is_the_strongest_the_held_out_images_support():
    # 1 - 0.96^74 >= 0.95 > 1 - 0.96^73; on average k = floor(0.04 (n + 1)) >= 1 from n = 24
    assert conformal.attainable(0.04, 0.95, 74) == (0.04, 0.95)
    assert conformal.attainable(0.04, 0.95, 73) == (0.04, None)
    assert conformal.attainable(0.04, 0.95, 24) == (0.04, None)
    assert conformal.attainable(0.04, 0.95, 23) == (1 / 24, None)
    assert conformal.threshold([5.0, 3.0, 4.0], 1 / 4) == 3.0  # the lowest score


# --- the gate and the name --------------------------------------------------------------------

def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k), by the sum."""
    return sum(math.comb(n, j) * p**j * (1 - p)**(n - j) for j in range(max(k, 0), n + 1))


def _report(accuracy, rejected, n=30, key="conformal"):
    return {"num_test": n, "accuracy": accuracy, "selective": {key: {"reject_rate": rejected}}}


SAVED = {"deployed": {"percentile": "conformal", "alpha": 0.04},
         "examples": {"num_samples": 18}}


def test_gate_figures_and_refusals():
    # budget: max(alpha, 1 / 19) with 18 calibration images
    good = export.gate(_report(28 / 30, 3 / 30), SAVED, 3)
    assert good["failures"] == [] and good["budget"] == pytest.approx(1 / 19)
    assert good["p_accuracy_at_chance"] == pytest.approx(_binomial_tail(28, 30, 1 / 3))
    assert good["p_rejected_at_twice_budget"] == pytest.approx(_binomial_tail(3, 30, 2 / 19))
    chance = export.gate(_report(13 / 30, 0.0), SAVED, 3)  # P(>= 13 | 1/3) = 0.16
    assert chance["failures"] == [
        f"test accuracy 43.3% (13/30) is not clearly above chance 33.3% (binomial "
        f"p={_binomial_tail(13, 30, 1 / 3):.2g})"]
    flooded = export.gate(_report(1.0, 1.0), SAVED, 3)
    assert len(flooded["failures"]) == 1 and flooded["failures"][0].startswith(
        "the deployed rule rejects 100.0% of the test images (30/30), far more than twice its "
        "budget 5.3%")
    # a percentile's budget is the percentile; 10,000 test images resolve 4% against 2 x 1%
    saved = {"deployed": {"percentile": "1"}, "examples": {"num_samples": 5000}}
    assert export.gate(_report(0.9, 0.04, 10000, "1"), saved, 10)["failures"][0].startswith(
        "the deployed rule rejects 4.0% of the test images (400/10000), far more than twice "
        "its budget 1.0%")
    assert export.gate(_report(0.9, 0.021, 10000, "1"), saved, 10)["failures"] == []


def test_model_name_defaults_to_the_dataset_or_the_folder():
    def examples(dataset, source):
        return types.SimpleNamespace(dataset_name=dataset, metadata={"sources": [
            {"split": "train", "source": source}]})

    assert export.model_name(examples("fashion_mnist", "idx:/d/fashion_mnist"), "sdim") == \
        "fashion_mnist"
    assert export.model_name(examples("fashion_mnist", "idx:/d"), "discriminative") == \
        "fashion_mnist_discriminative"
    assert export.model_name(examples("image_folder", "image_folder:/home/me/My Cats (2)"),
                             "sdim") == "My_Cats__2_"
    assert export.model_name(examples("image_folder", "image_folder:/tmp/.hidden"),
                             "sdim") == "hidden"


# --- a run on a folder of 3 x 30 images -------------------------------------------------------

@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("own")
    folder = make_folder(base / "stripes")
    config = PipelineConfig.from_flat(
        dataset="image_folder", data_dir=str(folder), run_dir=str(base / "run"), epochs=3,
        shift_images=0, stages=("ingest", "train", "calibrate", "evaluate", "export"))
    return config, run.run(config)


def test_held_out_per_class_and_the_promise_they_support(folder_run):
    _, run_dir = folder_run
    view = Run(run_dir)
    labels = view.examples.labels("train")
    assert labels.tolist() == np.repeat([0, 1, 2], 30).tolist()  # class order
    held = view.model.selection("held_out")["indices"]
    trained = view.model.selection("trained")["indices"]
    assert sorted(held + trained) == list(range(90))
    assert np.bincount(labels[held]).tolist() == [6, 6, 6]
    images, got = view.examples.arrays("train", indices=held)
    everything, _ = view.examples.arrays("train")
    np.testing.assert_array_equal(images, everything[held])
    np.testing.assert_array_equal(got, labels[held])
    state = view.model.state()
    assert all(row["steps"] == 1 for row in state["history"])  # 72 images: one batch of 72
    saved = view.calibration.saved
    assert saved["source"] == "validation" and saved["examples"]["num_samples"] == 18
    deployed = saved["deployed"]
    # 18 held-out images: on average, at 1/19 (the lowest held-out score is the threshold)
    assert (deployed["alpha"], deployed["confidence"]) == (pytest.approx(1 / 19), None)
    assert deployed["unfamiliar"]["asked"] == {"alpha": 0.04, "confidence": 0.95}
    scores, _ = view.deployable().class_scores(view.examples.dataset("train", indices=held))
    assert saved["percentiles"][deployed["percentile"]]["thresholds"] == pytest.approx(
        [scores.max(1).min()] * 3, rel=1e-6)
    for layer, record in saved["density_fit"]["covariance"].items():
        assert record["images"] == 72 and record["covariance"] == "oas", layer
        assert record["why"] == f"72 images < {record['dimensions']} dimensions: the sample " \
                                "covariance is singular"


def test_export_goes_into_the_run_under_the_folders_name(folder_run):
    _, run_dir = folder_run
    record = Run(run_dir).export.record()
    assert record["model_name"] == "stripes"
    assert pathlib.Path(record["path"]) == (run_dir / "saved_models" / "stripes" / "1").resolve()
    card = json.loads((pathlib.Path(record["path"]) / "assets" / "model_card.json").read_text())
    report = Run(run_dir).evaluation.report()
    assert card["gate"]["failures"] == [] and card["gate"]["forced"] is False
    assert card["gate"]["accuracy"] == report["accuracy"]
    assert card["rejection"]["density_fit"] == Run(run_dir).calibration.saved["density_fit"]


def test_every_output_follows_the_decided_class(folder_run):
    _, run_dir = folder_run
    loaded = tf.saved_model.load(Run(run_dir).export.record()["path"])
    rng = np.random.default_rng(0)
    raw = np.concatenate([np.zeros((1, 32, 32, 1), np.uint8),
                          rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)])
    inputs = {"serving_default": tf.constant(data.preprocess(raw).numpy()),
              "classify_raw": tf.constant(raw),
              "classify_encoded": tf.constant([tf.io.encode_png(i).numpy() for i in raw])}
    for name, images in inputs.items():
        out = {k: v.numpy() for k, v in loaded.signatures[name](images=images).items()}
        assert "log_likelihoods" not in out and "max_log_likelihood" not in out
        ids = out["class_ids"]
        np.testing.assert_array_equal(ids, out["class_scores"].argmax(1))
        assert [n.decode() for n in out["class_name"]] == [CLASSES[i] for i in ids]
        np.testing.assert_array_equal(out["probabilities"][np.arange(7), ids],
                                      out["probabilities"].max(1))
        expected = np.exp(out["class_scores"] - out["class_scores"].max(1, keepdims=True))
        np.testing.assert_allclose(out["probabilities"], expected / expected.sum(1, keepdims=True),
                                   rtol=1e-5, atol=1e-7)
    refused = loaded.signatures["serving_default"](images=tf.fill([1, 32, 32, 1], np.nan))
    assert refused["reason"].numpy()[0] == b"non_finite"
    assert not refused["probabilities"].numpy().any()


class _Planted:
    """An evaluation view whose report says what a test plants."""

    def __init__(self, report: dict, folder: pathlib.Path):
        self._report, self.folder = report, folder

    def report(self) -> dict:
        return self._report


def test_the_gate_refuses_a_planted_bad_model_and_force_export_exports_it(folder_run,
                                                                           tmp_path):
    config, run_dir = folder_run
    view = Run(run_dir)
    report = {**view.evaluation.report(), "accuracy": 10 / 24}  # 24 test images, chance 1/3
    upstream = {"ingest": view.examples, "train": view.model, "calibrate": view.calibration,
                "evaluate": _Planted(report, view.evaluation.folder)}
    settings = config.replace(export_dir=str(tmp_path / "models")).resolve(run.STAGE_NAMES)
    with pytest.raises(export.ExportRefused, match=r"^export refused: test accuracy 41.7% "
                       r"\(10/24\) is not clearly above chance 33.3% .*--force_export exports "
                       r"it anyway$"):
        export.run(settings.view(("export",)), tmp_path / "export", upstream)
    assert not (tmp_path / "models").exists()
    forced = settings.replace(force_export=True)
    (tmp_path / "export").mkdir()
    export.run(forced.view(("export",)), tmp_path / "export", upstream)
    card = json.loads((tmp_path / "models" / "stripes" / "1" / "assets" /
                       "model_card.json").read_text())
    assert card["gate"]["forced"] is True and len(card["gate"]["failures"]) == 1


def test_one_class_is_refused_before_training(tmp_path):
    folder = make_folder(tmp_path / "one", classes=("checker",), train=10, test=3)
    config = PipelineConfig.from_flat(dataset="image_folder", data_dir=str(folder),
                                      run_dir=str(tmp_path / "run"), stages=("ingest", "train"))
    with pytest.raises(data.DataError, match=r"one: 1 class \('checker'\); a classifier "
                                             r"needs at least 2: add a folder \(or manifest "
                                             r"label\) per class$"):
        run.run(config)
    assert not (tmp_path / "run" / "ingest" / artifacts.MANIFEST).exists()
    assert not (tmp_path / "run" / "train").exists()
