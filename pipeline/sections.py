"""Nested dataclass configs whose fields are absl flags: the machinery of `pipeline.config`.

A config is a frozen dataclass of sections, each a `Section` dataclass whose fields are flags
(`option`: default, help, choices) or a library's settings dataclass taken as it is
(`library`). Flag names are the field names, unique across sections; `leaves` lists them
with where they live, `define_flags` makes the absl flags and `Section.replace` takes them by
name.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

from absl import flags


class ConfigError(ValueError):
    """An invalid flag or flag combination; the message names it."""


def option(default, help: str, choices=None, key: bool = True):
    """A flag of the field's name; `key`: a change reruns the stage (else it says only how
    to compute, e.g. on which devices)."""
    return dataclasses.field(default=default, metadata={"flag": True, "help": help,
                                                         "choices": choices, "key": key})


def derived(factory, help: str):
    """Filled in by the config's `resolve` from other flags: no flag, no cache key."""
    return dataclasses.field(default_factory=factory, metadata={"help": help})


def library(cls, prefix: str = ""):
    """A library's settings dataclass as it is: its fields with a help (`sdim_tf.settings`)
    are the flags `prefix + name`; the others keep the library's values."""
    return dataclasses.field(default_factory=cls, metadata={"library": True, "prefix": prefix})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One flag: its name, the attribute path to its field, the field's type and help."""

    name: str
    path: tuple[str, ...]
    hint: typing.Any
    default: typing.Any
    help: str
    choices: tuple | None
    key: bool

    @property
    def group(self) -> str:
        """The section holding it ("run" for the config's own fields)."""
        return self.path[0] if len(self.path) > 1 else "run"

    @property
    def item(self) -> type | None:
        """float for tuple[float, ...] (Optional or not), None for other types."""
        for hint in (self.hint, *typing.get_args(self.hint)):
            if typing.get_origin(hint) is tuple:
                return typing.get_args(hint)[0]
        return None

    def coerce(self, value):
        """A list (from a flag) or one value as a tuple of the field's item type."""
        if self.item is None or value is None:
            return value
        try:
            values = [value] if isinstance(value, (str, int, float)) else value
            return tuple(self.item(v) for v in values)
        except ValueError:
            raise ConfigError(f"--{self.name} must be numbers, got {list(value)}") from None


@functools.cache
def leaves(cls) -> tuple[Leaf, ...]:
    """The flags of config class `cls`, its sections' and libraries' included, in order."""
    def walk(cls, path=(), prefix=None):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta, where = f.metadata, (*path, f.name)
            if "library" in meta or Section in getattr(hints[f.name], "__mro__", ()):
                yield from walk(hints[f.name], where, meta.get("prefix"))
            elif meta.get("flag") or (prefix is not None and "help" in meta):
                yield Leaf((prefix or "") + f.name, where, hints[f.name], f.default,
                           meta["help"], meta["choices"], meta.get("key", True))
    return tuple(walk(cls))


def check(checks) -> None:
    """Raises ConfigError with the message of the first (ok, message) that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


class Section:
    """A group of flags; `checks()` lists its own (ok, one-line message) pairs."""

    def flat(self, keyed_only: bool = False) -> dict:
        """{flag name: value}; `keyed_only`: what a stage's cache key hashes."""
        return {leaf.name: functools.reduce(getattr, leaf.path, self)
                for leaf in leaves(type(self)) if leaf.key or not keyed_only}

    @classmethod
    def from_flat(cls, **values):
        return cls().replace(**values)

    def replace(self, **values):
        """A copy with flags changed by name (lists become tuples of the field's type)."""
        by_name = {leaf.name: leaf for leaf in leaves(type(self))}
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        return _replace(self, {by_name[k].path: by_name[k].coerce(v) for k, v in values.items()})

    def view(self, names: tuple[str, ...]) -> types.SimpleNamespace:
        """The sections `names` alone."""
        return types.SimpleNamespace(**{n: getattr(self, n) for n in names})

    def checks(self) -> list:
        return []

    def validate(self) -> None:
        values = self.flat()
        check([(values[leaf.name] in leaf.choices, f"--{leaf.name} must be one of "
                f"{', '.join(leaf.choices)}, got {values[leaf.name]!r}")
               for leaf in leaves(type(self)) if leaf.choices] + self.checks())

    def counts(self) -> tuple[bool, str]:
        """The check that every integer flag of the section (caps, counts) is at least 1."""
        values = self.flat()
        low = [f"--{leaf.name}={values[leaf.name]}" for leaf in leaves(type(self))
               if leaf.hint is int and values[leaf.name] < 1]
        return not low, " ".join(low) + " must be >= 1"


def _replace(obj, changes: dict):
    own = {path[0]: v for path, v in changes.items() if len(path) == 1}
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name in {path[0] for path in changes if len(path) > 1}:
        try:
            own[name] = _replace(getattr(obj, name), {p[1:]: v for p, v in changes.items()
                                                      if len(p) > 1 and p[0] == name})
        except ConfigError:
            raise
        except ValueError as e:  # a library's settings refusing a value: "<field> must ..."
            if "library" not in fields[name].metadata:
                raise
            raise ConfigError(f"--{fields[name].metadata['prefix']}{e}") from None
    return dataclasses.replace(obj, **own)


def define_flags(cls, groups: tuple[str, ...], module_name: str | None = None,
                 flag_values=flags.FLAGS) -> None:
    """absl flags for the fields of `groups` of config class `cls`: lists for tuples, enums
    for choices, no default for Optional fields left None."""
    for leaf in (leaf for leaf in leaves(cls) if leaf.group in groups):
        default = leaf.default
        if leaf.item is not None:
            define = flags.DEFINE_list
            default = None if default is None else [str(v) for v in default]
        elif leaf.choices is not None:
            define = functools.partial(flags.DEFINE_enum, enum_values=list(leaf.choices))
        else:
            kind = (typing.get_args(leaf.hint) or (leaf.hint,))[0]
            define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                      float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
        define(name=leaf.name, default=default, help=leaf.help, flag_values=flag_values,
               module_name=module_name)


def help_text(cls, groups: dict[str, str], flag_values=flags.FLAGS) -> str:
    """The flags of `groups` ({group: title}), by group in that order and within a group in
    the fields' order, as absl's --help writes each."""
    lines = []
    for group, title in groups.items():
        lines += ["", f"{title}:"]
        for leaf in (leaf for leaf in leaves(cls) if leaf.group == group):
            flag = flag_values[leaf.name]
            default = f" (default: {flag.default_as_str})" if flag.default_as_str else ""
            lines.append(flags.text_wrap(f"--{leaf.name}: {flag.help}{default}",
                                         indent="      ", firstline_indent="  "))
    return "\n".join(lines)
