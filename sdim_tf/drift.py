"""A drift alarm on the rejection flags of a deployed model: a one-sided Bernoulli CUSUM.

The exported thresholds promise a rejection rate of at most alpha on images drawn like the
calibration images (`sdim_tf.conformal`). In production that promise fails silently: the
inputs drift (a new camera, a new product line) and the model rejects more. This module
watches the stream of `rejected` flags, in arrival order, and raises an alarm when the
rejection rate rises above alpha. One CUSUM watches one reason of refusal against its own
rate (`pipeline.monitor` runs one for the unfamiliar refusals against alpha and one for the
ambiguous ones against their held-out rate).

Design:

- The statistic is Page's CUSUM of the log-likelihood ratio of Bernoulli(p1) against
  Bernoulli(p0 = alpha): S_0 = 0, S_t = max(0, S_{t-1} + l(x_t)), with
  l(1) = log(p1 / p0) for a rejection and l(0) = log((1 - p1) / (1 - p0)) < 0 for an
  acceptance; an alarm when S_t >= h. Among all detectors with the same false-alarm rate it
  minimises the worst-case mean delay to detect a change from p0 to p1 (Lorden 1971;
  Moustakides 1986), it needs O(1) memory, and it reads one flag at a time, so a server can
  feed it batch by batch. p1 = shift * alpha with shift = 2 by default: a doubled rejection
  rate is a breach worth acting on; larger shifts are caught faster anyway, smaller ones more
  slowly (README, bench/drift_check.py).
- After an alarm the statistic restarts at 0 and monitoring goes on, so a persistent shift
  raises an alarm about every mean detection delay and the gaps between false alarms are
  independent run lengths.
- The change point of an alarm is estimated as the request after the last time S was 0:
  the maximum-likelihood change point for a change from p0 to p1 (Hinkley 1971), since S
  sums the log-likelihood ratios of the requests since then.
- The threshold h is the smallest one whose in-control average run length (ARL0: the mean
  number of requests to a false alarm when every request is rejected with probability
  alpha) is at least `arl0` (10,000 by default). Rejections at any rate <= alpha only make
  false alarms rarer (S is pathwise monotone in the flags).
- ARLs come from a Markov chain (Brook & Evans 1972) on a grid of step |l(0)| / K, so an
  acceptance moves exactly K steps down and only a rejection's step l(1) / step needs
  rounding. Rounding it up gives a chart whose statistic is pathwise >= S (it alarms no
  later); rounding it down one whose statistic is <= S. Their ARLs therefore bracket the
  true ARL; h is chosen with the rounded-up chart, so ARL0 >= arl0 holds with no
  discretisation error, and `average_run_length` reports the round-to-nearest chart, a
  point estimate within the bracket (checked against simulation in tests/test_drift.py).
  K is chosen so that l(1) is about 400 steps or more (a rounding of at most 0.25%); the
  chain's sparse linear system is solved by LU (scipy.sparse.linalg.splu) in milliseconds.

The false-alarm design holds at the rate alpha. A marginal guarantee (`confidence` null in
thresholds.json) holds on average over calibration draws: the deployed model's own rate may
lie slightly above alpha, and false alarms are then more frequent than the design says.

Indices here are 0-based positions in the stream (the n-th request is index n - 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable

import numpy as np
from scipy import sparse
from scipy.sparse import linalg

DEFAULT_SHIFT = 2.0
DEFAULT_ARL0 = 10_000
GRID_STEPS_PER_REJECTION = 400  # grid steps in l(1): rounding moves it by <= 1 / 400
_WINDOW = 4096  # requests per vectorised pass; an alarm costs at most one extra window


def _check_rate(name: str, value: float, upper_inclusive: bool = False) -> float:
    value = float(value)
    inside = 0 < value <= 1 if upper_inclusive else 0 < value < 1
    if not inside:  # NaN included
        raise ValueError(f"{name} must lie in (0, 1{']' if upper_inclusive else ')'}, "
                         f"got {value}")
    return value


def _check_threshold(threshold: float) -> float:
    if not 0 < threshold < math.inf:  # NaN included
        raise ValueError(f"threshold must be > 0 and finite, got {threshold}")
    return float(threshold)


def alternative_rate(alpha: float, shift: float = DEFAULT_SHIFT) -> float:
    """p1 = shift * alpha, the rejection rate the CUSUM is tuned to detect."""
    alpha = _check_rate("alpha", alpha)
    if not shift > 1:
        raise ValueError(f"shift must be > 1 (the alarm watches for a rise), got {shift}")
    if not shift * alpha < 1:
        raise ValueError(f"shift * alpha must be < 1, got {shift} * {alpha} = {shift * alpha}")
    return shift * alpha


def log_likelihood_ratios(alpha: float, shift: float = DEFAULT_SHIFT) -> tuple[float, float]:
    """(l(1), l(0)): the CUSUM increment of a rejection (> 0) and of an acceptance (< 0)."""
    p1 = alternative_rate(alpha, shift)
    return math.log(p1 / alpha), math.log1p(-p1) - math.log1p(-alpha)


@dataclasses.dataclass(frozen=True)
class _Grid:
    step: float  # grid spacing, |l(0)| / down
    down: int  # an acceptance: exactly `down` steps down
    up: float  # a rejection: l(1) / step, not an integer

    @classmethod
    def of(cls, alpha: float, shift: float) -> _Grid:
        reject, accept = log_likelihood_ratios(alpha, shift)
        down = max(1, round(GRID_STEPS_PER_REJECTION * -accept / reject))
        return cls(step=-accept / down, down=down, up=reject / (-accept / down))

    def states(self, threshold: float) -> int:
        """m: the chart alarms on grid state u >= m, i.e. u * step >= threshold."""
        return max(1, math.ceil(threshold / self.step - 1e-9))


def _chain_run_length(rate: float, up: int, down: int, states: int) -> float:
    """ARL from state 0 of the chart u -> u + up (probability `rate`), max(0, u - down)
    (otherwise), alarm at u >= states: solves (I - Q) L = 1 over the transient states."""
    u = np.arange(states)
    climbs = u + up < states
    rows = np.concatenate([u[climbs], u])
    cols = np.concatenate([u[climbs] + up, np.maximum(u - down, 0)])
    values = np.concatenate([np.full(climbs.sum(), -rate), np.full(states, rate - 1.0)])
    system = sparse.identity(states, format="csc") + sparse.csc_matrix(
        (values, (rows, cols)), shape=(states, states))  # duplicates (row 0) are summed
    return float(linalg.splu(system).solve(np.ones(states))[0])


def run_length_bounds(alpha: float, threshold: float, shift: float = DEFAULT_SHIFT,
                      rate: float | None = None) -> tuple[float, float]:
    """(lower, upper) bounds on the exact average run length of the CUSUM from S = 0 when
    each request is rejected with probability `rate` (default alpha): the Markov chains with
    the rejection step rounded up and down (module docstring)."""
    rate = alpha if rate is None else _check_rate("rate", rate, upper_inclusive=True)
    threshold = _check_threshold(threshold)
    grid = _Grid.of(alpha, shift)
    states = grid.states(threshold)
    return (_chain_run_length(rate, math.ceil(grid.up), grid.down, states),
            _chain_run_length(rate, math.floor(grid.up), grid.down, states))


def average_run_length(alpha: float, threshold: float, shift: float = DEFAULT_SHIFT,
                       rate: float | None = None) -> float:
    """The mean number of requests from S = 0 to an alarm (the alarming one included) when
    each request is rejected with probability `rate` (default alpha, the in-control ARL0):
    the Markov chain with the rejection step rounded to the nearest grid step, inside
    `run_length_bounds`."""
    rate = alpha if rate is None else _check_rate("rate", rate, upper_inclusive=True)
    threshold = _check_threshold(threshold)
    grid = _Grid.of(alpha, shift)
    return _chain_run_length(rate, round(grid.up), grid.down, grid.states(threshold))


@functools.lru_cache(maxsize=64)
def decision_threshold(alpha: float, shift: float = DEFAULT_SHIFT,
                       arl0: float = DEFAULT_ARL0) -> float:
    """The smallest grid threshold h whose in-control ARL is at least `arl0`, proven by the
    lower bound of `run_length_bounds` (bisection: the ARL never falls as h grows)."""
    if not 1 < arl0 < math.inf:
        raise ValueError(f"arl0 must be a finite number > 1 (requests to a false alarm), "
                         f"got {arl0}")
    grid = _Grid.of(alpha, shift)
    up = math.ceil(grid.up)

    def enough(states: int) -> bool:
        return _chain_run_length(alpha, up, grid.down, states) >= arl0

    low, high = 0, up  # enough(high) is searched for; states <= low are not enough
    while not enough(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high * grid.step


def as_flags(values, name: str = "rejected") -> np.ndarray:
    """A 1-D bool array from booleans or 0/1 numbers; ValueError for anything else."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of flags, got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must hold booleans or 0/1, got dtype {array.dtype} "
                         "(parse text such as 'true'/'false' first)")
    bad = np.flatnonzero((array != 0) & (array != 1))  # NaN included
    if bad.size:
        raise ValueError(f"{name} must hold booleans or 0/1, got {array[bad[0]].item()!r} at "
                         f"position {bad[0]}")
    return array == 1


@dataclasses.dataclass(frozen=True)
class Alarm:
    """One alarm: the statistic reached the threshold at request `index`."""

    index: int  # 0-based position of the alarming request in the stream
    change_point: int  # estimated first request at the new rate: after S was last 0
    rejections: int  # rejected requests in [change_point, index]
    statistic: float  # S at the alarm (>= threshold)

    @property
    def requests_since_change(self) -> int:
        return self.index - self.change_point + 1

    @property
    def rate_since_change(self) -> float:
        """The rejection rate since the estimated change point: the new rate's estimate."""
        return self.rejections / self.requests_since_change

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "requests_since_change": self.requests_since_change,
                "rate_since_change": self.rate_since_change}


class BernoulliCusum:
    """The CUSUM of rejection flags against the guaranteed rate alpha (module docstring).

        cusum = BernoulliCusum(alpha=0.04)  # h for ARL0 >= 10,000 requests
        for batch in batches:  # arrival order, any chunk sizes
            for alarm in cusum.update(batch["rejected"]):
                page(alarm.index, alarm.change_point, alarm.rate_since_change)

    Args:
      alpha: the guaranteed rejection rate, in (0, 1).
      shift: p1 / alpha, the rise the statistic is tuned to (> 1, with shift * alpha < 1).
      arl0: the least mean number of requests to a false alarm at the rate alpha.
      threshold: h itself, instead of deriving it from `arl0`.
    """

    def __init__(self, alpha: float, shift: float = DEFAULT_SHIFT, arl0: float = DEFAULT_ARL0,
                 threshold: float | None = None):
        self.alpha = _check_rate("alpha", alpha)
        self.shift = float(shift)
        self.p1 = alternative_rate(self.alpha, self.shift)
        self.reject_llr, self.accept_llr = log_likelihood_ratios(self.alpha, self.shift)
        if threshold is None:
            self.arl0 = float(arl0)
            self.threshold = decision_threshold(self.alpha, self.shift, self.arl0)
        else:
            self.arl0, self.threshold = None, _check_threshold(threshold)
        self.reset()

    def reset(self) -> None:
        """Back to the start: S = 0, no requests seen."""
        self.statistic = 0.0
        self.requests = 0
        self.rejections = 0
        self.alarms: list[Alarm] = []
        self._last_zero = -1  # S was 0 after this request (-1: before the first one)
        self._rejections_since_zero = 0

    @property
    def rate(self) -> float:
        """The rejection rate over every request seen (NaN before the first)."""
        return self.rejections / self.requests if self.requests else math.nan

    def in_control_run_length(self) -> tuple[float, float]:
        """(lower bound, estimate) of ARL0 at this threshold, from the Markov chain."""
        return (run_length_bounds(self.alpha, self.threshold, self.shift)[0],
                average_run_length(self.alpha, self.threshold, self.shift))

    def detection_run_length(self, rate: float | None = None) -> float:
        """The mean requests to an alarm from S = 0 at the rejection rate `rate` (default
        p1), the Markov chain's estimate. From any S >= 0 the alarm comes no later, so the
        mean delay after a change to that rate is at most the exact value."""
        return average_run_length(self.alpha, self.threshold, self.shift,
                                  self.p1 if rate is None else rate)

    def update(self, rejected: Iterable) -> list[Alarm]:
        """Feeds the next flags (arrival order); returns the alarms they raised. Chunks may
        have any size, an empty one included: the state carries over."""
        flags = as_flags(rejected if hasattr(rejected, "__len__") else list(rejected))
        new: list[Alarm] = []
        start = 0
        while start < len(flags):
            window = flags[start:start + _WINDOW]
            offset = self.requests
            walk = np.cumsum(np.where(window, self.reject_llr, self.accept_llr))
            # S_t = W_t - min(-S_0, min_{k<=t} W_k): the CUSUM recursion unrolled
            statistic = walk - np.minimum(np.minimum.accumulate(walk), -self.statistic)
            statistic = np.maximum(statistic, 0.0)
            zeros = np.flatnonzero(statistic <= 0.0)
            alarms = np.flatnonzero(statistic >= self.threshold)
            end = int(alarms[0]) + 1 if alarms.size else len(window)
            zeros = zeros[zeros < end]
            if zeros.size:
                self._last_zero = offset + int(zeros[-1])
                self._rejections_since_zero = int(window[zeros[-1] + 1:end].sum())
            else:
                self._rejections_since_zero += int(window[:end].sum())
            self.requests += end
            self.rejections += int(window[:end].sum())
            self.statistic = float(statistic[end - 1])
            if alarms.size:
                alarm = Alarm(index=offset + end - 1, change_point=self._last_zero + 1,
                              rejections=self._rejections_since_zero,
                              statistic=self.statistic)
                new.append(alarm)
                self.statistic, self._last_zero, self._rejections_since_zero = 0.0, alarm.index, 0
            start += end
        self.alarms += new
        return new

    def status(self) -> dict:
        """Where the stream stands, JSON-ready."""
        first = self.alarms[0].as_dict() if self.alarms else None
        return {"requests": self.requests, "rejections": self.rejections,
                "rate": self.rate if self.requests else None, "statistic": self.statistic,
                "threshold": self.threshold, "alarms": len(self.alarms), "first_alarm": first}


@dataclasses.dataclass(frozen=True)
class Scan:
    """A whole stream through a fresh CUSUM."""

    requests: int
    rejections: int
    statistic: float  # S after the last request
    alarms: tuple[Alarm, ...]
    cusum: BernoulliCusum

    @property
    def rate(self) -> float:
        return self.rejections / self.requests

    @property
    def first_alarm(self) -> Alarm | None:
        return self.alarms[0] if self.alarms else None


def scan(rejected, alpha: float, shift: float = DEFAULT_SHIFT, arl0: float = DEFAULT_ARL0,
         threshold: float | None = None) -> Scan:
    """Runs a whole stream of rejection flags (arrival order) through a fresh CUSUM: the
    first alarm (or None), every alarm, the rejection rate and the final statistic."""
    flags = as_flags(rejected)
    if not flags.size:
        raise ValueError("rejected is empty: no request to watch")
    cusum = BernoulliCusum(alpha, shift, arl0, threshold)
    cusum.update(flags)
    return Scan(requests=cusum.requests, rejections=cusum.rejections,
                statistic=cusum.statistic, alarms=tuple(cusum.alarms), cusum=cusum)
