"""tensorflow-datasets as the last source: prepared data first; a download only when the
download server answers within seconds (offline, tfds would retry for minutes)."""

from __future__ import annotations

import os
import threading
import urllib.parse

import numpy as np

from sdim_tf.data.idx import IDX_NAMES
from sdim_tf.data.registry import DATA_DIR_ENV, DataError, DatasetSpec

CHECK_SECONDS = 5.0


def folder_layout(spec: DatasetSpec) -> str:
    """Where a dataset's files go in a folder passed as --data_dir or SDIM_DATA_DIR."""
    name = spec.name
    if spec.idx:
        files = ", ".join(f"{stem}.gz" for pair in IDX_NAMES.values() for stem in pair)
        return f"FOLDER/{name}/{{{files}}}"
    return f"FOLDER/{name}/train/<class>/*.png and FOLDER/{name}/test/<class>/*.png"


def no_source_message(spec: DatasetSpec, detail: str) -> str:
    return (f"no source for dataset {spec.name!r} ({detail}): put its files in "
            f"{folder_layout(spec)} and pass --data_dir=FOLDER or set {DATA_DIR_ENV}=FOLDER "
            f"(or prepare it with tfds while online)")


def unreachable(url: str, seconds: float = CHECK_SECONDS) -> str:
    """Why `url`'s server gives no answer within `seconds` ("" when it answers, whatever the
    status). Name resolution included: the request runs in a thread given `seconds`."""
    import requests

    outcome: list[str] = []

    def probe():
        try:
            requests.head(url, timeout=seconds, allow_redirects=False)
            outcome.append("")
        except requests.RequestException as e:
            outcome.append(type(e).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds + 1.0)
    host = urllib.parse.urlsplit(url).netloc
    if not outcome:
        return f"{host} gave no answer within {seconds:g} s"
    return f"{host} unreachable: {outcome[0]}" if outcome[0] else ""


def load_tfds(spec: DatasetSpec, split: str, allow_download: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W, C], int64 labels [N]) of a tfds dataset."""
    import tensorflow_datasets as tfds  # heavy; only this source needs it

    # tfds reads TFDS_DATA_DIR when it is imported; read it per call
    data_dir = os.environ.get("TFDS_DATA_DIR") or None

    def load(download: bool):
        ds = tfds.load(spec.tfds_name, split=split, as_supervised=True, download=download,
                       data_dir=data_dir)
        # Batches of 10k, not batch_size=-1 (which aborts on tfds' mock generator).
        batches = list(tfds.as_numpy(ds.batch(10_000)))
        return (np.concatenate([b[0] for b in batches]).astype(np.uint8),
                np.concatenate([b[1] for b in batches]).astype(np.int64))

    try:
        return load(download=False)  # a prepared dataset never touches the network
    except Exception as e:  # tfds raises several unrelated types when data is missing
        prepared_error = e
    if not allow_download:
        raise DataError(no_source_message(spec, f"not prepared for tfds: "
                                          f"{type(prepared_error).__name__}"))
    why = unreachable(spec.download_url) if spec.download_url else ""
    if why:
        raise DataError(no_source_message(spec, f"tfds cannot download it: {why}"))
    try:
        return load(download=True)
    except Exception as e:
        raise DataError(no_source_message(spec, f"tfds failed: {e}")) from None
