"""The opt-in attack stage on the tiny run's SDIM: outputs checked against the model itself."""

import dataclasses
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import artifacts, run
from pipeline.config import ConfigError
from pipeline.run_dir import Run
from pipeline.stages import attack

SMALL = dict(attack_images=4, attack_epsilons=(0.0, 0.3), attack_pgd_steps=2,
             attack_deepfool_steps=5, attack_boundary_steps=5, attack_local_search_rounds=3,
             attack_cw_images=1, attack_cw_confidences=(0.0, 50.0), attack_cw_steps=3,
             attack_cw_search_steps=2)


@pytest.fixture(scope="module")
def attacked(tiny_run, tmp_path_factory):
    config, run_dir = tiny_run
    copy = tmp_path_factory.mktemp("attack") / "run"
    shutil.copytree(run_dir, copy)
    config = dataclasses.replace(config, run_dir=str(copy), stages=("attack",), **SMALL)
    run.run(config)
    return config, copy


def test_attack_report_agrees_with_the_model(attacked):
    config, run_dir = attacked
    stage = run_dir / "attack"
    manifest = artifacts.read_json(stage / artifacts.MANIFEST)
    for output in manifest["outputs"]:
        assert (stage / output).exists()
    report = artifacts.read_json(stage / attack.REPORT_JSON)
    assert report["settings"]["images"] == 4 and report["settings"]["cw_confidences"] == [0, 50]
    model = Run(run_dir).scoring_model()  # what is deployed and attacked
    images, labels = Run(run_dir).examples.arrays("test", limit=200)
    logits = model.predict(images, verbose=0)
    # the epsilon = 0 point of each curve is the clean accuracy of the first 4 test images
    for curve in report["curves"].values():
        assert curve["sdim"][0] == float((logits[:4].argmax(1) == labels[:4]).mean())
    correct = np.flatnonzero(logits.argmax(1) == labels)[:4]
    thresholds = Run(run_dir).calibration.percentiles()
    for name in ("deepfool", "boundary", "local_search", "cw_l2_k0", "cw_l2_k50"):
        summary = artifacts.read_json(stage / attack.PARTS / f"{name}.json")["summary"]
        with np.load(stage / attack.PARTS / f"{name}.npz") as arrays:
            adv, success = arrays["adversarial"], arrays["success"]
            targets = arrays["targets"] if "targets" in arrays.files else None
        predicted = model.predict(adv, verbose=0)
        if targets is None:
            assert len(adv) == 4
            np.testing.assert_array_equal(success, predicted.argmax(1) != labels[correct])
        else:
            assert len(adv) == 9  # one image towards the 9 other classes
            gap = predicted[np.arange(9), targets] - np.where(
                np.eye(10, dtype=bool)[targets], -np.inf, predicted).max(1)
            kappa = float(name.split("_k")[1])
            np.testing.assert_array_equal(success, (gap > 0) & (gap >= kappa))
        assert summary["success_rate"] == pytest.approx(success.mean())
        assert np.all(adv >= 0) and np.all(adv <= 1)
        for p, v in thresholds.items():
            kept = predicted[success]
            top = kept.argmax(1)
            expected = (kept.max(1) < v["thresholds"][top]).mean() if success.any() else None
            assert summary["detection_rate"][str(p)] == pytest.approx(expected, abs=1e-6)
    md = (stage / attack.REPORT_MD).read_text()
    assert "Table 5" in md and "Table 7" in md and "98.00%" in md
    with Image.open(stage / attack.CURVES_PNG) as png:
        assert png.size == (int(4.2 * 2 * 90), int(3.2 * 90))
    with Image.open(stage / attack.EXAMPLES_PNG) as png:
        assert png.size[0] > 400 and png.size[1] > 200


def test_attack_stage_resumes_from_finished_attacks(attacked):
    config, run_dir = attacked
    parts = run_dir / "attack" / attack.PARTS
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    (parts / "boundary.json").unlink()
    report = artifacts.read_json(run_dir / "attack" / attack.REPORT_JSON)
    run.run(dataclasses.replace(config, force=True))
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert after["boundary.json"] != kept["boundary.json"]
    assert {k: v for k, v in after.items() if k != "boundary.json"} == {
        k: v for k, v in kept.items() if k != "boundary.json"}
    again = artifacts.read_json(run_dir / "attack" / attack.REPORT_JSON)
    assert again["untargeted"]["deepfool"] == report["untargeted"]["deepfool"]
    # a changed cap reruns only the attack it belongs to
    run.run(dataclasses.replace(config, attack_boundary_steps=6))
    changed = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert changed["boundary.json"] != after["boundary.json"]
    assert {k: v for k, v in changed.items() if k != "boundary.json"} == {
        k: v for k, v in after.items() if k != "boundary.json"}


def test_attack_baseline_must_be_a_discriminative_run(attacked):
    config, run_dir = attacked
    with pytest.raises(ConfigError, match="expected discriminative"):
        run.run(dataclasses.replace(config, attack_baseline=str(run_dir), force=True))
    with pytest.raises(ConfigError, match="no finished train stage"):
        run.run(dataclasses.replace(config, attack_baseline=os.fspath(run_dir / "nothing"),
                                    force=True))
    with pytest.raises(ConfigError, match=r"--attacks: unknown \['jsma'\]"):
        run.run(dataclasses.replace(config, attacks=("jsma",)))
