"""What a rule is, and the registry that finds one by name.

A rule turns held-out class scores [N, C] (and labels) into thresholds and a JSON-able
record that states its promise in words. Two kinds of refusal use them:

- `rejection.UNFAMILIAR`: thresholds [C] on the predicted class's score (equation 9);
- `rejection.AMBIGUOUS`: one threshold on the confidence (`rejection.confidence`).

`rejection.decide` applies both. A new rule is one module of `sdim_tf/rules/` (the package
imports every module) with a class decorated by `@register`; the pipeline's
`--unfamiliar_rule` or `--ambiguity_rule` then offers it by name.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import numpy as np

from sdim_tf.registry import Registry

# Whether an unfamiliar rule's threshold is per predicted class or one for all classes.
GROUPINGS = ("per_class", "shared")


class CalibrationError(ValueError):
    """The held-out images cannot support the rule's promise (too few, or too many
    errors); the message says what is short and what would do."""


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """A rule's outcome: `thresholds` ([C] for an unfamiliar rule, a scalar for an
    ambiguous one; +inf refuses all) and `record` (JSON-able: the rule, its settings, the
    counts it rests on and its `promise`)."""

    thresholds: np.ndarray
    record: dict

    @property
    def promise(self) -> str:
        return self.record["promise"]


class Rule(Protocol):
    name: ClassVar[str]  # registry key, recorded as the record's "rule"
    refusal: ClassVar[str]  # rejection.UNFAMILIAR or rejection.AMBIGUOUS

    def calibrate(self, class_scores, labels, class_names=None) -> Calibrated: ...


RULES = Registry("rule")
register, get = RULES.register, RULES.get


def names(refusal: str) -> tuple[str, ...]:
    """The registered rules of one kind of refusal, by name."""
    return tuple(n for n in RULES.names() if RULES.classes[n].refusal == refusal)


def build(name: str, values: dict) -> Rule:
    """Rule `name` with those of its settings that `values` ({setting: value}) holds; the
    others keep their defaults."""
    cls = get(name)
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def check_grouping(grouping: str) -> None:
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")


def percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"
