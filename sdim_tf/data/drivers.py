"""The ingest drivers of your own images, by name (`FolderOptions.ingest_driver`)."""

from __future__ import annotations

import os

from sdim_tf.data.examplegen import Written, write_local
from sdim_tf.data.folders import FolderOptions, Listing
from sdim_tf.data.images import ImagePolicy


def write_examples(listing: Listing, policy: ImagePolicy, folder: str | os.PathLike,
                   options: FolderOptions, progress: bool = True) -> Written:
    """Shards, files.csv and the figures of `listing`, by the driver `options.ingest_driver`."""
    if options.ingest_driver == "beam":
        from sdim_tf.data import beam  # apache_beam: an optional dependency

        return beam.write_beam(listing, policy, folder, options.on_bad_file,
                               options.beam_pipeline_args)
    return write_local(listing, policy, folder, options.on_bad_file, progress)
