"""How fast does the drift alarm fire, and how often falsely? (sdim_tf.drift; a measurement
by simulation, not a test)

For alpha (0.04) and the default design (shift 2, ARL0 >= --arl0 requests):
1. false alarms: --streams seeded streams at the rate alpha, each run to its first alarm:
   the mean run length (ARL0), its median, and alarms per 10,000 requests (10,000 / ARL0),
   beside the Markov chain's bracket;
2. detection: per rate 1.5, 2, 3, 5 x alpha, --streams seeded streams at alpha for --change
   requests, then at the new rate. The delay is the number of requests from the change to
   the alarm, the alarming one included, over the streams with no alarm before the change
   (the conditional delay; their share is reported). Beside it: the Markov chain's delay
   from S = 0 (the worst start, an upper bound) and Wald's bound (h + l(1)) / mu.

python -m bench.drift_check --out=bench/results/drift_check.json
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from bench.machine import machine
from pipeline import artifacts
from sdim_tf import drift

FLAGS = flags.FLAGS
flags.DEFINE_float("reject_budget", 0.04, "The guaranteed rejection rate alpha (as "
                   "pipeline.run's and pipeline.monitor's).")
flags.DEFINE_float("shift", drift.DEFAULT_SHIFT, "The CUSUM's p1 / alpha.")
flags.DEFINE_float("arl0", drift.DEFAULT_ARL0, "Least in-control mean run length.")
flags.DEFINE_integer("streams", 2000, "Seeded streams per measurement.")
flags.DEFINE_integer("change", 2000, "Requests at the rate alpha before the change.")
flags.DEFINE_list("multiples", ["1.5", "2", "3", "5"], "Rates after the change, x alpha.")
flags.DEFINE_integer("seed", 0, "Seed of the first stream; stream i of a measurement uses "
                     "(seed, measurement, i).")
flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"
                               / "drift_check.json"), "Where the JSON goes.")

_CHUNK = 4096


def first_alarm(cusum: drift.BernoulliCusum, rng: np.random.Generator, change: int,
                before: float, after: float) -> int:
    """The 0-based index of the first alarm of a fresh stream at `before` until `change`
    and `after` from then on."""
    cusum.reset()
    while True:
        start = cusum.requests
        rates = np.where(np.arange(start, start + _CHUNK) < change, before, after)
        alarms = cusum.update(rng.random(_CHUNK) < rates)
        if alarms:
            return alarms[0].index


def describe(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()),
            "standard_error": float(values.std(ddof=1) / math.sqrt(len(values))),
            "median": float(np.median(values)), "p90": float(np.quantile(values, 0.9)),
            "count": int(len(values))}


def main(argv):
    del argv
    alpha = FLAGS.reject_budget
    started = time.time()
    cusum = drift.BernoulliCusum(alpha, FLAGS.shift, FLAGS.arl0)
    h = cusum.threshold
    up, down = cusum.reject_llr, cusum.accept_llr
    lower, upper = drift.run_length_bounds(alpha, h, FLAGS.shift)
    record = {"command": " ".join(["python -m bench.drift_check", *sys.argv[1:]]),
              "machine": machine(), "alpha": alpha, "shift": FLAGS.shift, "p1": cusum.p1,
              "arl0_requested": FLAGS.arl0, "threshold": h,
              "log_likelihood_ratios": {"rejection": up, "acceptance": down},
              "streams": FLAGS.streams, "change": FLAGS.change, "seed": FLAGS.seed}

    run_lengths = np.array([
        first_alarm(cusum, np.random.default_rng([FLAGS.seed, 0, i]), 0, alpha, alpha) + 1
        for i in range(FLAGS.streams)])
    stats = describe(run_lengths)
    record["in_control"] = {
        "run_length": stats,
        "alarms_per_10000_requests": 10_000 / float(run_lengths.mean()),
        "markov_chain": {"lower_bound": lower, "upper_bound": upper,
                         "estimate": drift.average_run_length(alpha, h, FLAGS.shift)}}
    print(f"alpha={alpha:g}, p1={cusum.p1:g}, h={h:.4f}: in control, {FLAGS.streams} streams: "
          f"mean run length {stats['mean']:,.0f} +- {stats['standard_error']:,.0f} (median "
          f"{stats['median']:,.0f}; Markov chain {lower:,.0f} .. {upper:,.0f}); "
          f"{10_000 / stats['mean']:.3f} false alarms per 10,000 requests")

    record["detection"] = []
    print(f"\nchange after {FLAGS.change} requests; delay = requests from the change to the "
          "alarm, streams with no false alarm before it")
    print(f"{'rate':>17} {'streams':>7} {'mean':>8} {'+-':>5} {'median':>7} {'p90':>7} "
          f"{'S=0 chain':>10} {'Wald':>8}")
    for k, multiple in enumerate(float(m) for m in FLAGS.multiples):
        rate = multiple * alpha
        alarms = np.array([
            first_alarm(cusum, np.random.default_rng([FLAGS.seed, k + 1, i]), FLAGS.change,
                        alpha, rate) for i in range(FLAGS.streams)])
        delays = alarms[alarms >= FLAGS.change] - FLAGS.change + 1
        mu = rate * up + (1 - rate) * down
        row = {"multiple": multiple, "rate": rate, "delay": describe(delays),
               "false_alarm_before_change": float(np.mean(alarms < FLAGS.change)),
               "zero_state_run_length": drift.average_run_length(alpha, h, FLAGS.shift, rate),
               "wald_bound": (h + up) / mu if mu > 0 else None}
        record["detection"].append(row)
        d = row["delay"]
        wald = f"{row['wald_bound']:8.0f}" if row["wald_bound"] else f"{'-':>8}"
        print(f"{multiple:>5g} alpha {rate:5.3f} {d['count']:>7} {d['mean']:8.0f} "
              f"{d['standard_error']:5.0f} {d['median']:7.0f} {d['p90']:7.0f} "
              f"{row['zero_state_run_length']:10.0f} {wald}")
    record["seconds"] = time.time() - started
    artifacts.write_json(FLAGS.out, record)
    print(f"\nwrote {FLAGS.out} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    app.run(main)
