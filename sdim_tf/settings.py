"""Settings dataclasses that document their own fields.

A field made with `setting` carries its help text and choices in its metadata, where a tool
that makes command-line flags of the settings reads them (the pipeline's
`sections.library`); a field without a help is no flag and keeps its default.
"""

from __future__ import annotations

import dataclasses


def setting(default, help: str, choices: tuple | None = None):
    """A field with its --help text and, when it takes one of a few values, those."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})

