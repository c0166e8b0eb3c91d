"""Attack (opt-in): adversarial robustness and detection, paper section 5.3 and appendix D,
and attackers who know the rejection rule.

The attacked set: the first test images that the deployed model (its scoring model, deployed
thresholds and equation 9, `rejecting_classifier`) classifies correctly and accepts. FGSM and
PGD accuracy curves (Figures 4 and 5, beside a calibrated discriminative run when
--attack_baseline names one), untargeted DeepFool, Boundary and LocalSearch (Table 5),
targeted CW-L2 with confidences (Tables 6 and 7), and the adaptive attacks of
`sdim_tf.adversarial` (PGD and AutoPGD curves in L-inf and L2, Square, CW on the margin
loss, and with --attack_transfer_from examples crafted on another model) with Carlini et
al.'s sanity checks. Every attack reports its undetected success: the share of its attacked
set whose adversarial example is wrong and accepted by the deployed rule; the worst case per
image over all of them comes first in the report.

Each finished attack is kept in parts/ (a killed stage resumes where it stopped) and
published in sets/ (originals, labels, targets, adversarial images) for replay against later
models; a sample of each set is replayed against the run's exported SavedModel.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import artifacts, attack_report, deployed, faults
from pipeline.config import ConfigError
from pipeline.run_dir import Calibration, rejecting_classifier
from sdim_tf import adversarial, plots, rejection, robust

REPORT_JSON, REPORT_MD = attack_report.REPORT_JSON, attack_report.REPORT_MD
CURVES_PNG, UNDETECTED_PNG = attack_report.CURVES_PNG, attack_report.UNDETECTED_PNG
EXAMPLES_PNG, EXAMPLES_NPZ = attack_report.EXAMPLES_PNG, "adversarial_examples.npz"
PARTS, SETS = "parts", "sets"
UPSTREAM = ("ingest", "train", "calibrate")  # what the attacked model is made of
# --attack_baseline's stages, inputs of this stage as "baseline/<stage>" (checked in order)
BASELINE = "baseline"
BASELINE_STAGES = ("train", "calibrate", "ingest")
# --attack_transfer_from's stages when it names a run directory, as "transfer/<stage>"
TRANSFER = "transfer"
TRANSFER_PART = "transfer_accepted"
# In every part's key: parts made before the attacked set was "correct and accepted" are
# not reused.
ATTACKED_SET = "correct_and_accepted"
EPSILON_DONE = "attack.epsilon_done"  # faults point: an adaptive curve's epsilon is kept
PAPER_KAPPAS = (0.0, 500.0, 1000.0)  # on log p(x|c), the paper's score
STD_MULTIPLES = (0.0, 1.0, 2.0, 4.0)  # of the held-out top scores, for other scores
# Check (a)'s budget: at 1 the L-inf ball is the whole image cube, so every accepted image of
# another class lies inside it and an attack that is not masked reaches one. POINTS: the
# other checks' tolerance (2 points).
LARGE_EPSILON, POINTS = 1.0, 0.02


@dataclasses.dataclass
class Target:
    """A deployed model under attack, with the test images' scores and its attacked set."""

    name: str
    deployable: object  # serving.RejectingClassifier
    classifier: object  # ART's view of its scoring model
    rule: adversarial.Acceptance  # deployed: thresholds [C] and min_gap
    percentiles: dict  # {percentile: thresholds [C]}, for the paper's detection rates
    clean: np.ndarray  # class scores of the test images
    attacked: np.ndarray  # test indices classified correctly and accepted, in order
    key: dict  # identifies the model in its parts' keys

    @property
    def scorer(self):
        return self.deployable.model


@dataclasses.dataclass
class Context:
    settings: adversarial.AttackSettings
    parts: artifacts.Parts
    images: np.ndarray  # the first test images
    labels: np.ndarray

    def key(self, key: dict) -> dict:
        """A part's full key: its own settings, the attacked set's definition, the seed."""
        return {"set": ATTACKED_SET, "seed": self.settings.seed, **key}

    def keep(self, part: str, key: dict, compute: Callable[[], tuple[dict, dict]]
             ) -> tuple[dict, dict]:
        """(summary, arrays) of `part`, kept by an earlier run under `key`, else computed."""
        key = self.key(key)
        done = self.parts.get(part, key)
        if done is not None:
            logging.info("attack: %s kept from an earlier run", part)
            return done
        return self.parts.put(part, key, *compute())

    def chosen(self, target: Target, count: int) -> dict:
        """The first `count` of the attacked set: original, label."""
        index = target.attacked[:count]
        return {"original": self.images[index], "label": self.labels[index]}


def _target(name: str, made_of: dict, images, labels, batch_size: int, key: dict) -> Target:
    """`made_of`: {"ingest", "train", "calibrate"} views of the attacked run."""
    calibration = made_of["calibrate"]
    deployable = rejecting_classifier(made_of["ingest"], made_of["train"], calibration)
    classifier = adversarial.art_classifier(deployable.model, deployable.num_classes,
                                            images.shape[1:], batch_size)
    clean = classifier.predict(images)
    rule = adversarial.Acceptance(calibration.deployed()[1], calibration.min_gap())
    accepted = ~deployable.decide(clean).rejected.numpy()
    attacked = np.flatnonzero((clean.argmax(1) == labels) & accepted)
    if len(attacked) == 0:
        raise ConfigError(f"attack: {name} classifies correctly and accepts none of the first "
                          f"{len(labels)} test images")
    percentiles = {p: v["thresholds"] for p, v in calibration.percentiles().items()}
    return Target(name, deployable, classifier, rule, percentiles, clean, attacked, key)


def _finished(views: dict, flag: str, hint: str = "") -> None:
    """Refuses another run whose stages have not all finished."""
    for stage, view in views.items():
        manifest = view.folder / artifacts.MANIFEST
        if not manifest.exists():
            raise ConfigError(f"{flag}: no finished {stage} stage in it ({manifest} missing); "
                              f"run it with --stages={stage}{hint}")


def _baseline(config, upstream: dict) -> tuple[dict, dict] | None:
    """({stage: view}, their hashes) of --attack_baseline, a calibrated discriminative run of
    our dataset, or None without one."""
    if not config.attack_baseline:
        return None
    views = {stage: upstream[f"{BASELINE}/{stage}"] for stage in BASELINE_STAGES}
    _finished(views, f"--attack_baseline={config.attack_baseline}")
    kind, dataset = views["train"].kind, views["ingest"].dataset_name
    ours = upstream["ingest"].dataset_name
    if kind != "discriminative" or dataset != ours:
        raise ConfigError(f"--attack_baseline={config.attack_baseline} holds a {kind} model of "
                          f"{dataset}; expected discriminative on {ours}")
    return views, artifacts.input_hashes({s: v.folder for s, v in views.items()})


def transfer_saved_model(source: str) -> pathlib.Path | None:
    """The SavedModel version --attack_transfer_from names (the newest of a folder of
    versions), or None for a run directory, whose stages are then inputs of this stage as
    "transfer/<stage>". A SavedModel is read at its version, which the transfer attack's
    part is keyed on (versions are never overwritten)."""
    if not pathlib.Path(source).is_dir():
        raise ConfigError(f"--attack_transfer_from={source}: no such folder; name a run "
                          "directory or an exported SavedModel")
    try:
        return deployed.version_dir(source)
    except deployed.DeployedModelError:
        return None


@dataclasses.dataclass
class Source:
    """The model a transfer attack crafts its examples on."""

    name: str  # what it is, for the report
    scorer: Callable  # images -> class scores, differentiable
    rule: adversarial.Acceptance  # its own deployed rule
    key: dict  # identifies it in the part's key


def _signature_scores(loaded) -> Callable:
    """The class scores of a loaded SavedModel's serving_default (differentiable)."""
    signature = loaded.signatures["serving_default"]

    def scores(images):
        return signature(images=images)["class_scores"]

    scores.saved_model = loaded  # held: its signatures need its variables
    return scores


def _transfer_source(config, upstream: dict, class_names) -> Source | None:
    """--attack_transfer_from: a run directory with finished ingest, train and calibrate
    stages, or an exported SavedModel, of the same classes; None without it."""
    source = config.attack_transfer_from
    if not source:
        return None
    flag, version = f"--attack_transfer_from={source}", transfer_saved_model(source)
    if version is None:
        views = {stage: upstream[f"{TRANSFER}/{stage}"] for stage in BASELINE_STAGES}
        _finished(views, flag, ", or name an exported SavedModel")
        theirs = views["ingest"].class_names
        calibration = views["calibrate"]
        scorer = rejecting_classifier(views["ingest"], views["train"], calibration).model
        name = f"{views['train'].kind} run {source}"
        key = artifacts.input_hashes({s: v.folder for s, v in views.items()})
    else:
        try:
            theirs = deployed.asset(version, "model_card.json")["class_names"]
        except deployed.DeployedModelError as e:
            raise ConfigError(f"{flag}: {e}") from None
        calibration = Calibration(version / "assets")
        scorer = _signature_scores(tf.saved_model.load(str(version)))
        name, key = f"SavedModel {version}", {"saved_model": str(version)}
    if list(theirs) != list(class_names):
        raise ConfigError(f"{flag} classifies {list(theirs)}; the attacked model classifies "
                          f"{list(class_names)}")
    return Source(name, scorer, adversarial.Acceptance(calibration.deployed()[1],
                                                       calibration.min_gap()), key)


def _clean(target: Target, labels) -> dict:
    """The deployed rule on the clean test images the attacked set comes from."""
    return {"images": int(len(labels)),
            "accuracy": float((target.clean.argmax(1) == labels).mean()),
            "rejected": float(target.deployable.decide(target.clean).rejected.numpy().mean()),
            "attackable": int(len(target.attacked))}


def _undetected(scores, labels, thresholds) -> np.ndarray:
    """Per row (any leading shape) wrong and accepted by the deployed rule."""
    scores = np.asarray(scores)
    flat = scores.reshape(-1, scores.shape[-1])
    rows = np.broadcast_to(labels, scores.shape[:-1]).reshape(-1)
    return adversarial.undetected_success(flat, rows, thresholds).reshape(scores.shape[:-1])


def _share(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if flags.size else None


def _summary(target: Target, arrays: dict, seconds: float) -> dict:
    """One attack's row: its own success, the paper's detection rates, undetected success."""
    success = arrays["success"]
    distance = adversarial.l2_distances(arrays["adversarial"], arrays["original"])[success]
    return {"attacked": int(len(success)), "successes": int(success.sum()),
            "success_rate": _share(success),
            "detection_rate": {str(p): r for p, r in adversarial.detection_rates(
                arrays["scores"], success, target.percentiles).items()},
            "undetected_success": _share(arrays["undetected"]),
            "median_l2": float(np.median(distance)) if len(distance) else None,
            "seconds": round(seconds, 1)}


def _result_arrays(chosen: dict, result: adversarial.AttackResult, thresholds) -> dict:
    return _arrays(chosen, thresholds, result.adversarial, result.logits, result.success)


def _arrays(chosen: dict, thresholds, adversarial_images, scores, success,
            epsilons=None) -> dict:
    """A part's arrays: the attacked images, their adversarial examples, scores, success and
    undetected success (with `epsilons`, a leading [E] axis on the last four)."""
    arrays = {**chosen, "adversarial": adversarial_images, "scores": scores,
              "success": success, "undetected": _undetected(scores, chosen["label"],
                                                            thresholds)}
    return arrays if epsilons is None else {**arrays, "epsilon": np.asarray(epsilons)}


def _curve(ctx: Context, target: Target, attack: str) -> tuple[dict, dict]:
    """FGSM/PGD over the first test images (the paper's accuracy) and the attacked set
    (undetected success), attacked together: the union of both."""
    s = ctx.settings
    first = np.arange(min(s.images, len(ctx.labels)))
    chosen = target.attacked[:s.images]
    union = np.union1d(first, chosen)
    key = {**target.key, "images": s.images, "epsilons": s.epsilons}
    if attack == "pgd":
        key.update(pgd_steps=s.pgd_steps, pgd_step_size=s.pgd_step_size)

    def compute():
        logging.info("attack: %s curve of %s over %d images", attack, target.name, len(union))
        started = time.time()
        at_first, at_chosen = np.searchsorted(union, first), np.searchsorted(union, chosen)
        accuracy, adversarials, scores = [], [], []
        for x in adversarial.curve_examples(target.classifier, ctx.images[union], attack, s):
            predicted = target.classifier.predict(x)
            accuracy.append(float((predicted[at_first].argmax(1) == ctx.labels[first]).mean()))
            adversarials.append(x[at_chosen])
            scores.append(predicted[at_chosen])
        arrays = {**ctx.chosen(target, s.images), "epsilon": np.asarray(s.epsilons),
                  "adversarial": np.stack(adversarials), "scores": np.stack(scores)}
        arrays["undetected"] = _undetected(arrays["scores"], arrays["label"], target.rule)
        return {"accuracy": accuracy, "images": int(len(first)),
                "seconds": round(time.time() - started, 1)}, arrays

    return _by_epsilon(*ctx.keep(f"{attack}_{target.name}", key, compute))


def _by_epsilon(summary: dict, arrays: dict) -> tuple[dict, dict]:
    """A curve's summary with its undetected success at each epsilon."""
    return {**summary, "attacked": int(len(arrays["label"])),
            "undetected_success": [_share(u) for u in arrays["undetected"]]}, arrays


UNTARGETED = {"deepfool": (adversarial.deepfool, "images", "deepfool_steps"),
              "boundary": (adversarial.boundary, "boundary_images", "boundary_steps"),
              "local_search": (adversarial.local_search_attack, "local_search_images",
                               "local_search_rounds")}


def _untargeted(ctx: Context, target: Target, attack: str) -> tuple[dict, dict]:
    fn, images, steps = UNTARGETED[attack]
    s = ctx.settings
    chosen = ctx.chosen(target, getattr(s, images))
    key = {"images": getattr(s, images), "steps": getattr(s, steps)}
    if attack == "deepfool":
        key["overshoot"] = s.deepfool_overshoot

    def compute():
        logging.info("attack: %s on %d attacked images", attack, len(chosen["label"]))
        extra = {}
        if attack == "local_search":  # ours, so it can report its rounds; ART's cannot
            extra["progress"] = _rounds_logger(attack, len(chosen["label"]), key["steps"])
        result = fn(target.classifier, chosen["original"], chosen["label"], s, **extra)
        arrays = _result_arrays(chosen, result, target.rule)
        return _summary(target, arrays, result.seconds), arrays

    return ctx.keep(attack, key, compute)


def _rounds_logger(attack: str, images: int, rounds: int, every: int = 10):
    """A progress callback that logs every `every` rounds: LocalSearch runs for minutes."""
    started = time.time()

    def progress(done: int, unfooled: int) -> None:
        if done % every == 0 or done == rounds or unfooled == 0:
            logging.info("attack: %s round %d/%d, %d of %d images not yet fooled (%.0f s)",
                         attack, done, rounds, unfooled, images, time.time() - started)
    return progress


def _targeted(ctx: Context, target: Target, count: int) -> dict:
    """The first `count` attacked images, each repeated towards every other class."""
    chosen = ctx.chosen(target, count)
    classes = target.deployable.num_classes
    return {"original": np.repeat(chosen["original"], classes - 1, axis=0),
            "label": np.repeat(chosen["label"], classes - 1),
            "target": np.concatenate([[t for t in range(classes) if t != y]
                                      for y in chosen["label"]]).astype(np.int64)}


def _carlini(ctx: Context, target: Target, kappa: float) -> tuple[dict, dict]:
    s = ctx.settings
    chosen = _targeted(ctx, target, s.cw_images)
    key = {"images": s.cw_images, "kappa": kappa, "steps": s.cw_steps,
           "search_steps": s.cw_search_steps}

    def compute():
        logging.info("attack: CW-L2 kappa=%g, %d attacks", kappa, len(chosen["label"]))
        result = adversarial.carlini_l2(target.classifier, chosen["original"],
                                        chosen["target"], kappa, s)
        arrays = _result_arrays(chosen, result, target.rule)
        return {**_summary(target, arrays, result.seconds), "kappa": kappa}, arrays

    return ctx.keep(f"cw_l2_k{kappa:g}", key, compute)


def _cw_confidences(ctx: Context, target: Target, calibration, examples) -> tuple[tuple, dict]:
    """(kappas, how they were chosen): --attack_cw_confidences, else the paper's on its score,
    else multiples of the std of the held-out images' top scores (calibrate's images)."""
    s = ctx.settings
    if s.cw_confidences is not None:
        return s.cw_confidences, {"rule": "--attack_cw_confidences"}
    if getattr(calibration.score, "paper", False):
        return PAPER_KAPPAS, {"rule": "the paper's, on the paper's score"}
    # {"skip", "limit"} or {"indices"} of the training split, and their count
    key = {k: v for k, v in calibration.saved["examples"].items() if k != "num_samples"}

    def compute():
        scores, _ = rejection.class_scores(target.scorer, examples.dataset("train", **key))
        top = scores.max(1)
        return {"std": float(top.std()), "images": int(len(top))}, {}

    summary, _ = ctx.keep("held_out_top_scores", key, compute)
    return tuple(m * summary["std"] for m in STD_MULTIPLES), {
        "rule": f"{', '.join(f'{m:g}' for m in STD_MULTIPLES)} x the standard deviation of the "
                f"top scores of calibrate's {summary['images']} "
                f"{calibration.saved.get('source', 'held-out')} images (training images "
                f"{key['skip']} to {key['skip'] + key['limit']})",
        "multiples": list(STD_MULTIPLES), "std": summary["std"], "images": summary["images"]}


CURVES = {"pgd": adversarial.pgd_accepted_curve, "apgd": adversarial.apgd_accepted_curve}
# the adaptive curves, run on every target: attack -> (method, norm, where PGD starts)
ADAPTIVE_CURVES = {"pgd_accepted_linf": ("pgd", "inf", "image"),
                   "pgd_accepted_l2": ("pgd", "2", "image"),
                   "apgd_accepted_linf": ("apgd", "inf", "image"),
                   "apgd_accepted_l2": ("apgd", "2", "image"),
                   "pgd_accepted_linf_from_others": ("pgd", "inf", "other_classes")}


def _first_step_key(s: adversarial.AttackSettings) -> dict:
    """The PGD first step in a part's key; a first step of 1 has no key."""
    return {} if s.accepted_first_step == 1 else {"first_step": s.accepted_first_step}


def _accepted_curve(ctx: Context, target: Target, attack: str, doubled: bool = False
                    ) -> tuple[dict, dict]:
    """An adaptive curve (`ADAPTIVE_CURVES`: `pgd_accepted_curve` or `apgd_accepted_curve`)
    on the attacked set over the norm's grid, carried over it."""
    s = ctx.settings
    method, norm, start = ADAPTIVE_CURVES[attack]
    epsilons = s.accepted_epsilons if norm == "inf" else s.accepted_l2_epsilons
    steps, restarts = s.accepted_steps * (1 + doubled), s.accepted_restarts * (1 + doubled)
    chosen = ctx.chosen(target, s.images)
    name = attack + ("_doubled" if doubled else f"_{target.name}")
    # warm_start: parts made before each epsilon started from the previous one's result
    key = {**target.key, "images": s.images, "epsilons": epsilons, "steps": steps,
           "restarts": restarts, "warm_start": True}
    options = {}
    if method != "pgd":
        key["method"], schedule = method, "auto"
    else:
        options["schedule"] = schedule = s.accepted_schedule
        if schedule != "constant":  # parts made before schedules existed: constant
            key["schedule"] = schedule
        if start != "image":
            key["start"] = options["start"] = start
        key.update(_first_step_key(s))
        options["first_step"] = s.accepted_first_step

    def compute():
        # each epsilon is kept as it finishes (<name>.eps<i>), so a killed stage goes on
        # from the last one: a doubled curve takes hours on a 2-core CPU
        step_key = ctx.key(key)
        done = []
        for i in range(len(epsilons)):
            kept = ctx.parts.get(f"{name}.eps{i}", step_key)
            if kept is None:
                break
            done.append(adversarial.AttackResult(
                f"{method}_accepted_l{norm}", kept[1]["adversarial"], kept[1]["logits"],
                kept[1]["success"], kept[0]["seconds"]))
        logging.info("attack: %s on %d attacked images of %s%s", name, len(chosen["label"]),
                     target.name, f", resumed after ε={epsilons[len(done) - 1]:g}"
                     if done else "")

        def keep_epsilon(i, result):
            ctx.parts.put(f"{name}.eps{i}", step_key, {"seconds": result.seconds},
                          {"adversarial": result.adversarial, "logits": result.logits,
                           "success": result.success})
            logging.info("attack: %s ε=%g (%d of %d): %.1f%% undetected so far (%.0f s)", name,
                         epsilons[i], i + 1, len(epsilons), 100 * np.mean(result.success),
                         result.seconds)
            faults.point(EPSILON_DONE, name)

        curve = CURVES[method](
            target.scorer, chosen["original"], chosen["label"], target.rule,
            epsilons=epsilons, norm=norm, steps=steps, restarts=restarts,
            batch_size=s.batch_size, seed=s.seed, done=done, on_result=keep_epsilon,
            **options)
        return {"epsilons": list(epsilons), "steps": steps, "restarts": restarts,
                "schedule": schedule, "seconds": round(curve.seconds, 1)}, \
            _arrays(chosen, target.rule, curve.adversarial, curve.scores, curve.success,
                    epsilons)

    summary, arrays = _by_epsilon(*ctx.keep(name, key, compute))
    for i in range(len(epsilons)):  # the whole curve is kept: its epsilons are not needed
        ctx.parts.drop(f"{name}.eps{i}")
    return {**summary, **_carried(arrays), **_distance_at_success(arrays, norm)}, arrays


def _carried(arrays: dict) -> dict:
    """How many images of each epsilon's figure were carried over from the epsilon before
    (an undetected success there, inside this budget, not attacked again)."""
    return {"carried_over": adversarial.carried_over(arrays["epsilon"], arrays["undetected"])
            .sum(1).tolist()}


def _distance_at_success(arrays: dict, norm: str) -> dict:
    """Per image the norm of its perturbation at its first undetected success on the grid
    (inf if none): the median over all attacked images (None when under half succeed) and
    over those that succeed, and how many never succeed."""
    undetected = np.asarray(arrays["undetected"])  # [E, N]
    first = np.argmax(undetected, axis=0)
    delta = (arrays["adversarial"][first, np.arange(undetected.shape[1])]
             - arrays["original"]).reshape(undetected.shape[1], -1)
    size = np.abs(delta).max(1) if norm == "inf" else np.linalg.norm(delta, axis=1)
    size = np.where(undetected.any(0), size, np.inf)
    median = float(np.median(size)) if size.size else None
    found = size[np.isfinite(size)]
    return {"median_distance": median if median is not None and np.isfinite(median) else None,
            "median_distance_of_successes": float(np.median(found)) if found.size else None,
            "never": int(size.size - found.size)}


def _square(ctx: Context, target: Target) -> tuple[dict, dict]:
    """Gradient-free square_accepted at the PGD-Linf budgets, on the first attacked images,
    carried over the grid."""
    s = ctx.settings
    chosen = ctx.chosen(target, s.square_images)
    key = {"images": s.square_images, "epsilons": s.accepted_epsilons,
           "queries": s.square_queries, "carried_over": True}

    def compute():
        logging.info("attack: square_accepted on %d attacked images", len(chosen["label"]))
        curve = adversarial.square_accepted_curve(
            target.scorer, chosen["original"], chosen["label"], target.rule,
            epsilons=s.accepted_epsilons, queries=s.square_queries, seed=s.seed,
            batch_size=s.batch_size)
        return {"epsilons": list(s.accepted_epsilons), "queries": s.square_queries,
                "seconds": round(curve.seconds, 1)}, _arrays(
            chosen, target.rule, curve.adversarial, curve.scores, curve.success,
            s.accepted_epsilons)

    summary, arrays = _by_epsilon(*ctx.keep("square_accepted", key, compute))
    return {**summary, **_carried(arrays)}, arrays


def _cw_accepted(ctx: Context, target: Target, part: str) -> tuple[dict, dict]:
    """Targeted `carlini_accepted` at kappa 0 (the easiest undetected success) towards every
    other class; its success: the target, accepted."""
    s = ctx.settings
    chosen = _targeted(ctx, target, s.cw_images)
    key = {**target.key, "images": s.cw_images, "steps": s.accepted_steps,
           "search_steps": s.cw_search_steps}

    def compute():
        logging.info("attack: cw_accepted, %d attacks", len(chosen["label"]))
        result = adversarial.carlini_accepted(
            target.scorer, chosen["original"], chosen["target"], target.rule,
            steps=s.accepted_steps, search_steps=s.cw_search_steps, batch_size=s.batch_size)
        arrays = _result_arrays(chosen, result, target.rule)
        return {**_summary(target, arrays, result.seconds), "kappa": 0.0}, arrays

    return ctx.keep(part, key, compute)


def _transfer(ctx: Context, target: Target, source: Source) -> tuple[dict, dict]:
    """Adaptive PGD-L-inf examples crafted on `source`, judged by the target's deployed
    rule (`transfer_accepted_curve`), at the L-inf budgets, carried over them."""
    s = ctx.settings
    chosen = ctx.chosen(target, s.images)
    key = {**target.key, "source": source.key, "images": s.images,
           "epsilons": s.accepted_epsilons, "steps": s.accepted_steps,
           "restarts": s.accepted_restarts, "schedule": s.accepted_schedule,
           **_first_step_key(s)}

    def compute():
        logging.info("attack: transfer from the %s to %d attacked images", source.name,
                     len(chosen["label"]))
        curve, on_source = adversarial.transfer_accepted_curve(
            source.scorer, source.rule, target.scorer, target.rule, chosen["original"],
            chosen["label"], epsilons=s.accepted_epsilons, steps=s.accepted_steps,
            restarts=s.accepted_restarts, schedule=s.accepted_schedule,
            first_step=s.accepted_first_step, batch_size=s.batch_size, seed=s.seed)
        return {"epsilons": list(s.accepted_epsilons), "steps": s.accepted_steps,
                "restarts": s.accepted_restarts, "schedule": s.accepted_schedule,
                "source": source.name,
                "source_undetected_success": [_share(u) for u in on_source],
                "seconds": round(curve.seconds, 1)}, _arrays(
            chosen, target.rule, curve.adversarial, curve.scores, curve.success,
            s.accepted_epsilons)

    summary, arrays = _by_epsilon(*ctx.keep(TRANSFER_PART, key, compute))
    return {**summary, **_carried(arrays), **_distance_at_success(arrays, "inf")}, arrays


# the worst case's grids: the adaptive curves' (report key, norm, AttackSettings field)
WORST_GRIDS = (("linf", "inf", "accepted_epsilons"), ("l2", "2", "accepted_l2_epsilons"))


def _examples(arrays: dict, classes: int, norm: str) -> tuple[np.ndarray, ...]:
    """One row per adversarial example of a set: (its image's position in the attacked set,
    the perturbation's norm, whether it is an undetected success)."""
    original, adv = arrays["original"], arrays["adversarial"]
    rows = np.arange(len(original))
    positions = rows // (classes - 1) if "target" in arrays else rows  # one per other class
    if adv.ndim > original.ndim:  # a curve: [E, N, ...]
        grid = len(adv)
        return (np.tile(positions, grid), adversarial.perturbation_sizes(
            adv.reshape(-1, *original.shape[1:]), np.tile(original, (grid, 1, 1, 1)), norm),
            np.asarray(arrays["undetected"]).reshape(-1))
    return positions, adversarial.perturbation_sizes(adv, original, norm), \
        np.asarray(arrays["undetected"])


def _worst_case(ctx: Context, target: Target, named_sets: dict) -> dict:
    """Per image of the first --attack_images attacked ones, at each budget of the adaptive
    L-inf and L2 grids: whether any attack's example of it, within that budget as measured,
    is an undetected success; per attack how many it found and how many no other did."""
    s = ctx.settings
    count = min(s.images, len(target.attacked))
    classes = target.deployable.num_classes
    out = {}
    for grid, norm, field in WORST_GRIDS:
        epsilons, masks, covered = getattr(s, field), {}, {}
        for name, arrays in named_sets.items():
            positions, sizes, undetected = _examples(arrays, classes, norm)
            masks[name] = adversarial.success_within(positions, sizes, undetected, epsilons,
                                                     count)
            covered[name] = int(len(np.unique(positions[positions < count])))
        if not masks:
            continue
        worst = adversarial.worst_case(masks)
        out[grid] = {"epsilons": list(epsilons), "images": count,
                     "undetected_success": [_share(u) for u in worst["undetected"]],
                     "attacks": {name: {"images": covered[name], "found": worst["found"][name],
                                        "only": worst["only"][name]} for name in masks}}
    return out


def _matching(epsilons, grid) -> list[int | None]:
    """For each epsilon its index in `grid` (None where absent)."""
    grid = np.asarray(grid, float)
    return [next(iter(np.flatnonzero(np.isclose(grid, e))), None) for e in epsilons]


def sanity(linf: dict, doubled: dict | None = None, square: dict | None = None,
           non_adaptive: dict | None = None, transfer: dict | None = None,
           autopgd: dict | None = None, from_others: dict | None = None) -> dict:
    """Carlini et al.'s checks on the adaptive PGD-Linf curve, from per-image undetected
    successes: each argument {"epsilon": [E], "undetected": bool [E, N]} (square: on the
    first images of the same set; non_adaptive: ART's PGD-Linf, transfer: the transfer
    attack, autopgd: AutoPGD-Linf, from_others: adaptive PGD-Linf from images of other
    classes, on the same images). Check (a) asks whether the gradient attacks reach the
    large budget: an image counts when any of PGD, AutoPGD and PGD from other classes finds
    it, since a defence can mask one start or step rule and not another."""
    def same_grid(v):
        return v if v is not None and np.shape(v["undetected"]) == np.shape(
            linf["undetected"]) and np.allclose(v["epsilon"], linf["epsilon"]) else None

    autopgd, from_others = same_grid(autopgd), same_grid(from_others)
    joined = [label for label, v in (("AutoPGD-L∞", autopgd),
                                     ("PGD-L∞ from other classes' images", from_others))
              if v is not None]
    from_image = linf["undetected"] | (False if autopgd is None else autopgd["undetected"])
    strongest = from_image | (False if from_others is None else from_others["undetected"])
    at = _matching([LARGE_EPSILON], linf["epsilon"])[0]
    share = None if at is None else float(strongest[at].mean())
    same_images = linf
    if square is not None:  # on the images both attacked
        count = min(linf["undetected"].shape[1], square["undetected"].shape[1])
        same_images, square = ({"epsilon": v["epsilon"], "undetected": v["undetected"][:, :count]}
                               for v in (linf, square))
    return {
        "a_large_budget": {
            "criterion": "adaptive PGD-L∞"
                         + "".join(f" or {label}" for label in joined)
                         + " (per image, any)" * bool(joined)
                         + f" undetected success ≥ 95% at ε = {LARGE_EPSILON:g}",
            "passed": None if at is None else share >= 0.95, "undetected_success": share,
            # what the attacks that start at the image reach on their own
            **({"from_the_image": float(from_image[at].mean())}
               if at is not None and from_others is not None else {}),
            "images": int(linf["undetected"].shape[1]),
            **({"note": f"ε = {LARGE_EPSILON:g} not in the grid"} if at is None else {})},
        "b_more_steps_and_restarts": _compare(
            "doubling steps and restarts changes undetected success by ≤ 2 points at every ε",
            linf, doubled, lambda base, more: np.abs(more - base) <= POINTS + 1e-9,
            ("base", "doubled")),
        "c_gradient_free": _compare(
            "gradient-free Square never beats PGD by more than 2 points (same images and ε)",
            same_images, square, lambda pgd, sq: sq - pgd <= POINTS + 1e-9, ("pgd", "square")),
        # ART's curve is the paper's, on its own grid; (a)'s budget is left out of (d)
        "d_adaptive_vs_non_adaptive": _compare(
            "adaptive PGD-L∞ ≥ ART's PGD-L∞ (non-adaptive) at every common ε below "
            f"{LARGE_EPSILON:g}", _below(linf, LARGE_EPSILON),
            non_adaptive, lambda adaptive, art: adaptive >= art - 1e-9,
            ("adaptive", "non_adaptive")),
        "e_transfer": _compare(
            "examples transferred from another model never beat white-box PGD by more than "
            "2 points (same images and ε)", linf, transfer,
            lambda pgd, moved: moved - pgd <= POINTS + 1e-9, ("pgd", "transfer"))}


def _below(curve: dict, epsilon: float) -> dict:
    """`curve` ({"epsilon": [E], "undetected": [E, N]}) at its budgets below `epsilon`."""
    keep = np.asarray(curve["epsilon"], float) < epsilon - 1e-9
    return {"epsilon": np.asarray(curve["epsilon"])[keep],
            "undetected": np.asarray(curve["undetected"])[keep]}


def _compare(criterion: str, base: dict, other: dict | None, holds, names) -> dict:
    """`holds(base share, other share)` at every epsilon both have."""
    if other is None:
        return {"criterion": criterion, "passed": None, "note": "not run"}
    where = _matching(base["epsilon"], other["epsilon"])
    pairs = [(e, base["undetected"][i].mean(), other["undetected"][j].mean())
             for i, (e, j) in enumerate(zip(base["epsilon"], where, strict=True))
             if j is not None]
    if not pairs:
        return {"criterion": criterion, "passed": None, "note": "no common ε"}
    eps, first, second = (np.asarray(v, float) for v in zip(*pairs, strict=True))
    missing = [float(e) for e, j in zip(base["epsilon"], where, strict=True) if j is None]
    passed = bool(np.all(holds(first, second)))
    return {"criterion": criterion, "passed": None if missing and passed else passed,
            **({"not_compared_at": missing} if missing else {}),
            "images": int(base["undetected"].shape[1]), "epsilons": eps.tolist(),
            names[0]: first.tolist(), names[1]: second.tolist(),
            "differences_points": (100 * (second - first)).tolist()}


def _replay(export, made_of: dict, target: Target, sets: dict, settings) -> dict:
    """A sample of each adversarial set through the exported SavedModel (plain TensorFlow)
    and the in-memory deployable: their class ids and rejections must agree. `export`: the
    export stage's view, None when it has not run; `made_of`: the stages of our model."""
    if export is None:
        logging.info("attack: the run has no export stage; the SavedModel replay is skipped")
        return {"skipped": "the run has no export stage (run --stages=export, then attack)"}
    record = export.record()
    path = pathlib.Path(record["path"])
    if not (path / "saved_model.pb").is_file():
        logging.info("attack: %s holds no SavedModel; the replay is skipped", path)
        return {"skipped": f"{path} holds no SavedModel"}
    loaded = tf.saved_model.load(str(path))  # held: its signatures need its variables
    signature = loaded.signatures["serving_default"]
    batch = min(settings.batch_size,
                deployed.asset(path, "model_card.json")["limits"]["max_batch"])
    per_set = {}
    for name, arrays in sets.items():
        flat = arrays["adversarial"].reshape(-1, *arrays["original"].shape[1:])
        undetected = np.asarray(arrays["undetected"]).reshape(-1)
        sample = np.linspace(0, len(flat) - 1, min(settings.replay_images, len(flat)))
        # the undetected successes all: there a differing decision would matter most
        rows = np.union1d(sample.round().astype(int), np.flatnonzero(undetected))
        ours = _decisions(target.deployable.serving_default, flat[rows], batch)
        theirs = _decisions(lambda x: signature(images=x), flat[rows], batch)
        differ = (ours[0] != theirs[0]) | (ours[1] != theirs[1])
        per_set[name] = {"compared": int(len(rows)), "mismatches": int(differ.sum()),
                         "undetected_compared": int(undetected[rows].sum()),
                         "undetected_mismatches": int(differ[undetected[rows]].sum())}
    exported = export.manifest().get("inputs", {})
    current = artifacts.input_hashes({n: made_of[n].folder for n in ("train", "calibrate")})
    return {"saved_model": str(path), "version": record["version"],
            "compared": sum(v["compared"] for v in per_set.values()),
            "mismatches": sum(v["mismatches"] for v in per_set.values()),
            "undetected_compared": sum(v["undetected_compared"] for v in per_set.values()),
            "export_is_current": all(exported.get(k) == v for k, v in current.items()),
            "sets": per_set}


def _decisions(signature, images, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(class_ids, rejected) of `signature` over `images` in batches."""
    out = [signature(tf.constant(images[i:i + batch])) for i in range(0, len(images), batch)]
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return (np.concatenate([o["class_ids"].numpy() for o in out]),
            np.concatenate([o["rejected"].numpy() for o in out]))


def _publish_sets(stage_dir: pathlib.Path, names) -> list[str]:
    """parts/<name>.npz as sets/<name>.npz, an output; sets of attacks not run are removed."""
    folder = stage_dir / SETS
    for stale in folder.glob("*.npz") if folder.exists() else ():
        if stale.stem not in names:
            stale.unlink()
    for name in names:
        with artifacts.atomic_file(folder / f"{name}.npz", suffix=".npz") as tmp:
            shutil.copyfile(stage_dir / PARTS / f"{name}.npz", tmp)
    return [f"{SETS}/{name}.npz" for name in names]


def _first_image(arrays: dict, attack: str, shown: dict, row: int = 0) -> None:
    """The first attacked image's adversarial example (`row` of it; for curves at the
    smallest epsilon that got it through, else the largest) into `shown` ({"images",
    "scores"}), for Table 4 and the examples figure."""
    adv, scores, success = (arrays[k] for k in ("adversarial", "scores", "success"))
    if adv.ndim == 5:  # [epsilons, N, ...]
        through = np.flatnonzero(arrays["undetected"][:, row]) if adv.shape[1] > row else []
        at = int(through[0]) if len(through) else -1
        adv, scores, success = adv[at], scores[at], success[at]
        attack = f"{attack} ε={float(arrays['epsilon'][at]):g}"
    if len(adv) <= row:
        return
    name = attack if success[row] else f"{attack} (failed)"
    shown["images"][name] = adv[row:row + 1]
    shown["scores"][name] = scores[row].tolist()


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    config, trained = config.attack, upstream["train"]  # the stage's one section
    s = dataclasses.replace(config.settings, seed=trained.seed)
    baseline = _baseline(config, upstream)
    examples, calibration = upstream["ingest"], upstream["calibrate"]
    names = examples.class_names
    source = _transfer_source(config, upstream, names)
    count = max(s.images, s.boundary_images, s.local_search_images, s.cw_images,
                s.square_images)
    # enough test images to find `count` correctly classified and accepted ones
    images, labels = examples.arrays("test", limit=max(count * 4, 1000))
    main = _target(trained.kind, upstream, images, labels, s.batch_size, {})
    targets = {main.name: main}
    if baseline is not None:
        name = "discriminative" if main.name != "discriminative" else "baseline"
        targets[name] = _target(name, baseline[0], images, labels, s.batch_size,
                                {"baseline": baseline[1]})
    ctx = Context(s, artifacts.Parts(stage_dir / PARTS, artifacts.input_hashes(
        {name: upstream[name].folder for name in UPSTREAM})), images, labels)
    attacks = set(config.attacks)
    kappas, kappa_rule = (_cw_confidences(ctx, main, calibration, examples)
                          if "cw_l2" in attacks else (s.cw_confidences, None))
    ctx.settings = dataclasses.replace(s, cw_confidences=kappas)
    report = _report_head(examples.dataset_name, ctx, targets, main, calibration, names)
    report["cw_confidences"] = kappa_rule
    report["threat_model"] = robust.RobustTraining.from_settings(trained.settings).threat_model()
    shown = {"images": {"original": images[main.attacked[:1]]},
             "scores": {"original": main.clean[main.attacked[0]].tolist()}}
    sets = {n: {} for n in targets}
    # the adaptive attacks before the slow gradient-free ones: a stage cut short still has
    # the figures that matter most (its parts resume the rest)
    _curves(ctx, targets, attacks, report, sets)
    _adaptive(ctx, targets, main, attacks, report, sets, source)
    _minimal(ctx, main, attacks, report, sets, shown)
    report["worst_case"] = {name: _worst_case(ctx, target, sets[name])
                            for name, target in targets.items()}
    logging.info("attack: worst case over every attack %s", {
        name: {grid: v["undetected_success"] for grid, v in by_grid.items()}
        for name, by_grid in report["worst_case"].items()})
    if "pgd_accepted_linf" in report["adaptive"]:
        _first_image(sets[main.name][f"pgd_accepted_linf_{main.name}"], "pgd_accepted_linf",
                     shown)
    report["first_image"]["scores"] = shown["scores"]
    report["replay"] = _replay(upstream.get("export"), upstream, main, sets[main.name],
                               ctx.settings)
    logging.info("attack: SavedModel replay %s", {k: v for k, v in report["replay"].items()
                                                  if k != "sets"})
    return _write(stage_dir, report, names, shown["images"], sets)


def _report_head(dataset: str, ctx: Context, targets: dict, main: Target, calibration, names
                 ) -> dict:
    """The report's settings, clean rejection rates and thresholds; empty attack sections."""
    first = int(main.attacked[0])
    return {"dataset": dataset, "model": main.name, "score": calibration.score.name,
            "paper_score": bool(getattr(calibration.score, "paper", False)),
            "settings": dataclasses.asdict(ctx.settings), "budgets": attack_report.BUDGETS,
            "clean": {n: _clean(t, ctx.labels) for n, t in targets.items()},
            "thresholds": {str(p): [float(x) for x in t] for p, t in main.percentiles.items()},
            "deployed": {"percentile": str(calibration.deployed()[0]),
                         "thresholds": [float(x) for x in main.rule.thresholds],
                         "min_gap": main.rule.min_gap},
            "worst_case": {}, "curves": {}, "curves_undetected": {}, "untargeted": {},
            "cw_l2": {}, "adaptive": {}, "sanity": {},
            "first_image": {"index": first, "label": names[ctx.labels[first]]}}


def _curves(ctx: Context, targets: dict, attacks: set, report: dict, sets: dict) -> None:
    """The paper's FGSM/PGD accuracy curves, on every target."""
    for attack in [a for a in adversarial.CURVE_ATTACKS if a in attacks]:
        for name, target in targets.items():
            summary, sets[name][f"{attack}_{name}"] = _curve(ctx, target, attack)
            report["curves"].setdefault(attack, {})[name] = summary.pop("accuracy")
            report["curves_undetected"].setdefault(attack, {})[name] = summary
        logging.info("attack: %s accuracies %s, undetected %s", attack, report["curves"][attack],
                     report["curves_undetected"][attack])


def _minimal(ctx: Context, main: Target, attacks: set, report: dict, sets: dict,
             shown: dict) -> None:
    """The paper's minimal (untargeted) and CW-L2 attacks, on our model."""
    for attack in [a for a in adversarial.UNTARGETED_ATTACKS if a in attacks]:
        summary, sets[main.name][attack] = _untargeted(ctx, main, attack)
        report["untargeted"][attack] = summary
        _first_image(sets[main.name][attack], attack, shown)
        logging.info("attack: %s success %s, detection %s, undetected %s (%.0f s)", attack,
                     summary["success_rate"], summary["detection_rate"],
                     summary["undetected_success"], summary["seconds"])
    for kappa in ctx.settings.cw_confidences if "cw_l2" in attacks else ():
        name = f"cw_l2_k{kappa:g}"
        summary, arrays = _carlini(ctx, main, kappa)
        sets[main.name][name] = arrays
        names = main.deployable.class_names
        first = slice(0, len(names) - 1)  # the first image's attacks
        summary["first_image_target_scores"] = {
            names[t]: (float(sc[t]) if ok else None) for t, sc, ok in zip(
                arrays["target"][first], arrays["scores"][first], arrays["success"][first],
                strict=True)}
        report["cw_l2"][f"{kappa:g}"] = summary
        logging.info("attack: CW-L2 kappa=%g success %s, detection %s, undetected %s", kappa,
                     summary["success_rate"], summary["detection_rate"],
                     summary["undetected_success"])
        ok = np.flatnonzero(arrays["success"][first])
        if len(ok):
            _first_image(arrays, name, shown, int(ok[0]))


def _adaptive(ctx: Context, targets: dict, main: Target, attacks: set, report: dict,
              sets: dict, source: Source | None = None) -> None:
    """The adaptive attacks (PGD and AutoPGD curves and CW-accepted on every target; the
    doubled curve, Square and the transfer from `source` on the main model) and the sanity
    checks."""
    adaptive = report["adaptive"]
    for attack in (a for a in ADAPTIVE_CURVES if a in attacks):
        for name, target in targets.items():
            summary, sets[name][f"{attack}_{name}"] = _accepted_curve(ctx, target, attack)
            adaptive.setdefault(attack, {})[name] = summary
            logging.info("attack: %s of %s: undetected %s", attack, name,
                         summary["undetected_success"])
    if "pgd_accepted_linf_doubled" in attacks:
        summary, sets[main.name]["pgd_accepted_linf_doubled"] = _accepted_curve(
            ctx, main, "pgd_accepted_linf", doubled=True)
        adaptive["pgd_accepted_linf_doubled"] = {main.name: summary}
    if source is not None:
        summary, sets[main.name][TRANSFER_PART] = _transfer(ctx, main, source)
        adaptive[TRANSFER_PART] = {main.name: summary}
        logging.info("attack: transfer from the %s: undetected %s (on the source %s)",
                     source.name, summary["undetected_success"],
                     summary["source_undetected_success"])
    if "square_accepted" in attacks:
        summary, sets[main.name]["square_accepted"] = _square(ctx, main)
        adaptive["square_accepted"] = {main.name: summary}
    if "cw_accepted" in attacks:
        for name, target in targets.items():
            # the main model's part keeps its name from before baselines were attacked too
            part = "cw_accepted" if target is main else f"cw_accepted_{name}"
            summary, sets[name][part] = _cw_accepted(ctx, target, part)
            adaptive.setdefault("cw_accepted", {})[name] = summary
    ours = sets[main.name]
    if "pgd_accepted_linf" in attacks:
        report["sanity"] = sanity(
            ours[f"pgd_accepted_linf_{main.name}"], ours.get("pgd_accepted_linf_doubled"),
            ours.get("square_accepted"), ours.get(f"pgd_{main.name}"),
            ours.get(TRANSFER_PART), ours.get(f"apgd_accepted_linf_{main.name}"),
            ours.get(f"pgd_accepted_linf_from_others_{main.name}"))
        logging.info("attack: sanity checks %s",
                     {k: v["passed"] for k, v in report["sanity"].items()})


def _write(stage_dir: pathlib.Path, report: dict, names, examples: dict, sets: dict
           ) -> list[str]:
    outputs = [REPORT_JSON, REPORT_MD]
    if report["curves"]:
        plots.accuracy_curves(report["settings"]["epsilons"], report["curves"],
                              stage_dir / CURVES_PNG)
        outputs.append(CURVES_PNG)
    panels = attack_report.undetected_panels(report)
    if panels:
        plots.undetected_curves(panels, stage_dir / UNDETECTED_PNG)
        outputs.append(UNDETECTED_PNG)
    thresholds = report["deployed"]["thresholds"]
    shown = report["first_image"]["scores"]
    reasons = rejection.decide(np.asarray(list(shown.values())), thresholds,
                               min_gap=report["deployed"].get("min_gap")).reasons().numpy()
    captions = []
    for (name, sc), reason in zip(shown.items(), reasons, strict=True):
        c = int(np.argmax(sc))
        verdict = f"rejected ({reason.decode()})" if reason else "accepted"
        captions.append(f"{name}\n{names[c]}: {sc[c]:.1f} vs {thresholds[c]:.1f}\n{verdict}")
    plots.image_grid([examples[k][0] for k in report["first_image"]["scores"]], captions,
                     stage_dir / EXAMPLES_PNG, columns=min(5, len(captions)),
                     title="First attacked test image: top score vs the deployed threshold")
    with artifacts.atomic_file(stage_dir / EXAMPLES_NPZ, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **examples)
    outputs += [EXAMPLES_PNG, EXAMPLES_NPZ]
    outputs += _publish_sets(stage_dir, [n for by_part in sets.values() for n in by_part])
    report["figures"] = [o for o in outputs if o.endswith(".png")]
    artifacts.write_json(stage_dir / REPORT_JSON, report)
    artifacts.write_text(stage_dir / REPORT_MD, attack_report.markdown(report, names))
    return outputs
