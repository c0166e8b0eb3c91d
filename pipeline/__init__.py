"""The sdim-tf pipeline: ingest -> train -> calibrate -> evaluate -> explain -> export."""
