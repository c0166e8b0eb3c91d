"""The run directory's contract: damaged or unsafe artifacts are refused with the file named."""

import json

import keras
import numpy as np
import pytest

from pipeline import artifacts
from pipeline.run_dir import (
    ArtifactError,
    Calibration,
    Examples,
    Run,
    TrainedModel,
    load_checkpoint,
)
from tests.references import whitened_scores

NAMES = ["a", "b", "c"]


def _calibration(folder, **changes):
    saved = {"score": "feature_density", "density_layers": ["z"], "class_names": NAMES,
             "threshold_rule": "shared", "deployed": {"percentile": "3.5", "rule": "r"},
             "percentiles": {"1": {"thresholds": [1.0, 2.0, None], "counts": [5, 5, 0]},
                             "3.5": {"thresholds": [3.0, 3.0, 3.0], "counts": [5, 5, 0]}}}
    saved.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / Calibration.THRESHOLDS).write_text(json.dumps(saved))
    return Calibration(folder)


def test_a_valid_calibration_loads(tmp_path):
    calibration = _calibration(tmp_path / "calibrate")
    percentile, thresholds = calibration.deployed()
    assert percentile == 3.5 and thresholds.tolist() == [3.0, 3.0, 3.0]
    assert calibration.percentiles()[1]["thresholds"].tolist() == [1.0, 2.0, np.inf]


@pytest.mark.parametrize("changes, message", [
    ({"score": "magic"}, "unknown score 'magic'"),
    ({"deployed": {"percentile": "7", "rule": "r"}}, "deployed percentile 7 not calibrated"),
    ({"percentiles": {"3.5": {"thresholds": [1.0, 2.0], "counts": [1, 1]}}},
     "thresholds must be 3 numbers"),
    ({"percentiles": {"3.5": {"thresholds": [1.0, "NaN", 2.0], "counts": [1, 1, 1]}}},
     "thresholds must be 3 numbers"),
    ({"density_layers": None}, "no density_layers"),
    ({"percentiles": "none"}, "is not a calibration"),
])
def test_an_invalid_calibration_is_named(tmp_path, changes, message):
    calibration = _calibration(tmp_path / "calibrate", **changes)
    with pytest.raises(ArtifactError, match=message) as error:
        calibration.deployed()
    assert "thresholds.json" in str(error.value)


def test_density_parameters_are_checked_and_read_without_pickle(tmp_path):
    import sdim_tf
    from sdim_tf import scores

    calibration = _calibration(tmp_path / "calibrate")
    classifier = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=4)
    path = tmp_path / "calibrate" / scores.FeatureDensityScore.FILE
    good = {"z/means": np.zeros((3, 4), np.float32),
            "z/precision_factor": np.eye(4, dtype=np.float32)}
    np.savez(path, **good)
    assert tuple(calibration.scoring_model(classifier).layer_names) == ("z",)
    for bad in ({**good, "z/means": np.zeros((2, 4))},
                {**good, "z/precision_factor": np.full((4, 4), np.nan)},
                {"z/means": good["z/means"]}):
        np.savez(path, **bad)
        with pytest.raises(ArtifactError, match="density.npz: layer z"):
            calibration.scoring_model(classifier)
    np.savez(path, **{"z/means": np.array([{"a": 1}], dtype=object),
                      "z/precision_factor": np.eye(4)})
    with pytest.raises(ArtifactError, match="density.npz cannot be read"):
        calibration.scoring_model(classifier)


def test_a_calibration_without_ambiguity_or_score_settings_still_loads(tmp_path):
    """thresholds.json written before the second refusal and the scores' own settings: no
    min_gap (no answer refused as ambiguous), the density's settings from its own keys."""
    from sdim_tf import scores

    calibration = _calibration(tmp_path / "old", density_split=True)
    assert calibration.min_gap() is None
    assert calibration.score == scores.FeatureDensityScore(layers=("z",), split=True)
    assert calibration.promises() == {"unfamiliar": None, "ambiguous": None}
    with pytest.raises(ArtifactError, match="does not record its rules' settings"):
        calibration.rules()
    deployed = {"percentile": "3.5", "rule": "conformal", "min_gap": 2.5,
                "promise": "rejects at most 4%", "unfamiliar": {
                    "rule": "conformal", "alpha": 0.04, "confidence": None,
                    "grouping": "shared", "counts": [5, 5, 5], "promise": "rejects at most 4%"},
                "ambiguity": {"rule": "ambiguous", "max_error": 0.05, "confidence": 0.9,
                              "promise": "at most 5% wrong"}}
    new = _calibration(tmp_path / "new", score="model", score_settings={}, deployed=deployed)
    assert new.min_gap() == 2.5 and new.score == scores.ModelScore()
    assert new.promises() == {"unfamiliar": "rejects at most 4%",
                              "ambiguous": "at most 5% wrong"}
    from sdim_tf import rules

    assert new.rules() == (rules.SplitConformal(alpha=0.04, confidence=None),
                           rules.Ambiguous(max_error=0.05, confidence=0.9))
    # a preset error promise the held-out images could not support: none, and why
    left_out = {**deployed, "min_gap": None, "ambiguity": None,
                "ambiguity_unsupported": "ambiguous: no gap threshold keeps 2%"}
    assert _calibration(tmp_path / "left_out", deployed=left_out).promises() == {
        "unfamiliar": "rejects at most 4%", "ambiguous": "none (ambiguous: no gap threshold "
                                                         "keeps 2%)"}
    bad = _calibration(tmp_path / "bad", deployed={**deployed, "min_gap": "wide"})
    with pytest.raises(ArtifactError, match="deployed min_gap must be a number or null"):
        bad.deployed()


@pytest.mark.parametrize("changes, split", [({}, False), ({"density_split": False}, False),
                                            ({"density_split": True}, True)])
def test_the_scoring_model_follows_density_split(tmp_path, changes, split):
    """A calibration written before split terms existed (no key) keeps the joint score."""
    import sdim_tf

    calibration = _calibration(tmp_path / "calibrate", **changes)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 8)).astype(np.float32)
    factor = np.tril(rng.normal(size=(8, 8))) + 4 * np.eye(8)
    np.savez(tmp_path / "calibrate" / "density.npz",
             **{"z/means": means, "z/precision_factor": factor.astype(np.float32)})
    classifier = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8)
    scorer = calibration.scoring_model(classifier)
    assert scorer.split is split
    images = rng.uniform(0, 1, (4, 32, 32, 1)).astype(np.float32)
    z = classifier.encoder.features(images, training=False)["z"].numpy()
    expected = whitened_scores(z.astype(np.float64), means.astype(np.float64),
                               factor.astype(np.float32).astype(np.float64))
    got = scorer.predict(images, verbose=0)
    if split:
        assert not np.allclose(got, expected, rtol=1e-3)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_a_checkpoint_carrying_code_is_refused(tmp_path):
    """Keras safe mode: a Lambda layer's bytecode is never run on load."""
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ArtifactError, match="lambda.keras cannot be loaded"):
        load_checkpoint(path)


def test_missing_and_corrupt_metadata_are_named(tmp_path):
    with pytest.raises(ArtifactError, match="metadata.json is missing"):
        Examples(tmp_path).num_classes  # noqa: B018 - reading it is the test
    (tmp_path / Examples.METADATA).write_text("{not json")
    with pytest.raises(ArtifactError, match="metadata.json cannot be read"):
        Examples(tmp_path).num_classes  # noqa: B018 - reading it is the test
    artifacts.write_json(tmp_path / Examples.METADATA, {"num_classes": 3})
    with pytest.raises(ArtifactError, match="lacks"):
        Examples(tmp_path).num_classes  # noqa: B018 - reading it is the test


def test_schema_version_is_checked(tmp_path):
    run = Run(tmp_path)
    run.examples.folder.mkdir()
    artifacts.write_json(run.examples.folder / artifacts.MANIFEST, {"schema_version": 99})
    with pytest.raises(ArtifactError, match="schema version 99"):
        run.examples.check_schema()
    artifacts.write_json(run.examples.folder / artifacts.MANIFEST, {})  # before it was recorded
    with pytest.raises(ArtifactError, match="schema version 1, this code reads 2"):
        run.examples.check_schema()
    artifacts.write_json(run.examples.folder / artifacts.MANIFEST, {"schema_version": 2})
    run.examples.check_schema()


def _old_training(root):
    """A train stage written under schema 1: a checkpoint, and a state.json that records no
    schema version, as that schema's did."""
    trained = TrainedModel(root / "train")
    trained.best_path.parent.mkdir(parents=True)
    trained.best_path.write_bytes(b"three epochs of training")
    artifacts.write_json(trained.folder / TrainedModel.STATE, {"epoch": 3, "resume_hash": "x"})
    return trained


def test_a_run_directory_of_another_schema_is_refused_in_one_line(tmp_path):
    from pipeline import run
    from pipeline.config import PipelineConfig

    trained = _old_training(tmp_path / "run")  # killed: state.json, no manifest
    config = PipelineConfig.from_flat(run_dir=str(tmp_path / "run"), stages=("train",))
    message = (f"{tmp_path / 'run'} was written under run-directory schema 1, this code reads 2: "
               "rerun with --force to rebuild it (train starts afresh), or pass a new --run_dir")
    with pytest.raises(ArtifactError) as refused:
        run.run(config)
    assert str(refused.value) == message
    assert trained.best_path.read_bytes() == b"three epochs of training"  # kept
    (trained.folder / TrainedModel.STATE).unlink()  # a finished stage: its manifest
    artifacts.write_json(trained.folder / artifacts.MANIFEST, {"stage": "train"})
    with pytest.raises(ArtifactError, match="schema 1, this code reads 2"):
        run.run(config)


def test_the_train_stage_never_starts_over_a_model_of_another_schema(tmp_path):
    from pipeline import checkpoints
    from pipeline.config import TrainConfig

    trained = _old_training(tmp_path)
    with pytest.raises(checkpoints.TrainingError, match=r"state\.json was written under "
                       r"run-directory schema 1, this code reads 2: rerun with --force"):
        checkpoints.resume_state(trained, TrainConfig(), lambda **changes: "x")
    assert trained.best_path.read_bytes() == b"three epochs of training"
    # --force: afresh, on purpose
    assert checkpoints.resume_state(trained, TrainConfig(fresh=True), lambda **c: "x") is None
