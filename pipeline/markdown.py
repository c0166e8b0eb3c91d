"""Formatting shared by the stages' markdown reports."""

from __future__ import annotations


def percent(x) -> str:
    """A share as "12.34%"; "—" where it is missing (None) or undefined (NaN)."""
    return "—" if x is None or x != x else f"{100 * x:.2f}%"
