"""Adversarial training (sdim_tf.robust) and its overfitting guard, against closed forms on
linear models and numpy references."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import sdim_tf
from pipeline.stages import train
from sdim_tf import overfitting_guard, robust


def _linear(weights, bias, policy):
    """A Keras linear scorer [N, 4, 4, 1] -> [N, C] under the dtype `policy`."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(weights.shape[1])])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.layers[-1].set_weights([weights, bias])
    return model


def _two_classes(seed=0, n=6):
    """Images inside [0.2, 0.8] (epsilon 0.1 never clips), two classes whose weights differ
    by at least 0.1 per pixel (bfloat16 keeps every sign)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.2, 0.8, (n, 4, 4, 1)).astype(np.float32)
    diff = rng.choice([-1.0, 1.0], 16) * rng.uniform(0.1, 1.0, 16)
    weights = np.stack([np.zeros(16), diff], axis=1).astype(np.float32)
    labels = np.arange(n) % 2
    return images, labels, weights


def test_margin_objective_is_best_wrong_minus_true():
    scores = np.array([[3.0, 1.0, 2.5], [-4.0, -1.0, -9.0], [0.0, 7.0, 7.5]], np.float32)
    labels = np.array([0, 1, 2])
    expected = [2.5 - 3.0, -4.0 - (-1.0), 7.0 - 7.5]
    np.testing.assert_allclose(robust.margin_objective(scores, labels), expected)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_pgd_reaches_the_linear_optimum(policy):
    """For a linear score the margin is linear in x: its maximum over the L-inf ball is the
    corner x + epsilon sign(w_wrong - w_true); PGD from a random start reaches it once its
    path (2.5 epsilon) exceeds the ball's diameter. The input gradient is float32 whatever
    the model computes in, so the steps land exactly on the grid."""
    images, labels, weights = _two_classes()
    model = _linear(weights, np.zeros(2, np.float32), policy)
    epsilon = 0.1
    x = robust.perturb(model, images, labels, epsilon, steps=4, step_size=2.5 * epsilon / 4)
    assert x.dtype == tf.float32
    direction = np.where(labels[:, None] == 0, 1.0, -1.0) * np.sign(weights[:, 1])
    expected = images + epsilon * direction.reshape(-1, 4, 4, 1)
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)


def test_fgsm_from_a_random_start_in_closed_form():
    """FGSM-RS: from start d0, one step of 1.25 epsilon along the sign, projected: per pixel
    min(d0 + 1.25 epsilon, epsilon) along the sign, the corner wherever the start is not
    more than 0.25 epsilon against it. At the image borders, the clip to [0, 1] holds."""
    images, labels, weights = _two_classes(seed=1)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 0.97, 0.02  # the clip to [0, 1] bites here
    model = _linear(weights, np.zeros(2, np.float32), "float32")
    epsilon = 0.1
    start = np.random.default_rng(2).uniform(-epsilon, epsilon, images.shape).astype(np.float32)
    settings = robust.RobustTraining(epsilon=epsilon, attack="fgsm")
    assert settings.iterations == 1 and settings.step == pytest.approx(0.125)
    x = robust.perturb(model, images, labels, epsilon, settings.iterations, settings.step,
                       start=tf.constant(start)).numpy()
    sign = (np.where(labels[:, None] == 0, 1.0, -1.0) * np.sign(weights[:, 1])).reshape(
        -1, 4, 4, 1)
    along = sign * start  # the start's component along the ascent direction
    delta = sign * np.minimum(along + 1.25 * epsilon, epsilon)
    expected = np.clip(images + delta, 0.0, 1.0)
    np.testing.assert_allclose(x, expected, atol=1e-6)
    corner = along >= -0.25 * epsilon
    assert 0.5 < corner.mean() < 0.8  # 62.5% expected
    np.testing.assert_allclose(np.abs(x - images)[corner & (images > 0.1) & (images < 0.9)],
                               epsilon, atol=1e-6)


def test_pgd_follows_the_best_wrong_class():
    """Three classes: the gradient is the best wrong class's weights minus the true
    class's; where one wrong class dominates, PGD ends at its corner."""
    rng = np.random.default_rng(3)
    images = rng.uniform(0.2, 0.8, (4, 4, 4, 1)).astype(np.float32)
    strong = rng.choice([-1.0, 1.0], 16) * rng.uniform(0.5, 1.0, 16)
    weights = np.stack([np.zeros(16), strong, 0.01 * strong[::-1]], 1).astype(np.float32)
    bias = np.array([0.0, 0.0, -50.0], np.float32)  # class 2 never the best wrong class
    model = _linear(weights, bias, "float32")
    labels = np.zeros(4, int)
    x = robust.perturb(model, images, labels, 0.05, steps=5, step_size=0.05)
    np.testing.assert_allclose(x.numpy(), images + 0.05 * np.sign(strong).reshape(4, 4, 1),
                               atol=1e-6)


def test_settings_validate_and_name_their_terms():
    assert not robust.RobustTraining().enabled
    pgd = robust.RobustTraining(epsilon=0.3, steps=6)
    assert pgd.step == pytest.approx(2.5 * 0.3 / 6) and pgd.iterations == 6
    assert robust.RobustTraining(epsilon=0.3, step_size=0.01).step == 0.01
    assert robust.RobustTraining(epsilon=0.1, mode="both").loss_names == (
        "adv_nll_loss", "adv_lm_loss", "adv_reject_loss", "adv_accuracy")
    assert robust.RobustTraining(epsilon=0.1, mode="reject").loss_names == (
        "adv_reject_loss", "adv_accuracy")
    for bad, message in [(dict(epsilon=-0.1), "epsilon must be >= 0"),
                         (dict(attack="cw"), "attack must be one of pgd, fgsm"),
                         (dict(mode="x"), "mode must be one of classify, reject, both"),
                         (dict(steps=0), "steps must be >= 1"),
                         (dict(weight=0), "weight must be > 0"),
                         (dict(clean=False, mode="both"),
                          "clean=False .* needs mode=classify, got mode='both'")]:
        with pytest.raises(ValueError, match=message):
            robust.RobustTraining(**bad)


def test_threat_model_from_a_runs_settings():
    """The model card's threat model, read back from the train stage's flat settings as a
    run directory keeps them."""
    from pipeline import run
    from pipeline.config import PipelineConfig
    stage = next(s for s in run.STAGES if s.name == "train")
    settings = run.stage_settings(stage, PipelineConfig.from_flat(
        dataset="mnist", robust_epsilon=0.1, robust_attack="fgsm", robust_mode="classify",
        robust_clean=False))
    threat = robust.RobustTraining.from_settings(settings).threat_model()
    # FGSM's step is 1.25 epsilon, one step
    assert threat["trained_against"] == {
        "norm": "linf", "epsilon": 0.1, "attack": "fgsm", "steps": 1,
        "step_size": pytest.approx(0.125), "mode": "classify",
        "objective": "the best wrong class's log p(x|c) over the true class's"}
    assert threat["statement"].startswith(
        "Trained against L-inf perturbations of at most 0.1 in [0, 1] pixels (FGSM, one step "
        "of 0.125 from a random start)")
    pgd = robust.RobustTraining.from_settings(run.stage_settings(stage, PipelineConfig.from_flat(
        dataset="mnist", robust_epsilon=0.3, robust_steps=6, robust_mode="both")))
    assert pgd.threat_model()["trained_against"]["step_size"] == pytest.approx(2.5 * 0.3 / 6)
    assert "PGD, 6 steps of 0.125" in pgd.threat_model()["statement"]
    # a standard run, and settings from before the robust flags: not trained against attacks
    for standard in (run.stage_settings(stage, PipelineConfig.from_flat(dataset="mnist")),
                     {"epochs": 3, "model": "sdim"}):
        threat = robust.RobustTraining.from_settings(standard).threat_model()
        assert threat["trained_against"] is None
        assert threat["statement"].startswith("Not trained against adversarial examples")


def test_training_inputs_beside_or_in_place_of_the_batch():
    """Off: the batch alone. On: the batch and its adversarial examples (the PGD corner of a
    linear model), or with clean=False these in place of the batch."""
    images, labels, weights = _two_classes(seed=7)
    model = _linear(weights, np.zeros(2, np.float32), "float32")
    off = robust.RobustTraining()
    x, extra = robust.training_inputs(off, model, images, labels)
    assert x is images and extra == {}
    corner = images + 0.1 * (np.where(labels[:, None] == 0, 1.0, -1.0)
                             * np.sign(weights[:, 1])).reshape(-1, 4, 4, 1)
    beside = robust.RobustTraining(epsilon=0.1, steps=4, mode="classify", clean=True)
    x, extra = robust.training_inputs(beside, model, images, labels)
    assert x is images and set(extra) == {"adversarial"}
    np.testing.assert_allclose(extra["adversarial"], corner, atol=1e-6)
    for instead in (robust.RobustTraining(epsilon=0.1, steps=4, mode="classify", clean=False),
                    robust.RobustTraining(epsilon=0.1, steps=4, mode="classify")):
        x, extra = robust.training_inputs(instead, model, images, labels)
        assert extra == {} and instead.loss_names == ()
        np.testing.assert_allclose(x, corner, atol=1e-6)


def test_the_preset_is_epsilon_alone():
    """`--robust_epsilon=E` alone: PGD, 3 steps of 2.5E/3 from a random start, the examples
    classified and scored below the clean images (mode both), beside the clean batch;
    classify trains on them in place of the batch by default (Madry et al.)."""
    from pipeline.config import PipelineConfig
    preset = PipelineConfig.from_flat(dataset="mnist", robust_epsilon=0.1).resolve().model.robust
    assert (preset.attack, preset.iterations, preset.mode) == ("pgd", 3, "both")
    assert preset.step == pytest.approx(2.5 * 0.1 / 3)
    assert preset.beside_clean and preset.loss_names == (
        "adv_nll_loss", "adv_lm_loss", "adv_reject_loss", "adv_accuracy")
    assert robust.RobustTraining(epsilon=0.1, mode="reject").beside_clean
    in_place = robust.RobustTraining(epsilon=0.1, mode="classify")
    assert not in_place.beside_clean and in_place.loss_names == ()
    assert robust.RobustTraining(epsilon=0.1, mode="classify", clean=True).beside_clean
    threat = preset.threat_model()["trained_against"]
    assert (threat["attack"], threat["steps"], threat["mode"]) == ("pgd", 3, "both")


def test_loss_terms_against_numpy():
    rng = np.random.default_rng(4)
    adversarial_ll = rng.normal(0, 5, (6, 3)).astype(np.float32)
    clean_ll = rng.normal(0, 5, (6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2])
    settings = robust.RobustTraining(epsilon=0.1, mode="both", weight=0.5, margin=2.0)
    added, terms = robust.loss_terms(settings, adversarial_ll, clean_ll, labels,
                                     lm_margin=3.0, beta=2.0, gamma=0.25)
    true = adversarial_ll[np.arange(6), labels]
    nll = -true.mean()
    false = np.ones((6, 3), bool)
    false[np.arange(6), labels] = False
    lm = np.mean([np.sum(np.maximum(adversarial_ll[i][false[i]] + 3.0 - true[i], 0) ** 2) / 2
                  for i in range(6)])
    reject = np.mean(np.maximum(adversarial_ll.max(1) + 2.0
                                - clean_ll[np.arange(6), labels], 0) ** 2)
    np.testing.assert_allclose(terms["adv_nll_loss"], nll, rtol=1e-6)
    np.testing.assert_allclose(terms["adv_lm_loss"], lm, rtol=1e-5)
    np.testing.assert_allclose(terms["adv_reject_loss"], reject, rtol=1e-5)
    np.testing.assert_allclose(added, 0.5 * (2.0 * nll + 0.25 * lm + reject), rtol=1e-5)
    np.testing.assert_allclose(terms["adv_accuracy"],
                               np.mean(adversarial_ll.argmax(1) == labels))
    # the reject term's reference is held: only the adversarial examples move
    clean = tf.Variable(clean_ll)
    with tf.GradientTape() as tape:
        _, terms = robust.loss_terms(settings, adversarial_ll, clean, labels, 3.0)
    assert tape.gradient(terms["adv_reject_loss"], clean) is None


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_train_step_smoke(policy):
    """A few SDIM training steps with adversarial training under tf.distribute in both
    precisions: finite losses, and the adversarial examples cost more than the clean
    images (averaged over the steps)."""
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8, filters=(8, 8, 16, 16),
                             robust=dict(epsilon=0.2, steps=3, mode="both"))
        model.compile()
        strategy = tf.distribute.get_strategy()
        step = train.make_train_step(model, strategy)
        rng = np.random.default_rng(5)
        images = rng.random((64, 32, 32, 1), np.float32)
        labels = np.arange(64) % 3
        data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
        logs = train.run_epoch(step, model, strategy, data, steps=4, progress=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert set(robust.RobustTraining(epsilon=1, mode="both").loss_names) < set(logs)
    assert all(np.isfinite(v) for v in logs.values())
    assert logs["adv_nll_loss"] > logs["nll_loss"]
    assert logs["adv_lm_loss"] > logs["lm_loss"]
    assert logs["adv_accuracy"] <= logs["accuracy"]
    np.testing.assert_allclose(logs["loss"], logs["mi_loss"] + logs["nll_loss"]
                               + logs["lm_loss"] + logs["adv_nll_loss"] + logs["adv_lm_loss"]
                               + logs["adv_reject_loss"], rtol=1e-4)


def test_collapse_rules():
    m = overfitting_guard.Measurement
    collapse = overfitting_guard.collapse
    assert collapse([], m(0.1, 0.0)) is None  # never robust yet: no collapse
    assert collapse([m(0.3, 0.1)], m(0.3, 0.02)) is None  # fell from below `least`
    assert collapse([m(0.6, 0.5), m(0.7, 0.6)], m(0.65, 0.55)) is None
    assert "fell below 0.5 x its best 0.600" in collapse([m(0.6, 0.5), m(0.7, 0.6)],
                                                         m(0.3, 0.29))
    assert "FGSM accuracy 0.900 exceeds PGD accuracy 0.500" in collapse([], m(0.9, 0.5))


def test_guard_measures_pgd_accuracy_and_catches_a_planted_collapse():
    """Two-class linear models, whose PGD accuracy at epsilon is in closed form: image i
    (class 0) stays right iff its margin b0 - b1 - w.x_i exceeds epsilon ||w||_1 (no clip:
    the images lie in [0.2, 0.8]). The planted collapse: the same bias, weights 10x."""
    rng = np.random.default_rng(6)
    images = rng.uniform(0.2, 0.8, (40, 4, 4, 1)).astype(np.float32)
    labels = np.zeros(40, int)
    diff = rng.uniform(0.05, 0.15, 16).astype(np.float32)  # w.x >= 0.2 ||w||_1
    flat = images.reshape(40, -1).astype(np.float64)
    bias = np.array([float(np.median(flat @ diff)) + 0.1 * np.abs(diff).sum(), 0.0],
                    np.float32)

    def robust_share(scale):  # the closed form
        w = scale * diff.astype(np.float64)
        return np.mean(bias[0] - flat @ w > 0.1 * np.abs(w).sum())

    model = _linear(np.stack([np.zeros(16), diff], 1).astype(np.float32), bias, "float32")
    guard = overfitting_guard.OverfittingGuard(model, images, labels, 0.1, pgd_steps=10,
                                               batch_size=16)
    measured, why = guard.check()
    assert 0.3 < robust_share(1) < 0.7
    assert measured.pgd_accuracy == pytest.approx(robust_share(1)) and why is None
    assert measured.fgsm_accuracy >= measured.pgd_accuracy
    model.layers[-1].set_weights([np.stack([np.zeros(16), 10 * diff], 1), bias])
    measured, why = guard.check()
    assert robust_share(10) == 0 and measured.pgd_accuracy == 0
    assert f"PGD accuracy 0.000 fell below 0.5 x its best {robust_share(1):.3f}" in why
    assert len(guard.history) == 2


class _Planted:
    def __init__(self, why):
        self.why = why

    def check(self):
        return overfitting_guard.Measurement(0.9, 0.1), self.why


def test_train_stage_ends_on_the_epoch_before_a_collapse():
    from pipeline.config import PipelineConfig

    fgsm = PipelineConfig.from_flat(dataset="mnist", robust_epsilon=0.1,
                                    robust_attack="fgsm").model.robust
    pgd = PipelineConfig.from_flat(dataset="mnist", robust_epsilon=0.1).model.robust
    columns = {"robust/fgsm_accuracy": 0.9, "robust/pgd_accuracy": 0.1}
    # after a good epoch the collapse is returned, for the loop to end on the epoch before
    assert train._check_guard(_Planted("FGSM wins"), fgsm, 3) == (columns, "FGSM wins")
    assert train._check_guard(_Planted(None), fgsm, 3) == (columns, None)
    # in the first epoch there is no good checkpoint: one line naming the remedy per attack
    with pytest.raises(train.TrainingError, match=r"catastrophic overfitting in epoch 1 "
                       r"\(FGSM wins, epsilon 0.1\), before any good checkpoint; .*"
                       r"--robust_attack=pgd"):
        train._check_guard(_Planted("FGSM wins"), fgsm, 1)
    with pytest.raises(train.TrainingError, match="more --robust_steps"):
        train._check_guard(_Planted("PGD fell"), pgd, 1)
    rejecting = PipelineConfig.from_flat(dataset="mnist", robust_epsilon=0.1,
                                         robust_mode="reject").model.robust
    assert train._check_guard(_Planted("FGSM wins"), rejecting, 1) == (columns, None)


def test_a_collapse_ends_training_on_the_last_good_epoch(tmp_path, data_dir, monkeypatch):
    """A planted collapse in epoch 2 of 3: the stage finishes with epoch 1's checkpoint as
    the last, state.json says why, and a rerun of the stage trains no further."""
    import hashlib

    from pipeline import artifacts, run, summary
    from pipeline.config import PipelineConfig
    from pipeline.run_dir import TrainedModel

    verdicts = iter([(overfitting_guard.Measurement(0.6, 0.5), None),
                     (overfitting_guard.Measurement(0.9, 0.1), "planted")])
    planted = types.SimpleNamespace(check=lambda: next(verdicts))
    monkeypatch.setattr(train, "_guard", lambda *args: planted)
    config = PipelineConfig.from_flat(
        dataset="mnist", data_dir=str(data_dir), run_dir=str(tmp_path / "run"), epochs=3,
        train_limit=256, batch_size=128, lr_schedule="constant", robust_epsilon=0.1,
        robust_steps=1, mixed_precision="float32", stages=("ingest", "train"))
    run_dir = run.run(config)
    trained = TrainedModel(run_dir / "train")
    state = trained.state()
    assert state["epoch"] == 1 and [row["epoch"] for row in state["history"]] == [1]
    assert state["stopped_early"] == {"epoch": 1, "collapsed_in": 2, "why": "planted",
                                      "robust/fgsm_accuracy": 0.9, "robust/pgd_accuracy": 0.1}
    last = trained.last_path.read_bytes()
    assert hashlib.sha256(last).hexdigest() == state["checkpoints"]["checkpoints/last.keras"]
    assert dict(summary.headline(run_dir))["trained against"] == (
        "L\u221e \u03b5 = 0.1 (PGD-1, --robust_mode=both; ended on epoch 1, robust accuracy "
        "collapsed in epoch 2; docs/robust.md)")
    (run_dir / "train" / artifacts.MANIFEST).unlink()  # the stage runs again and resumes
    run.run(config)
    assert trained.state()["epoch"] == 1 and trained.last_path.read_bytes() == last


def test_flags_validate_and_key_the_train_stage():
    from pipeline.config import ConfigError, PipelineConfig

    plain = PipelineConfig.from_flat(dataset="mnist").resolve()
    assert plain.model.flat(keyed_only=True)["robust_epsilon"] == 0
    on = PipelineConfig.from_flat(dataset="mnist", robust_epsilon=0.1,
                                  robust_mode="both").resolve()
    assert on.model.flat(keyed_only=True)["robust_mode"] == "both"
    in_place = PipelineConfig.from_flat(dataset="mnist", robust_epsilon=0.1,
                                        robust_mode="classify", robust_clean=False)
    assert in_place.resolve().model.flat(keyed_only=True)["robust_clean"] is False
    assert on.model.robust == robust.RobustTraining(epsilon=0.1, mode="both")
    for bad, message in [(dict(robust_epsilon=-1.0), "--robust_epsilon must be >= 0"),
                         (dict(robust_epsilon=0.1, robust_steps=0), "--robust_steps must be"),
                         (dict(robust_epsilon=0.1, model="discriminative"),
                          "--robust_epsilon=0.1 needs --model=sdim")]:
        with pytest.raises(ConfigError, match=message):
            PipelineConfig.from_flat(dataset="mnist", **bad).resolve()


def test_a_run_without_adversarial_training_ignores_the_robust_flags_in_its_key():
    """With --robust_epsilon=0 the other robust flags change nothing the train stage keys
    its cache and resume hash on; with adversarial training each of them does."""
    from pipeline import run
    from pipeline.config import PipelineConfig
    stage = next(s for s in run.STAGES if s.name == "train")

    def key(**flags):
        return run.stage_settings(stage, PipelineConfig.from_flat(dataset="mnist", **flags))

    others = [dict(robust_steps=7), dict(robust_clean=True),
              dict(robust_mode="classify", robust_clean=False), dict(robust_attack="fgsm"),
              dict(robust_mode="reject"), dict(robust_weight=2.0),
              dict(robust_margin=3.0), dict(robust_step_size=0.01)]
    for flags in others:
        assert key(**flags) == key(), flags
        assert key(robust_epsilon=0.1, **flags) != key(robust_epsilon=0.1), flags
    assert key(robust_epsilon=0.1) != key()


def test_train_stage_guard_resumes_its_history():
    """A resumed run's guard compares with the epochs already trained (history.csv rows);
    without adversarial training or held-out images there is none."""
    images, labels, weights = _two_classes(seed=8, n=300)
    model = _linear(weights, np.zeros(2, np.float32), "float32")
    watched = {"held_out": (images, labels)}
    rows = [{"epoch": 1, "robust/fgsm_accuracy": 0.7, "robust/pgd_accuracy": 0.6},
            {"epoch": 2, "loss": 1.0}]
    settings = robust.RobustTraining(epsilon=0.1)
    guard = train._guard(settings, 0, model, watched, rows)
    assert guard.history == [overfitting_guard.Measurement(0.7, 0.6)]
    assert guard.images.shape[0] == train.GUARD_IMAGES and guard.epsilon == 0.1
    assert train._guard(settings, 0, model, None, rows) is None
    assert train._guard(robust.RobustTraining(), 0, model, watched, rows) is None


def test_the_presets_export_and_attack_report_state_its_threat_model(tmp_path, data_dir):
    """One epoch of the preset on 512 real images through export and a small attack stage:
    the history holds the adversarial terms and the guard's figures, and the SavedModel's
    model card and the attack report state the threat model the flags asked for."""
    import csv
    import json
    from pathlib import Path

    from pipeline import artifacts, run, summary
    from pipeline.config import PipelineConfig
    from pipeline.run_dir import Run
    from pipeline.stages import attack

    config = PipelineConfig.from_flat(
        dataset="mnist", data_dir=str(data_dir), run_dir=str(tmp_path / "run"),
        epochs=1, train_limit=512, batch_size=128,
        shift_images=100, lr_schedule="constant", max_error=0, robust_epsilon=0.1,
        mixed_precision="float32",
        force_export=True, stages=("ingest", "train", "calibrate", "evaluate", "export",
                                   "attack"),
        attacks=("pgd_accepted_linf",), attack_images=4, attack_accepted_epsilons=(0.1,),
        attack_accepted_steps=3, attack_replay_images=4)
    run_dir = run.run(config)
    with open(run_dir / "train" / "history.csv") as f:
        (row,) = list(csv.DictReader(f))
    for name in ("adv_nll_loss", "adv_lm_loss", "adv_reject_loss", "adv_accuracy",
                 "robust/fgsm_accuracy", "robust/pgd_accuracy"):
        assert np.isfinite(float(row[name])), name
    assert 0.0 <= float(row["robust/pgd_accuracy"]) <= float(row["robust/fgsm_accuracy"]) + 0.1
    expected = {"norm": "linf", "epsilon": 0.1, "attack": "pgd", "steps": 3,
                "step_size": pytest.approx(2.5 * 0.1 / 3), "mode": "both",
                "objective": "the best wrong class's log p(x|c) over the true class's"}
    path = Path(Run(run_dir).export.record()["path"])
    card = json.loads((path / "assets.extra" / "model_card.json").read_text())
    assert card["threat_model"]["trained_against"] == expected
    assert card["threat_model"]["statement"].startswith(
        "Trained against L-inf perturbations of at most 0.1 in [0, 1] pixels (PGD, 3 steps "
        f"of {2.5 * 0.1 / 3:g} from a random start)")
    assert card["training"]["robust_epsilon"] == 0.1
    report = artifacts.read_json(run_dir / "attack" / attack.REPORT_JSON)
    assert report["threat_model"] == card["threat_model"]
    markdown = (run_dir / "attack" / "attack_report.md").read_text()
    assert f"Threat model of the training: {card['threat_model']['statement']}" in markdown
    # the run's headline (console, README) says what it was trained and attacked with
    figures = dict(summary.headline(run_dir))
    assert figures["trained against"] == (
        "L\u221e \u03b5 = 0.1 (PGD-3, --robust_mode=both; docs/robust.md)")
    (rate,) = report["worst_case"]["sdim"]["linf"]["undetected_success"]
    assert figures["attacker who knows the rule (sdim)"] == (
        f"accepted and wrong: {100 * rate:.2f}% at 0.1 (L\u221e \u03b5, worst case over 1 "
        "attack(s), 4 test images)")
    assert "attacker who knows the rule (sdim)" in (run_dir / "README.md").read_text()
    # the SavedModel answers as the in-memory network it was exported from
    loaded = tf.saved_model.load(str(path))
    images, _ = Run(run_dir).examples.arrays("test", limit=16)
    served = loaded.signatures["serving_default"](images=tf.constant(images))
    deployable = Run(run_dir).deployable()
    np.testing.assert_array_equal(served["class_ids"].numpy(),
                                  deployable.model.predict(images, verbose=0).argmax(-1))
