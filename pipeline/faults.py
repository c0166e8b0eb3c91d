"""Deterministic crashes for tests: SDIM_FAULT=<point>:<k> kills the process with SIGKILL
the k-th time it reaches `faults.point(<point>)`, so a kill lands at a chosen place
whatever the machine's speed."""

from __future__ import annotations

import collections
import os
import signal

ENV = "SDIM_FAULT"
_reached: collections.Counter = collections.Counter()


def point(name: str) -> None:
    """A place where a test may kill the process (no effect unless SDIM_FAULT names it)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, k = spec.rpartition(":")
    if target != name:
        return
    _reached[name] += 1
    if _reached[name] == int(k):
        os.kill(os.getpid(), signal.SIGKILL)
