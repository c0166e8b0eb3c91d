"""Name -> class tables with a decorator, so that a new score or rule is one module."""

from __future__ import annotations


class Registry:
    """The classes of one kind ("score", "rule") by their `name`; `register` is the class
    decorator, `get` finds one or names the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self.classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        if cls.name in self.classes:
            raise ValueError(f"{self.kind} {cls.name!r} is registered twice")
        self.classes[cls.name] = cls
        return cls

    def get(self, name: str) -> type:
        try:
            return self.classes[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: "
                             f"{', '.join(self.names())}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.classes))
