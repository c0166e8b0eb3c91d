"""Datasets: the registry, the sources (IDX files, your own image folders, tfds), the image
policy, the examples on disk (TFRecords), preprocessing and augmentation.

One preprocessing function (`preprocess`) serves training, calibration and the exported
SavedModel, so what the model sees in production is what it saw in training.

Modules: `registry` (which datasets exist), `sources` (where one comes from), `idx`,
`tfds_source`, `folders` (your own images: layouts, skipped files, the split), `images` (one
file -> one example), `examplegen` (folders -> shards, in process), `beam` (the same on
Apache Beam; imported on demand), `drivers` (either), `tfrecords`, `statistics`,
`preprocessing`, `augmentation`.
"""

from sdim_tf.data.augmentation import AUGMENTATIONS, PAD, augment
from sdim_tf.data.drivers import write_examples
from sdim_tf.data.examplegen import FILES, Written, write_local
from sdim_tf.data.folders import (
    MIN_PER_CLASS,
    FolderOptions,
    Item,
    Listing,
    Skipped,
    list_images,
)
from sdim_tf.data.idx import IDX_NAMES, idx_files, load_idx, save_idx
from sdim_tf.data.images import ImageEncoder, ImagePolicy
from sdim_tf.data.preprocessing import IMAGE_SIZE, image_batches, preprocess
from sdim_tf.data.registry import (
    DATA_DIR_ENV,
    DATASETS,
    SPLITS,
    DataError,
    DatasetSpec,
    get_spec,
)
from sdim_tf.data.sources import (
    Source,
    Split,
    find_source,
    list_folder,
    load_split,
    load_split_with_source,
    policy_for,
)
from sdim_tf.data.statistics import SplitStats
from sdim_tf.data.tfrecords import (
    EXAMPLES_PER_SHARD,
    FEATURES,
    SCHEMA,
    ShardWriter,
    make_dataset,
    parse_examples,
    serialize_example,
    write_shards,
)

__all__ = [
    "AUGMENTATIONS", "DATASETS", "DATA_DIR_ENV", "EXAMPLES_PER_SHARD", "FEATURES", "FILES",
    "IDX_NAMES", "IMAGE_SIZE", "MIN_PER_CLASS", "PAD", "SCHEMA", "SPLITS", "DataError",
    "DatasetSpec", "FolderOptions", "ImageEncoder", "ImagePolicy", "Item", "Listing",
    "ShardWriter", "Skipped", "Source", "Split", "SplitStats", "Written", "augment", "find_source",
    "get_spec", "idx_files", "image_batches", "list_folder", "list_images", "load_idx",
    "load_split", "load_split_with_source", "make_dataset", "parse_examples", "policy_for",
    "preprocess", "save_idx", "serialize_example", "write_examples", "write_local",
    "write_shards",
]
