"""The opt-in attack stage on the tiny run's SDIM: outputs checked against the model itself."""

import os
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import artifacts, faults, run
from pipeline.config import ConfigError, PipelineConfig
from pipeline.run_dir import Run
from pipeline.stages import attack
from sdim_tf import adversarial, rejection, scores

SMALL = dict(attack_images=4, attack_epsilons=(0.0, 0.3), attack_pgd_steps=2,
             attack_deepfool_steps=5, attack_boundary_images=3, attack_boundary_steps=5,
             attack_local_search_images=3, attack_local_search_rounds=3, attack_cw_images=1,
             attack_cw_steps=3, attack_cw_search_steps=2, attack_accepted_epsilons=(0.3, 1.0),
             attack_accepted_l2_epsilons=(1.0, 4.0), attack_accepted_steps=5,
             attack_square_images=2, attack_square_queries=20, attack_replay_images=5)


@pytest.fixture(scope="module")
def attacked(tiny_run, tmp_path_factory):
    config, run_dir = tiny_run
    copy = tmp_path_factory.mktemp("attack") / "run"
    shutil.copytree(run_dir, copy)
    config = config.replace(run_dir=str(copy), stages=("attack",), **SMALL)
    run.run(config)
    return config, copy


@pytest.fixture(scope="module")
def deployed(attacked):
    """The in-memory deployable, the report, and the first test images with their scores."""
    _, run_dir = attacked
    deployable = Run(run_dir).deployable()
    report = artifacts.read_json(run_dir / "attack" / attack.REPORT_JSON)
    images, labels = Run(run_dir).examples.arrays("test", limit=report["clean"]["sdim"]["images"])
    scores = deployable.model.predict(images, verbose=0)
    return deployable, Run(run_dir).calibration.deployed()[1], report, images, labels, scores


def _sets(run_dir):
    folder = run_dir / "attack" / attack.SETS
    return {p.stem: dict(np.load(p)) for p in sorted(folder.glob("*.npz"))}


def _undetected(deployable, thresholds, adv, labels):
    """Wrong and accepted by the deployed rule, per row of `adv` ([N, ...] or [E, N, ...])."""
    flat = adv.reshape(-1, *adv.shape[-3:])
    scores = deployable.model.predict(flat, verbose=0).reshape(*adv.shape[:-3], -1)
    return np.stack([adversarial.undetected_success(s, labels, thresholds)
                     for s in scores.reshape(-1, *scores.shape[-2:])]).reshape(adv.shape[:-3])


def test_attack_report_agrees_with_the_model(attacked, deployed):
    config, run_dir = attacked
    _, _, report, images, labels, logits = deployed
    stage = run_dir / "attack"
    manifest = artifacts.read_json(stage / artifacts.MANIFEST)
    for output in manifest["outputs"]:
        assert (stage / output).exists()
    assert set(manifest["inputs"]) == {"ingest", "train", "calibrate", "export"}
    assert report["settings"]["images"] == 4 and report["settings"]["boundary_images"] == 3
    # the epsilon = 0 point of each curve is the clean accuracy of the first 4 test images
    for curve in report["curves"].values():
        assert curve["sdim"][0] == float((logits[:4].argmax(1) == labels[:4]).mean())
    thresholds = Run(run_dir).calibration.percentiles()
    for name in ("deepfool", "boundary", "local_search", *(
            f"cw_l2_k{k}" for k in report["cw_l2"])):
        summary = artifacts.read_json(stage / attack.PARTS / f"{name}.json")["summary"]
        with np.load(stage / attack.PARTS / f"{name}.npz") as arrays:
            adv, success = arrays["adversarial"], arrays["success"]
            targets = arrays["target"] if "target" in arrays.files else None
            attacked_labels = arrays["label"]
        predicted = deployed[0].model.predict(adv, verbose=0)
        if targets is None:
            assert len(adv) == (4 if name == "deepfool" else 3)
            np.testing.assert_array_equal(success, predicted.argmax(1) != attacked_labels)
        else:
            assert len(adv) == 9  # one image towards the 9 other classes
            gap = predicted[np.arange(9), targets] - np.where(
                np.eye(10, dtype=bool)[targets], -np.inf, predicted).max(1)
            kappa = summary["kappa"]
            np.testing.assert_array_equal(success, (gap > 0) & (gap >= kappa))
        assert summary["success_rate"] == pytest.approx(success.mean())
        assert np.all(adv >= 0) and np.all(adv <= 1)
        for p, v in thresholds.items():
            kept = predicted[success]
            top = kept.argmax(1)
            expected = (kept.max(1) < v["thresholds"][top]).mean() if success.any() else None
            assert summary["detection_rate"][str(p)] == pytest.approx(expected, abs=1e-6)
    md = (stage / attack.REPORT_MD).read_text()
    for text in ("Table 5", "Table 7", "98.00%", "undetected success", "Sanity checks",
                 "Adaptive attacks", "Clean: sdim rejects"):
        assert text in md
    with Image.open(stage / attack.CURVES_PNG) as png:
        assert png.size == (int(4.2 * 2 * 90), int(3.2 * 90))
    with Image.open(stage / attack.UNDETECTED_PNG) as png:
        assert png.size == (int(5.0 * 2 * 90), int(3.4 * 90))  # the L-inf and L2 panels
    with Image.open(stage / attack.EXAMPLES_PNG) as png:
        assert png.size[0] > 400 and png.size[1] > 200


def test_attacked_set_is_correct_and_accepted(attacked, deployed):
    _, run_dir = attacked
    deployable, thresholds, report, images, labels, scores = deployed
    decision = rejection.decide(scores, thresholds)
    rejected = decision.rejected.numpy()
    clean = report["clean"]["sdim"]
    assert clean["rejected"] == pytest.approx(rejected.mean())
    assert clean["accuracy"] == pytest.approx((scores.argmax(1) == labels).mean())
    expected = np.flatnonzero((decision.class_ids.numpy() == labels) & ~rejected)
    assert clean["attackable"] == len(expected) and report["first_image"]["index"] == expected[0]
    sets = _sets(run_dir)
    for name, count in (("deepfool", 4), ("boundary", 3), ("pgd_accepted_linf_sdim", 4),
                        ("square_accepted", 2)):
        np.testing.assert_array_equal(sets[name]["original"], images[expected[:count]])
        np.testing.assert_array_equal(sets[name]["label"], labels[expected[:count]])
    # CW: the first image towards each other class
    cw = sets["cw_accepted"]
    np.testing.assert_array_equal(cw["original"], np.repeat(images[expected[:1]], 9, 0))
    assert sorted(cw["target"].tolist()) == sorted(set(range(10)) - {labels[expected[0]]})


def _reported_undetected(report, name):
    """The report's undetected success(es) of the set `name`."""
    for attack_name, by_model in (*report["curves_undetected"].items(),
                                  *report["adaptive"].items()):
        for model, v in by_model.items():
            if name in (f"{attack_name}_{model}", attack_name):
                return v["undetected_success"]
    if name.startswith("cw_l2_k"):
        return report["cw_l2"][name.removeprefix("cw_l2_k")]["undetected_success"]
    return report["untargeted"][name]["undetected_success"]


def test_undetected_success_is_recomputed_from_the_saved_sets(attacked, deployed):
    _, run_dir = attacked
    deployable, thresholds, report, *_ = deployed
    sets = _sets(run_dir)
    assert {"fgsm_sdim", "pgd_sdim", "deepfool", "boundary", "local_search", "cw_accepted",
            "pgd_accepted_linf_sdim", "pgd_accepted_l2_sdim", "pgd_accepted_linf_doubled",
            "apgd_accepted_linf_sdim", "apgd_accepted_l2_sdim", "square_accepted",
            "pgd_accepted_linf_from_others_sdim"} <= set(sets)
    for name, arrays in sets.items():
        adv, original = arrays["adversarial"], arrays["original"]
        undetected = _undetected(deployable, thresholds, adv, arrays["label"])
        reported = _reported_undetected(report, name)
        if "epsilon" in arrays:  # a curve: [epsilons, N, ...], within each budget
            assert reported == pytest.approx(undetected.mean(1).tolist()), name
            moved = (adv - original).reshape(len(adv), len(original), -1)
            size = np.linalg.norm(moved, axis=2) if "l2" in name else np.abs(moved).max(2)
            assert np.all(size <= arrays["epsilon"][:, None] * (1 + 1e-4) + 1e-6), name
        else:
            assert reported == pytest.approx(undetected.mean()), name


def test_sanity_numbers_are_recomputed_from_the_saved_sets(attacked, deployed):
    _, run_dir = attacked
    deployable, thresholds, report, *_ = deployed
    sets = _sets(run_dir)

    def shares(name, images=None):
        arrays = sets[name]
        undetected = _undetected(deployable, thresholds, arrays["adversarial"], arrays["label"])
        return dict(zip(arrays["epsilon"].tolist(), undetected[:, :images].mean(1),
                        strict=True))

    pgd, doubled = shares("pgd_accepted_linf_sdim"), shares("pgd_accepted_linf_doubled")
    square, art = shares("square_accepted"), shares("pgd_sdim")
    pgd_first = shares("pgd_accepted_linf_sdim", images=len(sets["square_accepted"]["label"]))
    sanity = report["sanity"]
    # (a): an image counts when adaptive PGD, AutoPGD or PGD from other classes' images
    # finds it at epsilon 1 (the whole cube)
    any_of = []
    for name in ("pgd_accepted_linf_sdim", "apgd_accepted_linf_sdim",
                 "pgd_accepted_linf_from_others_sdim"):
        arrays = sets[name]
        at = list(arrays["epsilon"]).index(1.0)
        undetected = _undetected(deployable, thresholds, arrays["adversarial"], arrays["label"])
        any_of.append(undetected[at])
    large = float(np.logical_or.reduce(any_of).mean())
    assert large >= pgd[1.0] and attack.LARGE_EPSILON == 1.0
    # started at accepted images of other classes, the whole cube holds a success for each
    # image whose attacked set has another class
    assert any_of[2].all() and len(set(sets["pgd_accepted_linf_sdim"]["label"])) > 1
    assert sanity["a_large_budget"]["undetected_success"] == pytest.approx(large)
    assert sanity["a_large_budget"]["from_the_image"] == pytest.approx(
        float((any_of[0] | any_of[1]).mean()))
    assert sanity["a_large_budget"]["passed"] == (large >= 0.95)
    b = sanity["b_more_steps_and_restarts"]
    assert b["base"] == pytest.approx([pgd[e] for e in (0.3, 1.0)])
    assert b["doubled"] == pytest.approx([doubled[e] for e in (0.3, 1.0)])
    assert b["passed"] == all(abs(doubled[e] - pgd[e]) <= 0.02 + 1e-9 for e in (0.3, 1.0))
    c = sanity["c_gradient_free"]
    assert c["square"] == pytest.approx([square[e] for e in (0.3, 1.0)])
    assert c["pgd"] == pytest.approx([pgd_first[e] for e in (0.3, 1.0)])
    assert c["passed"] == all(square[e] - pgd_first[e] <= 0.02 + 1e-9 for e in (0.3, 1.0))
    d = sanity["d_adaptive_vs_non_adaptive"]  # 0.3: the only budget of both grids
    assert d["epsilons"] == [0.3] and d["non_adaptive"] == pytest.approx([art[0.3]])
    # check (a)'s budget, 1, is left out: 0.3 is every budget compared
    assert "not_compared_at" not in d
    assert d["passed"] == (pgd[0.3] >= art[0.3])
    md = (run_dir / "attack" / attack.REPORT_MD).read_text()
    assert all(name in md for name in sanity)


def test_sanity_claims_no_pass_where_a_budget_was_not_compared():
    grid = [0.1, 0.2, 1.0]
    linf = {"epsilon": grid, "undetected": np.array(
        [[0, 0, 1, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)}
    autopgd = {"epsilon": grid, "undetected": np.array(
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], bool)}
    art = {"epsilon": [0.0, 0.1], "undetected": np.zeros((2, 4), bool)}
    out = attack.sanity(linf, non_adaptive=art, autopgd=autopgd)
    # (a): per image either attack at epsilon 1: 4 of 4
    assert out["a_large_budget"]["undetected_success"] == 1.0
    assert out["a_large_budget"]["passed"] is True
    d = out["d_adaptive_vs_non_adaptive"]  # 0.2 missing from ART's grid, 1 left out
    assert d["epsilons"] == [0.1] and d["not_compared_at"] == [0.2] and d["passed"] is None
    beaten = {"epsilon": [0.1], "undetected": np.ones((1, 4), bool)}
    assert attack.sanity(linf, non_adaptive=beaten)["d_adaptive_vs_non_adaptive"][
        "passed"] is False
    assert attack.sanity(linf)["a_large_budget"]["undetected_success"] == 0.75


def test_curves_report_what_they_carried_over(attacked, deployed):
    """A curve's image with an undetected success at one budget comes back unchanged at the
    next (not attacked again), and the report counts those images."""
    _, run_dir = attacked
    report, sets = deployed[2], _sets(run_dir)
    curves = [(f"{a}_sdim" if f"{a}_sdim" in sets else a, v["sdim"])
              for a, v in report["adaptive"].items() if "epsilons" in v.get("sdim", {})]
    # PGD, AutoPGD (L-inf, L2), PGD from other classes, the doubled curve, Square
    assert len(curves) == 7
    for name, summary in curves:
        arrays = sets[name]
        undetected, adv = arrays["undetected"], arrays["adversarial"]
        assert undetected.shape[0] == 2 and arrays["epsilon"][1] > arrays["epsilon"][0]
        kept = undetected[0]
        assert summary["carried_over"] == [0, int(kept.sum())], name
        np.testing.assert_array_equal(adv[1][kept], adv[0][kept], err_msg=name)
        assert np.all(undetected[1][kept]), name
    assert any(summary["carried_over"][1] for _, summary in curves)  # not trivial


def _broken_within(sets, images, epsilons, norm, classes=10):
    """bool [E, images]: some set's undetected success of the image measures within ε."""
    broken = np.zeros((len(epsilons), images), bool)
    for arrays in sets.values():
        original, per = arrays["original"], (classes - 1 if "target" in arrays else 1)
        grid = arrays["adversarial"] if "epsilon" in arrays else arrays["adversarial"][None]
        undetected = arrays["undetected"] if "epsilon" in arrays else arrays["undetected"][None]
        for adv, hit in zip(grid, undetected, strict=True):
            for row in np.flatnonzero(hit):
                if row // per >= images:
                    continue
                size = np.linalg.norm((adv[row].astype(np.float64) - original[row]).ravel(),
                                      ord=norm)
                for k, e in enumerate(epsilons):
                    broken[k, row // per] |= size <= e * (1 + 1e-5) + 1e-6
    return broken


def test_worst_case_is_recomputed_from_the_saved_sets(attacked, deployed):
    _, run_dir = attacked
    report, sets = deployed[2], _sets(run_dir)
    for grid, norm, curves in (("linf", np.inf, ("pgd_accepted_linf", "apgd_accepted_linf",
                                                 "pgd_accepted_linf_doubled")),
                               ("l2", 2, ("pgd_accepted_l2", "apgd_accepted_l2"))):
        worst = report["worst_case"]["sdim"][grid]
        assert worst["images"] == 4 and set(worst["attacks"]) == set(sets)
        broken = _broken_within(sets, 4, worst["epsilons"], norm)
        assert worst["undetected_success"] == pytest.approx(broken.mean(1).tolist())
        for attack_name in curves:  # never below an attack on all of the same images
            reported = report["adaptive"][attack_name]["sdim"]["undetected_success"]
            assert all(w >= r - 1e-9 for w, r in zip(worst["undetected_success"], reported,
                                                      strict=True))
    md = (run_dir / "attack" / attack.REPORT_MD).read_text()
    assert md.index("## Worst case per image") < md.index("## Figures 4 and 5")


def test_transfer_attack_from_a_run_and_from_a_saved_model(attacked, deployed, tmp_path):
    """--attack_transfer_from: examples crafted on another model (here the run itself, as a
    run directory and as its exported SavedModel) judged by our deployed rule, recomputed
    from the saved set; the source's own figures through the SavedModel as users load it."""
    config, run_dir = attacked
    deployable, thresholds, before, *_ = deployed
    ours = tmp_path / "ours"
    shutil.copytree(run_dir, ours)
    parts = ours / "attack" / attack.PARTS
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    saved_model = Run(run_dir).export.record()["path"]
    for source in (str(run_dir), saved_model):
        run.run(config.replace(run_dir=str(ours), attack_transfer_from=source, force=True))
        report = artifacts.read_json(ours / "attack" / attack.REPORT_JSON)
        summary = report["adaptive"]["transfer_accepted"]["sdim"]
        arrays = _sets(ours)["transfer_accepted"]
        np.testing.assert_array_equal(arrays["original"],
                                      _sets(run_dir)["pgd_accepted_linf_sdim"]["original"])
        undetected = _undetected(deployable, thresholds, arrays["adversarial"], arrays["label"])
        assert summary["undetected_success"] == pytest.approx(undetected.mean(1).tolist())
        assert summary["carried_over"] == [0, int(undetected[0].sum())]
        moved = np.abs(arrays["adversarial"] - arrays["original"]).reshape(2, 4, -1).max(2)
        assert np.all(moved <= arrays["epsilon"][:, None] + 1e-6)
        sanity = report["sanity"]["e_transfer"]
        assert sanity["transfer"] == pytest.approx(undetected.mean(1).tolist())
        assert "transfer_accepted" in report["worst_case"]["sdim"]["linf"]["attacks"]
        inputs = artifacts.read_json(ours / "attack" / artifacts.MANIFEST)["inputs"]
        assert ("transfer/calibrate" in inputs) == (source == str(run_dir))
    assert summary["source"] == f"SavedModel {saved_model}"
    loaded = tf.saved_model.load(saved_model)
    out = loaded.signatures["serving_default"](
        images=tf.constant(arrays["adversarial"].reshape(-1, *arrays["original"].shape[1:])))
    on_source = ((out["class_ids"].numpy() != np.tile(arrays["label"], 2))
                 & ~out["rejected"].numpy()).reshape(2, 4)
    assert summary["source_undetected_success"] == pytest.approx(on_source.mean(1).tolist())
    # only the transfer attack ran again
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")
            if p.name in kept} == kept
    assert (parts / f"{attack.TRANSFER_PART}.json").exists()
    md = (ours / "attack" / attack.REPORT_MD).read_text()
    assert "transfer (adaptive PGD-L∞ on another model)" in md and "e_transfer" in md
    assert before["sanity"]["e_transfer"] == {"criterion": sanity["criterion"],
                                              "passed": None, "note": "not run"}


def test_transfer_source_must_be_a_finished_run_or_a_saved_model(attacked, tmp_path):
    config, run_dir = attacked
    with pytest.raises(ConfigError, match="no such folder"):
        run.run(config.replace(attack_transfer_from=str(tmp_path / "nothing"), force=True))
    trained_only = tmp_path / "trained"
    (trained_only / "train").mkdir(parents=True)
    shutil.copy(run_dir / "train" / artifacts.MANIFEST, trained_only / "train")
    with pytest.raises(ConfigError, match="no finished calibrate stage .* or name an exported "
                                          "SavedModel"):
        run.run(config.replace(attack_transfer_from=str(trained_only), force=True))


def test_saved_model_replay_agrees_with_the_in_memory_model(attacked, deployed):
    _, run_dir = attacked
    replay = deployed[2]["replay"]
    record = Run(run_dir).export.record()
    assert replay["saved_model"] == record["path"] and replay["export_is_current"]
    expected = {}
    for name, arrays in _sets(run_dir).items():  # an even sample of 5 and every success
        undetected = arrays["undetected"].reshape(-1)
        sample = np.linspace(0, len(undetected) - 1, min(5, len(undetected))).round()
        expected[name] = (len(set(sample.astype(int)) | set(np.flatnonzero(undetected))),
                          int(undetected.sum()))
    assert {k: (v["compared"], v["undetected_compared"]) for k, v in
            replay["sets"].items()} == expected
    assert replay["compared"] > 0 and replay["mismatches"] == 0


def test_perturbation_at_the_first_undetected_success(attacked, deployed):
    _, run_dir = attacked
    report, sets = deployed[2], _sets(run_dir)
    for attack_name, norm in (("pgd_accepted_linf", np.inf), ("pgd_accepted_l2", 2)):
        arrays = sets[f"{attack_name}_sdim"]
        sizes = []
        for i in range(len(arrays["label"])):  # by hand, image by image
            hits = np.flatnonzero(arrays["undetected"][:, i])
            delta = (arrays["adversarial"][hits[0], i] - arrays["original"][i]).ravel() \
                if len(hits) else None
            sizes.append(np.inf if delta is None else np.linalg.norm(delta, ord=norm))
        summary = report["adaptive"][attack_name]["sdim"]
        median = np.median(sizes)
        assert summary["median_distance"] == (
            pytest.approx(median) if np.isfinite(median) else None), attack_name
        found = [x for x in sizes if np.isfinite(x)]
        assert summary["never"] == len(sizes) - len(found), attack_name
        assert summary["median_distance_of_successes"] == (
            pytest.approx(np.median(found)) if found else None), attack_name


def test_cw_confidences_are_multiples_of_the_held_out_spread(attacked, deployed):
    config, run_dir = attacked
    deployable, _, report, *_ = deployed
    # calibrate's held-out images: the last --validation_split training images
    resolved = config.resolve(run.STAGE_NAMES)
    num_train = Run(run_dir).examples.num_examples("train")
    skip, limit = num_train - resolved.train.validation_split, resolved.train.validation_split
    images, _ = Run(run_dir).examples.arrays("train", limit=limit, skip=skip)
    top = deployable.model.predict(images, verbose=0).astype(np.float64).max(1)
    assert len(top) == 5000 and resolved.calibrate.score == "feature_density"
    expected = [m * np.std(top) for m in (0, 1, 2, 4)]
    assert report["settings"]["cw_confidences"] == pytest.approx(expected, rel=1e-4)
    # report.json keeps its keys sorted as text ("16228.9" before "4057.23"): compare sorted
    assert sorted(v["kappa"] for v in report["cw_l2"].values()) == pytest.approx(expected,
                                                                                 rel=1e-4)
    # the paper's score keeps the paper's confidences
    paper = attack._cw_confidences(types.SimpleNamespace(settings=adversarial.AttackSettings()),
                                   None, types.SimpleNamespace(score=scores.get("model")()),
                                   None)
    assert paper[0] == (0.0, 500.0, 1000.0)


def test_attack_stage_resumes_from_finished_attacks(attacked):
    config, run_dir = attacked
    parts = run_dir / "attack" / attack.PARTS
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    (parts / "boundary.json").unlink()
    report = artifacts.read_json(run_dir / "attack" / attack.REPORT_JSON)
    run.run(config.replace(force=True))
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert after["boundary.json"] != kept["boundary.json"]
    assert {k: v for k, v in after.items() if k != "boundary.json"} == {
        k: v for k, v in kept.items() if k != "boundary.json"}
    again = artifacts.read_json(run_dir / "attack" / attack.REPORT_JSON)
    assert again["untargeted"]["deepfool"] == report["untargeted"]["deepfool"]
    # a changed cap reruns only the attack it belongs to
    run.run(config.replace(attack_boundary_steps=6))
    changed = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert changed["boundary.json"] != after["boundary.json"]
    assert {k: v for k, v in changed.items() if k != "boundary.json"} == {
        k: v for k, v in after.items() if k != "boundary.json"}


def test_an_adaptive_curve_resumes_after_its_last_kept_epsilon(attacked, tmp_path,
                                                               monkeypatch):
    """Killed after the first epsilon of a PGD curve, the stage goes on from the kept epsilon
    and ends with the curve of an uninterrupted run; the epsilons' parts are then dropped."""
    config, run_dir = attacked
    ours = tmp_path / "run"
    shutil.copytree(run_dir, ours)
    parts, name = ours / "attack" / attack.PARTS, "pgd_accepted_linf_sdim"
    with np.load(parts / f"{name}.npz") as kept:
        before = {k: kept[k] for k in kept.files}
    for suffix in (".json", ".npz"):
        (parts / f"{name}{suffix}").unlink()

    class Killed(Exception):
        pass

    def kill(point, detail=None):
        if point == attack.EPSILON_DONE and detail == name:
            raise Killed

    config = config.replace(run_dir=str(ours), force=True)
    monkeypatch.setattr(faults, "point", kill)
    with pytest.raises(Killed):
        run.run(config)
    assert sorted(p.name for p in parts.glob(f"{name}*")) == [f"{name}.eps0.json",
                                                              f"{name}.eps0.npz"]
    reached = []
    monkeypatch.setattr(faults, "point", lambda point, detail=None: reached.append(
        (point, detail)))
    run.run(config)
    assert reached.count((attack.EPSILON_DONE, name)) == 1  # only the second epsilon ran
    with np.load(parts / f"{name}.npz") as kept:
        np.testing.assert_array_equal(kept["success"], before["success"])
        np.testing.assert_allclose(kept["adversarial"], before["adversarial"], atol=1e-6)
    assert not list(parts.glob(f"{name}.eps*"))


def test_attack_baseline_must_be_a_discriminative_run(attacked, tmp_path):
    config, run_dir = attacked
    trained_only = tmp_path / "baseline"  # a finished train stage, no calibrate stage
    (trained_only / "train").mkdir(parents=True)
    shutil.copy(run_dir / "train" / artifacts.MANIFEST, trained_only / "train")
    with pytest.raises(ConfigError, match="no finished calibrate stage"):
        run.run(config.replace(attack_baseline=str(trained_only), force=True))
    with pytest.raises(ConfigError, match="expected discriminative"):
        run.run(config.replace(attack_baseline=str(run_dir), force=True))
    with pytest.raises(ConfigError, match="no finished train stage"):
        run.run(config.replace(attack_baseline=os.fspath(run_dir / "nothing"), force=True))
    with pytest.raises(ConfigError, match=r"--attacks: unknown \['jsma'\]"):
        run.run(config.replace(attacks=("jsma",)))


def test_the_doubled_curve_is_an_attack_of_its_own(attacked, tmp_path):
    config, run_dir = attacked
    with pytest.raises(ConfigError, match="pgd_accepted_linf_doubled checks"):
        run.run(config.replace(attacks=("pgd_accepted_linf_doubled",)))
    before = artifacts.read_json(run_dir / "attack" / attack.REPORT_JSON)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    run.run(config.replace(run_dir=str(copy), attacks=("pgd", "pgd_accepted_linf"), force=True))
    report = artifacts.read_json(copy / "attack" / attack.REPORT_JSON)
    assert set(report["adaptive"]) == {"pgd_accepted_linf"}
    assert report["adaptive"]["pgd_accepted_linf"] == before["adaptive"]["pgd_accepted_linf"]
    assert not (copy / "attack" / attack.SETS / "pgd_accepted_linf_doubled.npz").exists()
    sanity = report["sanity"]
    assert sanity["b_more_steps_and_restarts"]["passed"] is None
    assert sanity["b_more_steps_and_restarts"]["note"] == "not run"
    assert sanity["d_adaptive_vs_non_adaptive"] == before["sanity"]["d_adaptive_vs_non_adaptive"]
    # without AutoPGD, check (a) is PGD's own share at the large budget
    pgd = before["adaptive"]["pgd_accepted_linf"]["sdim"]
    at = before["settings"]["accepted_epsilons"].index(attack.LARGE_EPSILON)
    assert sanity["a_large_budget"]["undetected_success"] == pytest.approx(
        pgd["undetected_success"][at])
    assert "AutoPGD" not in sanity["a_large_budget"]["criterion"]
    assert "AutoPGD" in before["sanity"]["a_large_budget"]["criterion"]


def test_the_baseline_run_is_an_input_of_the_attack_stage(tmp_path):
    stage, = (s for s in run.STAGES if s.name == "attack")
    config = PipelineConfig.from_flat(dataset="mnist", run_dir=str(tmp_path / "ours"))
    assert stage.external(config) == {}
    baseline = tmp_path / "baseline"
    for name in attack.BASELINE_STAGES:
        (baseline / name).mkdir(parents=True)
        (baseline / name / artifacts.MANIFEST).write_text(f'{{"stage": "{name}"}}')
    views = stage.external(config.replace(attack_baseline=str(baseline)))
    folders = {k: v.folder for k, v in views.items()}
    assert folders == {"baseline/train": baseline / "train",
                       "baseline/calibrate": baseline / "calibrate",
                       "baseline/ingest": baseline / "ingest"}
    before = artifacts.input_hashes(folders)
    (baseline / "calibrate" / artifacts.MANIFEST).write_text('{"stage": "calibrate", "n": 2}')
    after = artifacts.input_hashes(folders)  # a recalibrated baseline: another input
    assert before["baseline/train"] == after["baseline/train"]
    assert before["baseline/calibrate"] != after["baseline/calibrate"]


def test_the_baseline_is_attacked_adaptively_under_its_own_rule(attacked, tmp_path):
    """--attack_baseline: a discriminative run with its own calibrate stage gets the adaptive
    curve and CW-accepted against its own scoring model and thresholds (recomputed here from
    its saved sets), and the main model's parts are kept."""
    config, run_dir = attacked
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    shutil.copytree(run_dir / "ingest", baseline / "ingest")
    run.run(config.replace(model="discriminative", run_dir=str(baseline), epochs=1,
                           stages=("ingest", "train", "calibrate")))
    ours = tmp_path / "ours"
    shutil.copytree(run_dir, ours)
    main_part = (ours / "attack" / attack.PARTS / "cw_accepted.json").read_bytes()
    run.run(config.replace(run_dir=str(ours), attack_baseline=str(baseline),
                           attacks=("pgd_accepted_linf", "cw_accepted"), force=True))
    assert (ours / "attack" / attack.PARTS / "cw_accepted.json").read_bytes() == main_part
    # the baseline's stages are inputs of the stage: their manifests' hashes in its own
    inputs = artifacts.read_json(ours / "attack" / artifacts.MANIFEST)["inputs"]
    assert {k: v for k, v in inputs.items() if k.startswith("baseline/")} == {
        f"baseline/{s}": artifacts.sha256_file(baseline / s / artifacts.MANIFEST)
        for s in ("ingest", "train", "calibrate")}
    report = artifacts.read_json(ours / "attack" / attack.REPORT_JSON)
    assert set(report["adaptive"]["pgd_accepted_linf"]) == {"sdim", "discriminative"}
    assert set(report["adaptive"]["cw_accepted"]) == {"sdim", "discriminative"}
    sets = _sets(ours)
    deployable = Run(baseline).deployable()
    thresholds = Run(baseline).calibration.deployed()[1]
    images, labels = Run(ours).examples.arrays(
        "test", limit=report["clean"]["discriminative"]["images"])
    scores = deployable.model.predict(images, verbose=0)
    accepted = ~rejection.decide(scores, thresholds).rejected.numpy()
    expected = np.flatnonzero((scores.argmax(1) == labels) & accepted)
    curve = sets["pgd_accepted_linf_discriminative"]
    np.testing.assert_array_equal(curve["original"], images[expected[:4]])
    # the scores saved with its sets are the baseline's own, not the main model's
    adv = curve["adversarial"].reshape(-1, *images.shape[1:])
    np.testing.assert_allclose(curve["scores"].reshape(len(adv), -1),
                               deployable.model.predict(adv, verbose=0), rtol=1e-4, atol=1e-3)
    undetected = _undetected(deployable, thresholds, curve["adversarial"], curve["label"])
    assert report["adaptive"]["pgd_accepted_linf"]["discriminative"]["undetected_success"] == \
        pytest.approx(undetected.mean(1).tolist())
    cw = sets["cw_accepted_discriminative"]
    np.testing.assert_array_equal(cw["original"], np.repeat(images[expected[:1]], 9, 0))
    reported = report["adaptive"]["cw_accepted"]["discriminative"]
    assert reported["undetected_success"] == \
        pytest.approx(_undetected(deployable, thresholds, cw["adversarial"], cw["label"]).mean())
    cw_scores = deployable.model.predict(cw["adversarial"], verbose=0)
    reached = (cw_scores.argmax(1) == cw["target"]) & ~rejection.decide(
        cw_scores, thresholds).rejected.numpy()
    assert reported["success_rate"] == pytest.approx(reached.mean())
    rows = [line for line in (ours / "attack" / attack.REPORT_MD).read_text().splitlines()
            if line.startswith("| discriminative | 9 |")]
    assert len(rows) == 1  # the baseline's row of the CW-accepted table
