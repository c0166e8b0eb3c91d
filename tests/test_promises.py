"""Both promises through the pipeline: scores and rules found by name, the ambiguity
threshold of --max_error in thresholds.json, the signatures, pipeline.predict's CSV and the
evaluation report, each read against numpy on the run's own scores."""

import csv
import dataclasses
import json
import pathlib
import shutil
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import sdim_tf
from pipeline import predict, run
from pipeline.config import CalibrateConfig
from pipeline.run_dir import Calibration, Examples, Run
from pipeline.stages import calibrate
from sdim_tf import data, rejection, rules, scores


class Halved(keras.Model):
    """Half of a classifier's output: a score the library does not know."""

    def __init__(self, classifier, factor):
        super().__init__()
        self.classifier, self.factor = classifier, factor

    def call(self, images, training=False):
        return self.factor * self.classifier(images, training=training)


@dataclasses.dataclass(frozen=True)
class HalvedScore:
    name = "halved_for_test"
    default_grouping = "shared"
    report_note = "half the model's output (a test score)."
    FILE = "halved.json"

    factor: float = 0.5

    @property
    def description(self) -> str:
        return f"{self.factor} times the model's output"

    def settings(self) -> dict:
        return {"factor": self.factor}

    def fit(self, model, batches=None, progress=None):
        return Halved(model, self.factor)

    def save(self, scorer, folder) -> list[str]:
        (pathlib.Path(folder) / self.FILE).write_text(json.dumps({"factor": scorer.factor}))
        return [self.FILE]

    def load(self, model, folder):
        saved = json.loads((pathlib.Path(folder) / self.FILE).read_text())
        return Halved(model, saved["factor"])


@dataclasses.dataclass(frozen=True)
class LowestK:
    """One threshold for all classes: the k-th smallest top score."""

    name = "lowest_k_for_test"
    refusal = rejection.UNFAMILIAR

    k: int = 3

    def calibrate(self, class_scores, labels, class_names=None) -> rules.Calibrated:
        top = np.sort(np.asarray(class_scores).max(1))
        return rules.Calibrated(np.full(np.shape(class_scores)[1], top[self.k - 1]), {
            "rule": self.name, "k": self.k, "counts": [len(top)] * np.shape(class_scores)[1],
            "promise": f"refuses the scores below the {self.k}-th smallest held-out one"})


@pytest.fixture()
def registered():
    """HalvedScore and LowestK in the registries for one test, as a module would put them."""
    scores.register(HalvedScore)
    rules.register(LowestK)
    yield
    del scores.SCORES.classes[HalvedScore.name], rules.RULES.classes[LowestK.name]


class _Trained:
    """The train stage's view, for an untrained network (the wiring is what is tested)."""

    def __init__(self, model):
        self.model = model

    def best(self):
        return self.model

    def selection(self, split):
        skip, limit = {"trained": (0, 256), "held_out": (59000, 1000)}[split]
        return {"skip": skip, "limit": limit}


def test_a_registered_score_and_rule_are_used_by_name(registered, fashion_ingest, tmp_path):
    """Nothing but the names: the calibrate stage fits, saves and thresholds with them, and
    the run directory loads the scorer through the score."""
    folder, _ = fashion_ingest
    keras.utils.set_random_seed(0)
    model = sdim_tf.SDIM(10, (32, 32, 1), rep_dim=8)
    section = dataclasses.replace(CalibrateConfig(), score=HalvedScore.name,
                                  unfamiliar_rule=LowestK.name, threshold_rule="shared",
                                  reject_budget=0.04, max_error=0)
    stage = tmp_path / "calibrate"
    stage.mkdir()
    outputs = calibrate.run(types.SimpleNamespace(calibrate=section), stage, {
        "ingest": Examples(folder), "train": _Trained(model)})
    assert sorted(outputs) == ["halved.json", "thresholds.json"]
    saved = json.loads((stage / "thresholds.json").read_text())
    assert saved["score"] == HalvedScore.name and saved["score_settings"] == {"factor": 0.5}
    images, _ = Examples(folder).arrays("train", skip=59000, limit=1000)
    top = np.sort(0.5 * model.predict(images, verbose=0).astype(np.float64).max(1))
    assert saved["deployed"]["percentile"] == LowestK.name
    assert saved["deployed"]["unfamiliar"]["k"] == 3 and saved["deployed"]["min_gap"] is None
    np.testing.assert_allclose(saved["percentiles"][LowestK.name]["thresholds"],
                               [top[2]] * 10, rtol=1e-5)
    calibration = Calibration(stage)
    assert calibration.score == HalvedScore()
    assert isinstance(calibration.scoring_model(model), Halved)


@pytest.fixture(scope="module")
def promised(tiny_run, tmp_path_factory):
    """The tiny run calibrated again with --max_error at three quarters of its error among
    the accepted held-out images, then evaluated and exported."""
    config, run_dir = tiny_run
    base = tmp_path_factory.mktemp("promised")
    for stage in ("ingest", "train"):
        shutil.copytree(run_dir / stage, base / "run" / stage)
    held_out = Run(run_dir).calibration.saved["deployed"]["held_out"]
    max_error = round(0.75 * (1 - held_out["accuracy_on_accepted"]), 3)
    changed = config.replace(run_dir=str(base / "run"), export_dir=str(base / "models"),
                             export_subset=True,
                             max_error=max_error, shift_images=50,
                             stages=("calibrate", "evaluate", "export"))
    run.run(changed)
    return Run(base / "run"), max_error


@pytest.fixture(scope="module")
def held_out_scores(promised):
    """The deployed score of the held-out images, and their labels."""
    run_view, _ = promised
    examples = run_view.calibration.saved["examples"]
    return rejection.class_scores(run_view.scoring_model(), run_view.examples.dataset(
        "train", examples["skip"], examples["limit"]))


def _numpy_decision(scores, thresholds, min_gap):
    top = np.sort(scores, 1)
    unfamiliar = ~(top[:, -1] >= thresholds[scores.argmax(1)])
    ambiguous = ~unfamiliar & ~(top[:, -1] - top[:, -2] >= min_gap)
    return unfamiliar, ambiguous


def test_thresholds_json_holds_both_thresholds_and_promises(promised, held_out_scores):
    run_view, max_error = promised
    saved, (scores_, labels) = run_view.calibration.saved, held_out_scores
    deployed = saved["deployed"]
    # the unfamiliar threshold: split conformal on the even held-out rows alone
    even = scores_[0::2].max(1)
    ks = np.arange(1, len(even) + 1)
    k = ks[stats.binom.sf(ks - 1, len(even), 0.04) >= 0.95].max()
    thresholds = np.asarray(saved["percentiles"]["conformal"]["thresholds"])
    np.testing.assert_allclose(thresholds, [np.sort(even)[k - 1]] * 10, rtol=1e-6)
    assert deployed["n"] == len(even) == 2500
    # the gap threshold: one of the odd rows' gaps, and on the odd rows that pass both the
    # error rate is within max_error
    odd, odd_labels = scores_[1::2], labels[1::2]
    ordered = np.sort(odd, 1)
    min_gap = deployed["min_gap"]
    assert min_gap > 0 and np.isclose(ordered[:, -1] - ordered[:, -2], min_gap).any()
    unfamiliar, ambiguous = _numpy_decision(odd, thresholds, min_gap)
    accepted = ~unfamiliar & ~ambiguous
    assert (odd.argmax(1) != odd_labels)[accepted].mean() <= max_error
    ambiguity = deployed["ambiguity"]
    assert ambiguity["rule"] == "ambiguous" and ambiguity["max_error"] == max_error
    assert ambiguity["promise"].startswith(f"at most {100 * max_error:g}% of the answers it "
                                           "gives are wrong, with 95% confidence")
    assert deployed["promise"].startswith("rejects at most 4% of images drawn like the 2500 "
                                          "calibration images")
    # what both cost on the held-out images, recomputed
    unfamiliar, ambiguous = _numpy_decision(scores_, thresholds, min_gap)
    cost = deployed["held_out"]
    assert cost["coverage"] == pytest.approx((~unfamiliar & ~ambiguous).mean())
    assert cost["unfamiliar"] == pytest.approx(unfamiliar.mean())
    assert cost["ambiguous"] == pytest.approx(ambiguous.mean()) and cost["ambiguous"] > 0
    assert cost["without_ambiguity"]["coverage"] == pytest.approx((~unfamiliar).mean())
    # the model card carries the same, as export reads it
    path = pathlib.Path(run_view.export.record()["path"])
    card = json.loads((path / "assets.extra" / "model_card.json").read_text())["rejection"]
    assert card["min_gap"] == min_gap and card["refusals"]["ambiguous"]["promise"] == \
        ambiguity["promise"]
    assert card["refusals"]["unfamiliar"]["promise"] == deployed["promise"]
    assert card["held_out"] == cost


@pytest.fixture(scope="module")
def both_reasons(promised, data_dir):
    """Test images the deployed model refuses as unfamiliar, as ambiguous and accepts (by
    numpy on the in-memory scores), 4 of each, as uint8 source images."""
    run_view, _ = promised
    images, _ = data.load_split("fashion_mnist", "test", str(data_dir))
    images = images[:1000]
    scores_, _ = rejection.class_scores(run_view.scoring_model(),
                                        data.image_batches(images))
    saved = run_view.calibration
    unfamiliar, ambiguous = _numpy_decision(scores_, saved.deployed()[1], saved.min_gap())
    groups = [np.flatnonzero(g)[:4] for g in (unfamiliar, ambiguous, ~unfamiliar & ~ambiguous)]
    assert all(len(g) == 4 for g in groups)
    return images[np.concatenate(groups)]


def test_signatures_and_predict_give_both_reasons(promised, both_reasons, tmp_path):
    run_view, _ = promised
    path = pathlib.Path(run_view.export.record()["path"])
    loaded = tf.saved_model.load(str(path))
    out = loaded.signatures["classify_raw"](images=tf.constant(both_reasons))
    scores_ = out["class_scores"].numpy().astype(np.float64)
    thresholds, min_gap = out["threshold"].numpy(), out["min_gap"].numpy()
    assert (min_gap == np.float32(run_view.calibration.min_gap())).all()
    ordered = np.sort(scores_, 1)
    np.testing.assert_allclose(out["gap"].numpy(), ordered[:, -1] - ordered[:, -2],
                               rtol=1e-5, atol=1e-4)
    unfamiliar = ~(out["score"].numpy() >= thresholds)
    ambiguous = ~unfamiliar & ~(out["gap"].numpy() >= min_gap)
    expected = np.where(unfamiliar, "unfamiliar", np.where(ambiguous, "ambiguous", ""))
    reasons = [r.decode() for r in out["reason"].numpy()]
    assert reasons == expected.tolist()
    assert reasons == ["unfamiliar"] * 4 + ["ambiguous"] * 4 + [""] * 4

    files = []
    for i, image in enumerate(both_reasons):
        files.append(tmp_path / f"{i:02d}.png")
        files[-1].write_bytes(tf.io.encode_png(image).numpy())
    predictor = predict.Predictor(path)
    predictions, errors = predict.predict(predictor, [str(f) for f in files], progress=False)
    predict.write(predictor, predictions, errors, tmp_path / "out", per_sheet=4)
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["reason"] for r in rows] == reasons
    assert [r["rejected"] for r in rows] == ["true"] * 8 + ["false"] * 4


def test_the_evaluation_report_counts_each_reason(promised):
    run_view, _ = promised
    report = run_view.evaluation.report()
    saved = run_view.calibration
    scores_, labels = rejection.class_scores(run_view.scoring_model(),
                                             run_view.examples.dataset("test"))
    unfamiliar, ambiguous = _numpy_decision(scores_, saved.deployed()[1], saved.min_gap())
    accepted = ~unfamiliar & ~ambiguous
    right = scores_.argmax(1) == labels
    test = report["deployed"]["test"]
    assert test["unfamiliar"] == pytest.approx(unfamiliar.mean())
    assert test["ambiguous"] == pytest.approx(ambiguous.mean()) and test["ambiguous"] > 0
    assert test["coverage"] == pytest.approx(accepted.mean())
    assert test["accuracy_on_accepted"] == pytest.approx(right[accepted].mean())
    assert test["silent_error"] == pytest.approx((accepted & ~right).mean())
    assert set(report["deployed"]["ood"]) == set(report["ood"])
    cell = report["shifts"]["corruptions"]["translate"]["3"]
    assert cell["rejected"] == pytest.approx(cell["unfamiliar"] + cell["ambiguous"])
    # every histogram draws the deployed thresholds, and the text quotes both refusals
    drawn = report["drawn_thresholds"]
    assert drawn and all(v == {"conformal": saved.saved["percentiles"]["conformal"] | {
        "counts": []}} for v in drawn.values())
    md = (run_view.evaluation.folder / "report.md").read_text()
    assert f"below {saved.min_gap():.4g}: {saved.promises()['ambiguous']}." in md
    assert "the conformal rule's thresholds (one shared by all classes" in md
    assert "Thresholds: per class" not in md
    assert "| test | 10000 | " + f"{100 * accepted.mean():.2f}%" in md


def test_a_preset_error_promise_is_left_out_where_held_out_images_cannot_support_it(caplog):
    """Scores of a model right about one time in ten: no gap keeps 2% wrong. The preset's
    promise is left out with a warning and the unfamiliar thresholds use every held-out
    image; a --max_error the user gave stops the run with the rule's reason."""
    from pipeline.config import ConfigError, PipelineConfig

    rng = np.random.default_rng(5)
    n, c = 2000, 10
    labels, class_scores = rng.integers(0, c, n), rng.normal(size=(n, c))
    names = [str(i) for i in range(c)]
    preset = PipelineConfig.from_flat().resolve().calibrate
    unfamiliar, ambiguity = preset.refusal_rules()
    chosen, gap, why = calibrate._calibrate(preset, class_scores, labels, unfamiliar, ambiguity,
                                            names)
    assert gap is None and why.startswith("ambiguous: no gap threshold keeps the error rate "
                                          "at most 2%")
    assert "deploying without the ambiguous refusal" in caplog.text
    # split conformal on all 2000 top scores: the k-th smallest, k the largest with
    # P(Binomial(2000, 0.04) >= k) >= 0.95
    k = max(j for j in range(1, n) if stats.binom.sf(j - 1, n, 0.04) >= 0.95)
    np.testing.assert_array_equal(chosen.thresholds,
                                  np.full(c, np.sort(class_scores.max(1))[k - 1]))
    required = PipelineConfig.from_flat(max_error=0.02).resolve().calibrate
    with pytest.raises(ConfigError, match=r"^calibrate: ambiguous: no gap threshold keeps the "
                       r"error rate at most 2% .* \(--validation_split=2000 held-out images\)$"):
        calibrate._calibrate(required, class_scores, labels, unfamiliar, ambiguity, names)


def test_deployed_outliers_are_built_from_held_out_rows_and_decided_by_the_rule(tiny_run,
                                                                               data_dir):
    """bench.deployed_outliers: the sets come from the run's first held-out images, and each
    is refused where the top class score is below its threshold (the tiny run has no
    min_gap), by numpy."""
    from bench import deployed_outliers
    from pipeline.run_dir import Run
    from sdim_tf import data

    _, run_dir = tiny_run
    run = Run(run_dir)
    held = run.model.selection("held_out")
    sets = deployed_outliers.outlier_sets(run, 40, 0, str(data_dir))
    images, _ = data.load_split("fashion_mnist", "train", str(data_dir))
    assert sets["inverted"].shape == (40, 32, 32, 1)
    np.testing.assert_allclose(1.0 - sets["inverted"], data.preprocess(
        images[held["skip"]:held["skip"] + 40]).numpy(), atol=1e-6)
    chosen = {k: sets[k] for k in ("inverted", "blend")}
    outcomes = deployed_outliers.refused(run, chosen)
    deployable = run.deployable()
    assert run.calibration.min_gap() is None
    for name, images_ in chosen.items():
        scores = deployable.class_scores(data.image_batches(images_))[0]
        top, predicted = scores.max(1), scores.argmax(1)
        below = top < deployable.thresholds.numpy()[predicted]
        assert outcomes[name]["rejected"] == pytest.approx(below.mean())
        assert outcomes[name]["ambiguous"] == 0
    with pytest.raises(ValueError, match=r"--outlier_images must be in \[1, 5000\], got 0"):
        deployed_outliers.outlier_sets(run, 0, 0, str(data_dir))


def test_step_rules_attack_held_out_images_the_deployed_rule_accepts_rightly(tiny_run,
                                                                            data_dir):
    """bench.step_rules: the first held-out training images (read from the IDX files) that
    the run classifies correctly and whose top class score clears its threshold (numpy; the
    tiny run has no min_gap), three times as many read as asked for."""
    from bench import step_rules

    _, run_dir = tiny_run
    run = Run(run_dir)
    deployable = run.deployable()
    images, labels, read = step_rules.held_out(run, deployable, 20)
    skip, _ = run.model.examples("held_out")
    raw, raw_labels = data.load_split("fashion_mnist", "train", str(data_dir))
    candidates = data.preprocess(raw[skip:skip + 60]).numpy()
    scores = deployable.class_scores(data.image_batches(candidates))[0]
    predicted = scores.argmax(1)
    kept = (predicted == raw_labels[skip:skip + 60]) & (
        scores.max(1) >= deployable.thresholds.numpy()[predicted])
    assert read == 60 and 0 < len(labels) == min(20, kept.sum())
    np.testing.assert_allclose(images, candidates[kept][:20], atol=1e-6)
    np.testing.assert_array_equal(labels, raw_labels[skip:skip + 60][kept][:20])
