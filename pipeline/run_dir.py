"""The run directory's contract: every stage's artifacts, where they live and how they load.

TFX components never import each other; they exchange typed artifacts through a store that
knows where each lives. Here that store is a run directory, and this module is its only
map: a stage (and bench/) reaches upstream outputs through the typed views below, which own
the file names, the loading, the schema version and the validation. Changing what a stage
writes is an edit here and in that stage, nowhere else.

    run = Run("runs/fashion_mnist-sdim")
    run.examples.dataset("test")          # ingest
    run.model.best()                      # train
    run.calibration.deployed()            # calibrate
    run.deployable()                      # what export serves: scorer + thresholds + rule

A stage gets the same views, for its declared inputs only, from the runner (`upstream`).
"""

from __future__ import annotations

import csv
import functools
import os
import pathlib

import keras
import numpy as np
import tensorflow as tf

from pipeline import artifacts
from sdim_tf import data, precision, rejection, rules, scores, serving

# Of the artifacts below, recorded in every stage's manifest and in train's state.json; a
# reader refuses another one.
SCHEMA_VERSION = 2


class ArtifactError(ValueError):
    """An artifact is missing, unreadable or invalid; the message names the file."""


def _read_json(path: pathlib.Path) -> dict:
    try:
        obj = artifacts.read_json(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing; rerun the stage that writes it") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read ({e}); rerun its stage with --force") \
            from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return obj


def _schema_version(path: pathlib.Path) -> int:
    """The schema a manifest or state.json was written under (1 before it was recorded); an
    absent or unreadable file counts as current: its stage reruns or names it."""
    try:
        return artifacts.read_json(path).get("schema_version", 1)
    except (OSError, ValueError, AttributeError):
        return SCHEMA_VERSION


class Artifact:
    """One stage's output folder."""

    stage = ""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)

    def exists(self) -> bool:
        return (self.folder / artifacts.MANIFEST).exists()

    def manifest(self) -> dict:
        return _read_json(self.folder / artifacts.MANIFEST)

    def check_schema(self) -> None:
        """Refuses outputs written under another schema (manifests before it count as 1)."""
        version = self.manifest().get("schema_version", 1)
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"{self.folder} was written with schema version {version}, "
                                f"this code reads {SCHEMA_VERSION}; rerun {self.stage or 'it'} "
                                "with --force")


class Examples(Artifact):
    """ingest: TFRecord shards per split + metadata.json (counts, shape, class names)."""

    stage = "ingest"
    METADATA = "metadata.json"

    @functools.cached_property
    def metadata(self) -> dict:
        meta = _read_json(self.folder / self.METADATA)
        missing = [k for k in ("num_classes", "class_names", "image_shape", "splits",
                               "augmentation") if k not in meta]
        if missing:
            raise ArtifactError(f"{self.folder / self.METADATA} lacks {missing}")
        return meta

    def write_metadata(self, metadata: dict, folder: pathlib.Path | None = None) -> None:
        """Into `folder` (ingest's temporary folder) or the artifact's own."""
        artifacts.write_json((folder or self.folder) / self.METADATA, metadata)

    @property
    def dataset_name(self) -> str:
        return self.metadata["dataset"]

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def image_shape(self) -> list[int]:
        return list(self.metadata["image_shape"])

    def num_examples(self, split: str) -> int:
        return int(self.metadata["splits"][split]["num_examples"])

    def shard_files(self, split: str) -> list[str]:
        """The TFRecord shards of `split`, in order."""
        files = [self.folder / f for f in self.metadata["splits"][split]["files"]]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise ArtifactError(f"ingested shards missing: {absent}; rerun ingest with --force")
        return [str(f) for f in files]

    def dataset(self, split: str, skip: int = 0, limit: int | None = None,
                batch_size: int = 500, training: bool = False, seed: int = 0,
                indices: list[int] | None = None, repeat: bool = False) -> tf.data.Dataset:
        """Preprocessed (images, labels) batches in file order (training: shuffled and
        augmented as ingest recorded): `limit` after `skip`, or those at `indices`;
        `repeat`: endlessly."""
        return data.make_dataset(self.shard_files(split), self.image_shape, batch_size,
                                 training=training, seed=seed, skip=skip, limit=limit,
                                 indices=indices, repeat=repeat,
                                 augmentation=self.metadata["augmentation"] if training
                                 else "none")

    def arrays(self, split: str, limit: int | None = None, skip: int = 0,
               indices: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(images float32 [N, 32, 32, C] in [0, 1], labels [N]): `limit` after `skip`, or
        those at `indices`."""
        batches = list(self.dataset(split, skip, limit, indices=indices).as_numpy_iterator())
        return (np.concatenate([b[0] for b in batches]).astype(np.float32),
                np.concatenate([b[1] for b in batches]))

    def labels(self, split: str) -> np.ndarray:
        """The labels of `split` in file order, read without decoding the images."""
        feature = {"label": data.FEATURES["label"]}
        ds = tf.data.TFRecordDataset(self.shard_files(split)).batch(4096).map(
            lambda s: tf.io.parse_example(s, feature)["label"])
        return np.concatenate([np.zeros(0, np.int64), *ds.as_numpy_iterator()])


class TrainedModel(Artifact):
    """train: the best (least training loss) and last checkpoints, history, state."""

    stage = "train"
    BEST, LAST = "checkpoints/best.keras", "checkpoints/last.keras"
    STATE, HISTORY, LOGS = "state.json", "history.csv", "logs"
    OUTPUTS = (BEST, LAST, HISTORY, STATE)

    @property
    def best_path(self) -> pathlib.Path:
        return self.folder / self.BEST

    @property
    def last_path(self) -> pathlib.Path:
        return self.folder / self.LAST

    def best(self) -> keras.Model:
        """The checkpoint of least training loss (what the paper evaluates)."""
        return load_checkpoint(self.best_path, float32=True)

    def state(self) -> dict:
        return _read_json(self.folder / self.STATE)

    def write_state(self, state: dict) -> None:
        artifacts.write_json(self.folder / self.STATE, {**state, "schema_version": SCHEMA_VERSION})

    @property
    def settings(self) -> dict:
        """The flags the model was trained with (the train manifest's config)."""
        return self.manifest()["config"]

    @property
    def kind(self) -> str:
        """sdim or discriminative."""
        return self.settings["model"]

    @property
    def seed(self) -> int:
        """The run's seed, which later stages' random choices follow too."""
        return int(self.settings["seed"])

    def examples(self, split: str) -> tuple[int, int] | None:
        """(skip, limit) of the training images the model trained on (`split="trained"`), or
        of those held out (`"held_out"`, None when nothing was held out); for images chosen
        by position (`selection`), an ArtifactError."""
        selection = self.selection(split)
        if selection is not None and "indices" in selection:
            raise ArtifactError(f"{self.folder / self.STATE}: the {split} images are chosen "
                                "per class, not a range; read them with selection()")
        return None if selection is None else (selection["skip"], selection["limit"])

    def selection(self, split: str) -> dict | None:
        """The training images the model trained on (`split="trained"`), or those held out
        (`"held_out"`, None when nothing was held out), as `Examples.dataset` arguments:
        {"skip", "limit"} or {"indices"}."""
        chosen = self.state()["examples"][split]
        if chosen is None:
            return None
        if isinstance(chosen, dict):
            return {"indices": list(chosen["indices"])}
        return {"skip": chosen[0], "limit": chosen[1]}

    @staticmethod
    def state_examples(selection: dict | None) -> list | dict | None:
        """A `selection` as state.json keeps it: [skip, limit] or {"indices"}."""
        if selection is None or "indices" in selection:
            return selection
        return [selection["skip"], selection["limit"]]

    def history(self) -> list[dict]:
        """The per-epoch rows of history.csv as dicts of floats."""
        path = self.folder / self.HISTORY
        if not path.exists():
            raise ArtifactError(f"{path} is missing; rerun train")
        with open(path, newline="") as f:
            # a column added after the first epochs (a resumed run) is empty before it
            return [{k: float(v) for k, v in row.items() if v != ""}
                    for row in csv.DictReader(f)]


def load_checkpoint(path: str | os.PathLike, float32: bool = False) -> keras.Model:
    """Loads a .keras checkpoint (Keras safe mode: no code runs); a corrupt or missing one is
    an ArtifactError naming the file. `float32`: computing in float32 whatever the policy it
    was trained under (`as_float32`)."""
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except Exception as e:  # Keras raises many types for a damaged archive
        raise ArtifactError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); delete it or "
                            f"rerun with --force") from None
    return as_float32(model) if float32 else model


def as_float32(model: keras.Model) -> keras.Model:
    """`model` computing in float32. One trained under mixed_bfloat16 keeps that policy in its
    layers' configs; it is rebuilt from its config under float32 and given its weights (kept
    in float32 by the mixed policy), so that what is calibrated and exported never computes
    in bf16, which is emulated and 7x slower on CPUs without AVX512-BF16."""
    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers()):
        return model
    config = {k: v for k, v in model.get_config().items() if k != "dtype"}
    with precision.policy("float32"):
        rebuilt = type(model).from_config(config)  # the models build in __init__
    rebuilt.set_weights(model.get_weights())
    return rebuilt


class Calibration(Artifact):
    """calibrate: thresholds.json (the score and its settings, the thresholds per percentile
    and class, the deployed ones and their promises) and what the score saved to load its
    scorer (`sdim_tf.scores`: density.npz for feature_density)."""

    stage = "calibrate"
    THRESHOLDS = "thresholds.json"

    @functools.cached_property
    def saved(self) -> dict:
        """thresholds.json, validated."""
        path = self.folder / self.THRESHOLDS
        saved = _read_json(path)
        try:
            names = saved["class_names"]
            percentiles = {p: np.asarray(v["thresholds"], np.float64)
                           for p, v in rejection.from_json(saved["percentiles"]).items()}
            deployed = saved["deployed"]["percentile"]
            min_gap = saved["deployed"].get("min_gap")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path} is not a calibration ({type(e).__name__}: {e})") \
                from None
        problems = []
        try:
            self._score(saved)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(str(e).strip("'\""))
        if deployed not in saved["percentiles"]:
            problems.append(f"deployed percentile {deployed} not calibrated")
        for p, t in percentiles.items():
            if t.shape != (len(names),) or np.isnan(t).any() or (t == -np.inf).any():
                problems.append(f"percentile {p}: thresholds must be {len(names)} numbers "
                                "or null")
        if min_gap is not None and not (isinstance(min_gap, (int, float))
                                        and np.isfinite(min_gap)):
            problems.append(f"deployed min_gap must be a number or null, got {min_gap!r}")
        if problems:
            raise ArtifactError(f"{path}: {'; '.join(problems)}")
        return saved

    @staticmethod
    def _score(saved: dict) -> scores.Score:
        settings = saved.get("score_settings")
        if settings is None and saved.get("score") == "feature_density":
            # written before the score kept its own settings: the density's keys
            if not saved.get("density_layers"):
                raise ValueError("no density_layers")
            settings = {"layers": saved["density_layers"],
                        "split": bool(saved.get("density_split"))}
        return scores.get(saved["score"])(**(settings or {}))

    def write_thresholds(self, obj: dict) -> None:
        artifacts.write_json(self.folder / self.THRESHOLDS, obj)

    @property
    def score(self) -> scores.Score:
        """The deployed score (`sdim_tf.scores`), with the settings it was fitted with."""
        return self._score(self.saved)

    def percentiles(self) -> dict:
        """{percentile: {"thresholds": np.ndarray [C], "counts": [C]}}."""
        return rejection.from_json(self.saved["percentiles"])

    def deployed(self) -> tuple[float | str, np.ndarray]:
        """(percentile, or the rule's name, and the thresholds [C]) that the run deploys."""
        key = self.saved["deployed"]["percentile"]
        (percentile, value), = rejection.from_json({key: self.saved["percentiles"][key]}).items()
        return percentile, value["thresholds"]

    def min_gap(self) -> float | None:
        """The deployed ambiguity threshold on the gap (`rules.ambiguous`); None: no answer
        is refused as ambiguous (also for calibrations written before it existed)."""
        return self.saved["deployed"].get("min_gap")

    def promises(self) -> dict:
        """{reason: what the deployed refusal promises, in words}; for no ambiguity
        threshold None, or "none (why)" where the held-out images could not support the
        preset's."""
        deployed = self.saved["deployed"]
        ambiguity, unsupported = deployed.get("ambiguity") or {}, deployed.get(
            "ambiguity_unsupported")
        return {rejection.UNFAMILIAR: deployed.get("promise", deployed.get("guarantee")),
                rejection.AMBIGUOUS: ambiguity.get("promise") or (
                    f"none ({unsupported})" if unsupported else None)}

    def rules(self) -> tuple[rules.Rule, rules.Rule | None]:
        """(the unfamiliar rule, the ambiguity rule or None) with the settings calibrate
        chose the deployed thresholds with."""
        deployed = self.saved["deployed"]
        if "unfamiliar" not in deployed:
            raise ArtifactError(f"{self.folder / self.THRESHOLDS} does not record its rules' "
                                "settings; rerun calibrate with --force")
        return tuple(None if record is None else rules.build(record["rule"], record)
                     for record in (deployed["unfamiliar"], deployed.get("ambiguity")))

    def scoring_model(self, classifier: keras.Model) -> keras.Model:
        """What the run deploys on top of `classifier`: images -> [N, C] class scores (the
        classifier itself, or its fitted scorer, as the score loads it)."""
        try:
            return self.score.load(classifier, self.folder)
        except ValueError as e:
            raise ArtifactError(f"{e}; rerun calibrate with --force") from None


class Evaluation(Artifact):
    """evaluate: report.json (figures), report.md and histograms."""

    stage = "evaluate"
    REPORT_JSON, REPORT_MD = "report.json", "report.md"

    def report(self) -> dict:
        return _read_json(self.folder / self.REPORT_JSON)

    def write_report(self, report: dict) -> None:
        artifacts.write_json(self.folder / self.REPORT_JSON, report)


class ExportRecord(Artifact):
    """export: export.json, where the SavedModel went."""

    stage = "export"
    EXPORT_JSON = "export.json"

    def record(self) -> dict:
        return _read_json(self.folder / self.EXPORT_JSON)

    def write_record(self, path: pathlib.Path, model_name: str) -> None:
        artifacts.write_json(self.folder / self.EXPORT_JSON, {"path": str(path.resolve()),
                                                     "version": int(path.name),
                                                     "model_name": model_name})


VIEWS = {view.stage: view for view in (Examples, TrainedModel, Calibration, Evaluation,
                                        ExportRecord)}


class Run:
    """A typed view of a run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        self.examples = Examples(self.root / Examples.stage)
        self.model = TrainedModel(self.root / TrainedModel.stage)
        self.calibration = Calibration(self.root / Calibration.stage)
        self.evaluation = Evaluation(self.root / Evaluation.stage)
        self.export = ExportRecord(self.root / ExportRecord.stage)

    def artifact(self, stage: str) -> Artifact:
        """The typed view of `stage`'s outputs (a plain Artifact for stages nobody reads)."""
        return VIEWS.get(stage, Artifact)(self.root / stage)

    def views(self, stages: tuple[str, ...], prefix: str) -> dict[str, Artifact]:
        """{"<prefix>/<stage>": view}: another run's stages as inputs of a stage of this one."""
        return {f"{prefix}/{stage}": self.artifact(stage) for stage in stages}

    def schema_problem(self) -> str | None:
        """What to do with a run directory written under another schema, or None."""
        written = [*self.root.glob(f"*/{artifacts.MANIFEST}"), self.model.folder / self.model.STATE]
        old = sorted({v for v in map(_schema_version, written) if v != SCHEMA_VERSION})
        if not old:
            return None
        return (f"{self.root} was written under run-directory schema {old[0]}, this code reads "
                f"{SCHEMA_VERSION}: rerun with --force to rebuild it (train starts afresh), or "
                "pass a new --run_dir")

    def scoring_model(self) -> keras.Model:
        return self.calibration.scoring_model(self.model.best())

    def deployable(self, limits: serving.Limits | None = None) -> serving.RejectingClassifier:
        return rejecting_classifier(self.examples, self.model, self.calibration, limits)


def rejecting_classifier(examples: Examples, model: TrainedModel, calibration: Calibration,
               limits: serving.Limits | None = None) -> serving.RejectingClassifier:
    """What a run deploys, in one object: the scoring model, the deployed thresholds (and
    ambiguity threshold) and the decision rule, for the run's input size and classes."""
    shape = examples.image_shape
    return serving.RejectingClassifier(
        calibration.scoring_model(model.best()), calibration.deployed()[1], shape[-1],
        shape[:2], class_names=examples.class_names, limits=limits,
        min_gap=calibration.min_gap())
