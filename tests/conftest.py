"""Shared fixtures: the real datasets of ../shared and one tiny trained model per session."""

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
# The README passes a path relative to the repository; the CLI tests start processes in
# other folders, which inherit this environment.
if os.environ.get("SDIM_DATA_DIR"):
    os.environ["SDIM_DATA_DIR"] = str(pathlib.Path(os.environ["SDIM_DATA_DIR"]).resolve())


def real_data_dir() -> pathlib.Path:
    """The folder of real MNIST/Fashion-MNIST IDX files; tests that need it fail without it."""
    folder = pathlib.Path(os.environ.get("SDIM_DATA_DIR", _DEFAULT_DATA))
    if not (folder / "fashion_mnist").is_dir():
        pytest.fail(f"real datasets not found at {folder}: set SDIM_DATA_DIR")
    return folder.resolve()


@pytest.fixture(scope="session", autouse=True)
def precision_probe_cache(tmp_path_factory) -> pathlib.Path:
    """The --mixed_precision=auto probe's cache (sdim_tf.precision_probe.CACHE_ENV) for this
    session and the processes it starts: tests neither read nor fill the user's."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ["SDIM_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return real_data_dir()


@pytest.fixture(scope="session")
def fashion_ingest(tmp_path_factory, data_dir):
    """Real Fashion-MNIST ingested once per session: (stage folder, metadata)."""
    from pipeline.stages import ingest

    out = tmp_path_factory.mktemp("ingest") / "fashion_mnist"
    return out, ingest.ingest("fashion_mnist", out, data_dir=str(data_dir))


# constant: tests take the tiny run to more epochs, which a cosine run refuses; the unfamiliar
# refusal alone (test_promises calibrates it again with --max_error; the README's smoke run,
# in test_readme, takes the default)
TINY = dict(dataset="fashion_mnist", epochs=2, train_limit=1024, batch_size=128,
            shift_images=200, lr_schedule="constant", max_error=0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
    """One tiny pipeline run shared by the tests (2 epochs on 1024 real images)."""
    from pipeline import run
    from pipeline.config import PipelineConfig

    base = tmp_path_factory.mktemp("tiny_run")
    config = PipelineConfig.from_flat(**TINY, data_dir=str(data_dir), run_dir=str(base / "run"))
    return config, run.run(config)
