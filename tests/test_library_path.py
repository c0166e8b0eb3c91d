"""The library path of docs/development.md, from `model.fit` to a calibrated rejecting
SavedModel, on a tiny SDIM trained for a few steps on real Fashion-MNIST images; the
SavedModel loaded back answers as the object in memory."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import sdim_tf
from sdim_tf import data, publish, rejection, rules, scores, serving


def _batches(images, labels, batch_size=256):
    return tf.data.Dataset.from_tensor_slices((data.preprocess(images), labels)).batch(
        batch_size)


@pytest.fixture(scope="module")
def deployed(data_dir, tmp_path_factory):
    keras.utils.set_random_seed(0)
    images, labels = data.load_split("fashion_mnist", "train", str(data_dir))
    train, held_out = slice(0, 3072), slice(3072, 5072)
    train_ds = _batches(images[train], labels[train], 64)

    # The sequence of docs/development.md ("The library"), with a small network and one epoch.
    model = sdim_tf.SDIM(num_classes=10, input_shape=(32, 32, 1), filters=(8, 16, 32, 64),
                         rep_dim=16)
    model.compile()
    model.fit(train_ds, epochs=1, verbose=0)
    score = scores.get("feature_density")()
    scorer = score.fit(model, _batches(images[train], labels[train]))
    class_scores, held_out_labels = rejection.class_scores(
        scorer, _batches(images[held_out], labels[held_out]))
    unfamiliar, ambiguous = rules.calibrate_both(
        class_scores, held_out_labels, rules.SplitConformal(alpha=0.04, confidence=0.95),
        rules.Ambiguous(max_error=0.15, confidence=0.95))
    classifier = serving.RejectingClassifier(scorer, unfamiliar.thresholds, channels=1,
                                             source_size=(28, 28),
                                             min_gap=ambiguous.thresholds)
    path = publish.export(classifier, tmp_path_factory.mktemp("saved_models"), "tiny")
    return classifier, path, unfamiliar, ambiguous, (class_scores, held_out_labels)


def test_saved_model_answers_as_in_memory(deployed, data_dir):
    classifier, path, unfamiliar, ambiguous, _ = deployed
    test_images, test_labels = data.load_split("fashion_mnist", "test", str(data_dir))
    raw = test_images[:256]
    loaded = tf.saved_model.load(str(path))
    inputs = {"serving_default": data.preprocess(raw), "classify_raw": tf.constant(raw),
              "classify_encoded": tf.constant([tf.io.encode_png(i).numpy() for i in raw])}
    for name, images in inputs.items():
        got = loaded.signatures[name](images=images)
        expected = getattr(classifier, name)(images)
        assert set(got) == set(expected)
        for key in ("class_ids", "rejected", "reason"):
            np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy(), key)
        # the export computes on the folded encoder: float32 rounding of sums as large as
        # the biggest score, so the tolerance scales with it
        for key in ("class_scores", "score", "gap"):
            reference = expected[key].numpy()
            np.testing.assert_allclose(got[key].numpy(), reference, rtol=0,
                                       atol=1e-5 * np.abs(reference).max())
        np.testing.assert_array_equal(got["threshold"].numpy(),
                                      unfamiliar.thresholds.astype(np.float32)[
                                          got["class_ids"].numpy()])
        np.testing.assert_array_equal(got["min_gap"].numpy(),
                                      np.float32(ambiguous.thresholds))
    out = {k: v.numpy() for k, v in loaded.signatures["serving_default"](
        images=inputs["serving_default"]).items()}
    reasons = out["reason"].astype(str)
    # the decision from the outputs alone: unfamiliar first, then ambiguous
    unfamiliar_rows = ~(out["score"] >= out["threshold"])
    ordered = np.sort(out["class_scores"], 1)
    np.testing.assert_array_equal(out["gap"], ordered[:, -1] - ordered[:, -2])
    ambiguous_rows = ~unfamiliar_rows & ~(out["gap"] >= out["min_gap"])
    np.testing.assert_array_equal(reasons == "unfamiliar", unfamiliar_rows)
    np.testing.assert_array_equal(reasons == "ambiguous", ambiguous_rows)
    np.testing.assert_array_equal(out["rejected"], unfamiliar_rows | ambiguous_rows)
    assert unfamiliar_rows.any() and ambiguous_rows.any() and not out["rejected"].all()
    accepted = ~out["rejected"]
    errors = (out["class_ids"][accepted] != test_labels[:256][accepted]).mean()
    assert errors <= 0.15, errors


def test_records_state_the_promises(deployed):
    _, _, unfamiliar, ambiguous, (class_scores, labels) = deployed
    json.dumps([unfamiliar.record, ambiguous.record])
    assert unfamiliar.record["n"] == 1000  # the even half of 2000 held-out images
    assert unfamiliar.promise.startswith("rejects at most 4% of images drawn like the 1000 "
                                         "calibration images, with 95% confidence")
    assert ambiguous.promise.startswith("at most 15% of the answers it gives are wrong, with "
                                        "95% confidence")
    # on its own (odd) half: the images it accepted, counted again
    odd = np.arange(1, len(labels), 2)
    decision = rejection.decide(class_scores[odd], unfamiliar.thresholds,
                                min_gap=ambiguous.thresholds)
    accepted = ~decision.rejected.numpy()
    assert accepted.sum() == ambiguous.record["accepted"]
    assert (decision.class_ids.numpy()[accepted] != labels[odd][accepted]).sum() == \
        ambiguous.record["errors"]


def test_without_min_gap_nothing_is_ambiguous(deployed, data_dir):
    classifier, _, unfamiliar, _, _ = deployed
    plain = serving.RejectingClassifier(classifier.model, unfamiliar.thresholds, 1, (28, 28))
    images, _ = data.load_split("fashion_mnist", "test", str(data_dir))
    out = plain.serving_default(data.preprocess(images[:256]))
    rejected = out["rejected"].numpy()
    np.testing.assert_array_equal(rejected, ~(out["score"].numpy() >= out["threshold"].numpy()))
    assert set(out["reason"].numpy()[rejected]) == {b"unfamiliar"}
    assert set(out["reason"].numpy()[~rejected]) == {b""}
    assert np.isneginf(out["min_gap"].numpy()).all()

