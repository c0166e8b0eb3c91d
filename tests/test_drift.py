"""The drift alarm (sdim_tf.drift, pipeline.monitor): the CUSUM by hand, its Markov-chain run
lengths against seeded simulation, detection delays against Wald's bound, the CLI."""

import json
import math
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from pipeline import monitor
from sdim_tf import drift

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALPHA = 0.04


def _stream(rng, rates_and_lengths) -> np.ndarray:
    return np.concatenate([rng.random(n) < rate for rate, n in rates_and_lengths])


def _run_lengths(cusum: drift.BernoulliCusum, rate: float, count: int, seed: int) -> np.ndarray:
    """`count` independent run lengths at `rate`: the gaps between alarms of one long stream
    (the statistic restarts at 0 after each alarm)."""
    rng = np.random.default_rng(seed)
    cusum.reset()
    while len(cusum.alarms) < count:
        cusum.update(rng.random(1 << 16) < rate)
    ends = np.array([a.index for a in cusum.alarms[:count]])
    return np.diff(ends, prepend=-1)


def test_statistic_and_alarms_by_hand():
    alpha, shift, h = 0.1, 2.0, 1.5
    up, down = math.log(0.2 / 0.1), math.log(0.8 / 0.9)  # the LLR of a rejection, an acceptance
    assert drift.log_likelihood_ratios(alpha, shift) == pytest.approx((up, down))
    flags = [0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    # S_t = max(0, S_{t-1} + l(x_t)), alarm (and restart at 0) when S_t >= h
    expected = [0, up, up + down, 2 * up + down, 2 * up + 2 * down, 2 * up + 3 * down,
                0,  # 3 up + 3 down = 1.73 >= 1.5: alarm at index 6, restart
                0, up, *(up + k * down for k in range(1, 6)),
                0,  # up + 6 down < 0
                up, 2 * up,
                0]  # 3 up = 2.08: alarm at index 17
    cusum = drift.BernoulliCusum(alpha, shift, threshold=h)
    seen, alarms = [], []
    for flag in flags:
        alarms += cusum.update([flag])
        seen.append(cusum.statistic)
    assert seen == pytest.approx(expected, abs=1e-12)
    assert [(a.index, a.change_point, a.rejections) for a in alarms] == [(6, 1, 3), (17, 15, 3)]
    assert alarms[0].statistic == pytest.approx(3 * up + 3 * down)
    assert alarms[1].statistic == pytest.approx(3 * up)
    assert alarms[0].requests_since_change == 6 and alarms[0].rate_since_change == 0.5
    result = drift.scan(np.array(flags, bool), alpha, shift, threshold=h)
    assert [(a.index, a.change_point, a.rejections) for a in result.alarms] == [
        (6, 1, 3), (17, 15, 3)]
    assert result.requests == 18 and result.rejections == 7 and result.statistic == 0.0


def test_markov_chain_run_lengths_match_simulation():
    h = drift.decision_threshold(ALPHA, 2.0, 500)
    lower, upper = drift.run_length_bounds(ALPHA, h)
    estimate = drift.average_run_length(ALPHA, h)
    assert 500 <= lower <= estimate <= upper <= 1.1 * lower  # a tight, exact bracket
    assert drift.run_length_bounds(ALPHA, 0.99 * h)[0] < 500  # h is the smallest that holds
    cusum = drift.BernoulliCusum(ALPHA, arl0=500)
    assert cusum.threshold == h
    for rate, arl in ((ALPHA, estimate),
                      (2 * ALPHA, drift.average_run_length(ALPHA, h, rate=2 * ALPHA))):
        lengths = _run_lengths(cusum, rate, 2000, seed=round(rate * 100))
        standard_error = lengths.std(ddof=1) / math.sqrt(len(lengths))
        assert abs(lengths.mean() - arl) <= 3 * standard_error, (rate, lengths.mean(), arl)
    # the default design: ARL0 >= 10,000 requests, and ARL1 from the same chain
    default = drift.BernoulliCusum(ALPHA)
    lower, estimate = default.in_control_run_length()
    assert 10_000 <= lower <= estimate < 11_000
    assert default.detection_run_length() < default.detection_run_length(1.5 * ALPHA)


@pytest.mark.parametrize("shift", [2.0, 3.0])
def test_detection_delay_after_a_known_change(shift):
    """Rate alpha for 2000 requests, then shift * alpha. Wald's identity bounds the delay:
    from any S < h the walk W of the increments satisfies W_N <= S_N < h + l(1), and
    E[W_N] = mu E[N] with mu = p l(1) + (1 - p) l(0) > 0, so E[delay] <= (h + l(1)) / mu."""
    change, streams = 2000, 150
    cusum = drift.BernoulliCusum(ALPHA)
    up, down = drift.log_likelihood_ratios(ALPHA)
    rate = shift * ALPHA
    mu = rate * up + (1 - rate) * down
    wald = (cusum.threshold + up) / mu
    zero_state = drift.run_length_bounds(ALPHA, cusum.threshold, rate=rate)[1]
    rng = np.random.default_rng(int(shift))
    delays, change_points = [], []
    for _ in range(streams):
        cusum.reset()
        cusum.update(_stream(rng, [(ALPHA, change), (rate, 3000)]))  # no alarm: ~exp(-3000 / 244)
        after = next(a for a in cusum.alarms if a.index >= change)  # false alarms restart S
        delays.append(after.index - change + 1)
        change_points.append(after.change_point)
    delays = np.array(delays)
    # the chain rounded down bounds the exact zero-state ARL from above
    bound = min(wald, zero_state) + 3 * delays.std(ddof=1) / math.sqrt(streams)
    assert delays.mean() <= bound, (delays.mean(), wald, zero_state)
    # the change point estimate lands near the truth, far closer than a delay
    assert abs(np.median(change_points) - change) < 0.5 * delays.mean()
    # S = 0, the worst start, is not far from the typical start: the delay is of its order
    assert delays.mean() > 0.6 * zero_state


def test_false_alarms_on_in_control_streams_match_arl0():
    """60 streams of 20,000 requests at the guaranteed rate: alarms ~ renewal count t / ARL0
    (run lengths nearly geometric, so the count is nearly Poisson)."""
    cusum = drift.BernoulliCusum(ALPHA)
    length, streams = 20_000, 60
    rng = np.random.default_rng(7)
    count = 0
    for _ in range(streams):
        cusum.reset()
        count += len(cusum.update(rng.random(length) < ALPHA))
    expected = streams * length / drift.average_run_length(ALPHA, cusum.threshold)
    assert abs(count - expected) <= 3 * math.sqrt(expected), (count, expected)
    assert count / (streams * length) <= 1 / 10_000 + 3 * math.sqrt(expected) / (streams * length)


def test_chunked_updates_equal_one_shot():
    rng = np.random.default_rng(3)
    flags = _stream(rng, [(ALPHA, 9000), (3 * ALPHA, 4000), (ALPHA, 9000), (5 * ALPHA, 3000)])
    whole = drift.scan(flags, ALPHA)
    assert len(whole.alarms) > 3
    cusum = drift.BernoulliCusum(ALPHA)
    cuts = np.sort(rng.choice(len(flags), 40, replace=False))
    pieces = np.split(flags, cuts)
    pieces.insert(5, flags[:0])  # an empty batch is harmless
    for piece in pieces:
        cusum.update(piece.astype(int) if len(piece) % 2 else piece)  # 0/1 ints or bools
    assert [(a.index, a.change_point, a.rejections) for a in cusum.alarms] == [
        (a.index, a.change_point, a.rejections) for a in whole.alarms]
    assert cusum.statistic == pytest.approx(whole.statistic, abs=1e-9)
    assert cusum.requests == whole.requests and cusum.rejections == whole.rejections
    # and both equal the recursion written out one request at a time
    up, down = drift.log_likelihood_ratios(ALPHA)
    s, alarms = 0.0, []
    for i, flag in enumerate(flags):
        s = max(0.0, s + (up if flag else down))
        if s >= whole.cusum.threshold:
            alarms.append(i)
            s = 0.0
    assert alarms == [a.index for a in whole.alarms]
    assert s == pytest.approx(whole.statistic, abs=1e-9)


@pytest.mark.parametrize("call, message", [
    (lambda: drift.BernoulliCusum(0.0), "alpha must lie in"),
    (lambda: drift.BernoulliCusum(1.0), "alpha must lie in"),
    (lambda: drift.BernoulliCusum(float("nan")), "alpha must lie in"),
    (lambda: drift.BernoulliCusum(0.04, shift=1.0), "shift must be > 1"),
    (lambda: drift.BernoulliCusum(0.6, shift=2.0), "shift \\* alpha must be < 1"),
    (lambda: drift.BernoulliCusum(0.04, arl0=1), "arl0 must be"),
    (lambda: drift.BernoulliCusum(0.04, arl0=math.inf), "arl0 must be"),
    (lambda: drift.BernoulliCusum(0.04, threshold=0.0), "threshold must be > 0"),
    (lambda: drift.run_length_bounds(0.04, math.inf), "threshold must be > 0 and finite"),
    (lambda: drift.average_run_length(0.04, 1.0, rate=0.0), "rate must lie in"),
    (lambda: drift.scan([], 0.04), "empty"),
    (lambda: drift.scan([0, 1, 2], 0.04), "booleans or 0/1, got 2 at position 2"),
    (lambda: drift.scan([0.0, math.nan], 0.04), "booleans or 0/1, got nan at position 1"),
    (lambda: drift.scan(["true", "false"], 0.04), "parse text"),
    (lambda: drift.scan([[0, 1]], 0.04), "1-D"),
])
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# The CLI. A fake model: only assets/thresholds.json, version 1 with a guarantee, version 2
# (the newest) without one.
GUARANTEE = ("rejects at most 4% of images drawn like the 5000 calibration images, with 95% "
             "confidence (split conformal); it promises nothing for a shifted population")


@pytest.fixture()
def model(tmp_path) -> pathlib.Path:
    folder = tmp_path / "m"
    for version, deployed in (
            (1, {"percentile": "guaranteed", "alpha": ALPHA, "confidence": 0.95, "n": 5000,
                 "guarantee": GUARANTEE}),
            (2, {"percentile": "99", "rule": "the 99th percentile of the training scores"})):
        (folder / str(version) / "assets").mkdir(parents=True)
        (folder / str(version) / "assets" / "thresholds.json").write_text(
            json.dumps({"deployed": deployed}))
    return folder


def _write_csv(path: pathlib.Path, flags, spelling=("false", "true"), column="rejected"):
    rows = ["path,class_name,score,threshold,margin," + column + ",reason"]
    rows += [f"img{i:05d}.png,shirt,1.5,1.0,0.5,{spelling[int(f)]},"
             f"{'unfamiliar' if f else ''}" for i, f in enumerate(flags)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "pipeline.monitor", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(tmp_path, model):
    flags = _stream(np.random.default_rng(11), [(ALPHA, 3000), (3 * ALPHA, 3000)])
    csv = _write_csv(tmp_path / "predictions.csv", flags)
    done = _cli("--model_dir", model, "--version=1", "--out", tmp_path / "monitor.json", csv,
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "monitor.json").read_text())
    expected = drift.scan(flags, ALPHA)
    assert report["alpha"] == ALPHA and report["alpha_source"] == "model"
    assert report["model"] == str(model / "1") and report["guarantee"] == GUARANTEE
    assert report["requests"] == 6000 and report["rejections"] == int(flags.sum())
    assert report["alarm"] is True and report["alarms"] == len(expected.alarms)
    first = expected.first_alarm
    assert report["first_alarm"]["request"] == first.index + 1  # counted from 1
    assert report["first_alarm"]["change_request"] == first.change_point + 1
    assert report["design"]["threshold"] == pytest.approx(expected.cusum.threshold)
    assert report["design"]["arl0_lower_bound"] >= 10_000
    out = done.stdout
    assert f"first at request {first.index + 1:,}" in out and "alarm: YES" in out
    assert "mean run length to a false alarm >= 10,000 requests at the guaranteed rate" in out
    assert report["first_alarm"]["request"] > 3000  # this seed raises no false alarm


def test_cli_errors_are_one_line_and_exit_code_1(tmp_path, model, monkeypatch, capsys):
    """main() as `python -m pipeline.monitor` runs it after absl parsed the flags (the
    flags are defined only then: a namespace stands in for them here)."""
    csv = _write_csv(tmp_path / "p.csv", np.zeros(100, bool))
    no_column = _write_csv(tmp_path / "no_column.csv", np.zeros(100, bool), column="refused")
    for model_flag, path, message in (
            (model, csv, "no guarantee (exported with --reject_budget=0)"),  # newest: v2
            (model / "1", no_column, "no `rejected` column (columns: path, class_name")):
        monkeypatch.setattr(monitor, "FLAGS", types.SimpleNamespace(
            model_dir=str(model_flag), version=None, reject_budget=None, shift=2.0,
            arl0=1e4, out=None, verbose=False))
        with pytest.raises(SystemExit) as exited:
            monitor.main(["monitor", str(path)])
        text = str(exited.value.code)  # a string: Python prints it to stderr, exit code 1
        assert text.startswith("error: ") and message in text and "\n" not in text
    monkeypatch.setattr(monitor, "FLAGS", types.SimpleNamespace(
        model_dir=str(model), version=None, reject_budget=0.04, shift=2.0, arl0=1e4,
        out=str(tmp_path / "o.json"), verbose=False))
    monitor.main(["monitor", str(csv)])  # no alarm: returns, exit code 0
    assert "alarm: no" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text())["alarm"] is False


def test_cli_inputs_and_errors(tmp_path, model):
    calm = np.zeros(500, bool)
    calm[::50] = True  # 2%: no alarm
    for spelling in (("False", "True"), ("0", "1"), ("false", "true")):
        csv = _write_csv(tmp_path / f"p{spelling[0]}.csv", calm, spelling)
        np.testing.assert_array_equal(monitor.read_rejected([str(csv)]), calm)
    csv = _write_csv(tmp_path / "calm.csv", calm)
    report = monitor.run(str(model), 1, None, 2.0, 10_000, [str(csv)])
    assert report["alarm"] is False and report["first_alarm"] is None
    assert "alarm: no" in monitor.summary(report)
    # --reject_budget overrides the model, or replaces it
    report = monitor.run(str(model), None, 0.01, 2.0, 10_000, [str(csv), str(csv)])
    assert report["alpha"] == 0.01 and report["alpha_source"] == "--reject_budget"
    assert report["requests"] == 1000 and report["model"] == str(model / "2")
    assert monitor.run(None, None, 0.04, 3.0, 500, [str(csv)])["design"]["shift"] == 3.0
    # a version folder directly
    assert monitor.run(str(model / "1"), None, None, 2.0, 10_000, [str(csv)])["alpha"] == ALPHA

    no_column = _write_csv(tmp_path / "no_column.csv", calm, column="refused")
    bad_value = tmp_path / "bad_value.csv"
    bad_value.write_text("rejected\ntrue\nmaybe\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("path,rejected\n")
    for args, message in [
        ((str(model), 1, None, 2.0, 1e4, [str(no_column)]), "no `rejected` column"),
        ((str(model), 1, None, 2.0, 1e4, [str(bad_value)]), "line 3: rejected='maybe'"),
        ((str(model), 1, None, 2.0, 1e4, [str(empty)]), "no rows"),
        ((str(model), 1, None, 2.0, 1e4, [str(tmp_path / "none.csv")]), "cannot read"),
        ((str(model), None, None, 2.0, 1e4, [str(csv)]), "no guarantee.*--reject_budget"),
        ((None, None, None, 2.0, 1e4, [str(csv)]), "--model_dir is required"),
        ((str(model), 3, None, 2.0, 1e4, [str(csv)]), "no version 3; found 1, 2"),
        ((str(tmp_path / "nowhere"), None, None, 2.0, 1e4, [str(csv)]), "no such folder"),
        ((str(model), 1, None, 1.0, 1e4, [str(csv)]), "shift must be > 1"),
        ((str(model), 1, None, 2.0, 1e4, []), "give the CSV"),
    ]:
        with pytest.raises(ValueError, match=message):
            monitor.run(*args)


def test_each_reason_is_watched_against_its_own_rate(tmp_path):
    """A model with an ambiguity threshold: the ambiguous refusals are left out of the
    unfamiliar stream (its alpha stays the promise) and watched against the held-out share
    refused as ambiguous; here only they drift."""
    version = tmp_path / "m" / "1" / "assets"
    version.mkdir(parents=True)
    version.joinpath("thresholds.json").write_text(json.dumps({"deployed": {
        "percentile": "conformal", "alpha": ALPHA, "confidence": 0.95, "n": 2500,
        "guarantee": GUARANTEE, "min_gap": 3.0, "held_out": {"ambiguous": 0.1}}}))
    rng = np.random.default_rng(5)
    unfamiliar = _stream(rng, [(ALPHA, 8000)])
    ambiguous = ~unfamiliar & _stream(rng, [(0.1, 4000), (0.3, 4000)])
    rows = ["path,rejected,reason"] + [
        f"{i},{str(u or a).lower()},{'unfamiliar' if u else 'ambiguous' if a else ''}"
        for i, (u, a) in enumerate(zip(unfamiliar, ambiguous, strict=True))]
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    report = monitor.run(str(tmp_path / "m"), None, None, 2.0, 10_000, [str(tmp_path / "p.csv")])
    alone = drift.scan(unfamiliar, ALPHA)
    assert report["reason"] == "unfamiliar" and report["rejections"] == int(unfamiliar.sum())
    assert report["alarms"] == len(alone.alarms)
    watched = drift.scan(ambiguous, 0.1)
    assert report["ambiguous"]["alpha"] == 0.1
    assert report["ambiguous"]["rejections"] == int(ambiguous.sum())
    assert report["ambiguous"]["first_alarm"]["request"] == watched.first_alarm.index + 1
    assert report["ambiguous"]["first_alarm"]["request"] > 4000 and report["alarm"] is True
    assert "ambiguous: " in monitor.summary(report) and "alarm: YES, first at request" in \
        monitor.summary(report).split("ambiguous: ")[1]
    # without a reason column the stream is every rejection, against alpha
    (tmp_path / "old.csv").write_text("rejected\n" + "\n".join(
        str(u or a).lower() for u, a in zip(unfamiliar, ambiguous, strict=True)) + "\n")
    old = monitor.run(str(tmp_path / "m"), None, None, 2.0, 10_000, [str(tmp_path / "old.csv")])
    assert old["ambiguous"] is None
    assert old["rejections"] == int((unfamiliar | ambiguous).sum())
