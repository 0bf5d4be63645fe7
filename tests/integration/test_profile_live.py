"""`throttllem profile --target live` against `throttllem twin serve` as a real process on loopback.

The twin's GPU endpoint stands in for NVML and its trtllm-serve-style `/metrics` (or Triton's
metrics port) for the engine's iteration stats. The independent answer: the twin run in virtual
time on the same points, which these measurements must reproduce.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.catalog import gpu_spec, model_spec
from agent.cli import main
from agent.modeling.dataset import Row, read_dataset, read_meta
from agent.modeling.live_profile import LiveConfig, LiveProfileTarget
from agent.modeling.profile import ProfileLimits, SweepPoint, TwinProfileTarget, sweep_point
from agent.twin.setup import TwinSetup
from tests.integration.test_twin_serve import Served, serve

GPU, MODEL, MAX_SEQ_LEN = "a100-sxm4-40gb", "llama2-13b", 4096  # 249 KV blocks: points fill fast
# 20x: a 30 ms iteration takes 1.5 ms; Triton's stats poll every 20 ms of twin time (1 ms).
TWIN_FLAGS = ("--gpu", GPU, "--model", MODEL, "--time-scale", "20", "--stats-period-ms", "20")
VIRTUAL = TwinProfileTarget(TwinSetup(gpu_spec(GPU), model_spec(MODEL)))  # noise 0, as served
STOP_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def twin():
    with serve(*TWIN_FLAGS, "--iteration-stats-endpoint") as served:
        yield served


def live_args(served: Served, out: Path, *flags: str) -> list[str]:
    return [
        "profile",
        "--target",
        "live",
        *("--engine-url", served.http, "--api", "triton"),
        *("--actuator", "twin", "--twin-url", served.http),
        *("--max-seq-len", str(MAX_SEQ_LEN), "--settle-ms", "5", "--poll-ms", "2"),
        *("--out", str(out), "--json"),
        *flags,
    ]


def gpu_state(served: Served) -> dict[str, Any]:
    with urllib.request.urlopen(served.http + "/twin/v1/gpu", timeout=10) as response:
        return json.loads(response.read())


def virtual_point(meta: dict[str, Any], index: int) -> tuple[SweepPoint, list[Row]]:
    """Point `index` of the file's sweep, and the rows the twin gives for it in virtual time."""
    engine = meta["engine"]
    limits = ProfileLimits(
        meta["tp"],
        engine["max_batch_size"],
        engine["max_num_tokens"],
        engine["tokens_per_block"],
        engine["kv_blocks"],
        engine["max_seq_len"],
    )
    point = sweep_point(limits, meta["clocks_mhz"], meta["seed"], index, meta["min_clock_mhz"])
    return point, VIRTUAL.run_point(point.clock_mhz, point.prompts, point.outputs, index)


def test_a_live_profile_of_the_twin_measures_what_the_twin_runs_and_trains(twin, tmp_path, capsys):
    out = tmp_path / "live.csv"
    changes = gpu_state(twin)["clock_changes"]
    assert main(live_args(twin, out, "--points", "8")) == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["points"], figures["points_without_rows"]) == (8, 0) and figures["rows"] > 100
    state = gpu_state(twin)
    assert state["locked_clock_mhz"] is None  # reset at the end
    assert state["clock_changes"] >= changes + 2 * 8  # every point locked and reset

    data = read_dataset(out)
    meta = data.meta[0]
    assert (meta["target"], meta["timing"], meta["engine"]["kind"]) == (
        "live",
        "iteration_latency",
        "trtllm-serve",
    )
    assert meta["engine"]["kv_blocks"] == VIRTUAL.limits().kv_blocks  # read from the engine's stats
    assert len(set(data["clock_mhz"])) >= 4 and data["clock_mhz"].min() >= 600
    matched = 0
    for index in range(8):
        point, rows = virtual_point(meta, index)
        live = np.flatnonzero(data["point"] == index)
        assert set(data["clock_mhz"][live]) == {point.clock_mhz}
        # Requests reach the engine over a few ms, many iterations at 20x: the first may finish early.
        assert 0.8 * len(point.prompts) <= data["batch"][live].max() <= len(point.prompts)
        assert data["prefill_tokens"][live].sum() == sum(point.prompts)  # every prefill iteration kept
        # An iteration of a shape the virtual run also has takes the time the twin's model gives it
        # (the arrival spread changes which shapes occur, not what one costs).
        virtual = {}
        for r in rows:
            virtual.setdefault((r.batch, r.kv_blocks, r.prefill_tokens), []).append(r.iteration_ms)
        for i in live:
            shape = (data["batch"][i], data["kv_blocks"][i], data["prefill_tokens"][i])
            if shape in virtual:
                matched += 1
                assert data["iteration_ms"][i] == pytest.approx(np.median(virtual[shape]), rel=0.02)
    assert matched > 0.5 * len(data)

    # Holding batch, KV and prefill fixed, IPS grows with the clock (a log-linear fit over all rows).
    features = np.column_stack(
        [
            np.ones(len(data)),
            np.log(data["clock_mhz"]),
            np.log(data["batch"]),
            data["kv_blocks"],
            data["prefill_tokens"],
        ]
    )
    coefficients = np.linalg.lstsq(features, np.log(data["ips"]), rcond=None)[0]
    assert coefficients[1] > 0.05

    assert main(["train", "--data", str(out), "--out", str(tmp_path / "model"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == len(data)


def test_the_same_point_runs_faster_at_a_higher_clock(twin):
    config = LiveConfig(
        engine="trtllm-serve",
        engine_url=twin.http,
        metrics_url=twin.http,
        api="triton",
        model_name="ensemble",
        actuator="twin",
        twin_url=twin.http,
        max_seq_len=MAX_SEQ_LEN,
        settle_s=0.005,
        poll_s=0.002,
    )
    prompts, outputs = [3000, 2500, 1800, 700, 64], [40, 30, 20, 60, 50]
    with LiveProfileTarget.open(config) as target:
        slow = target.run_point(600, prompts, outputs, point=0)
        fast = target.run_point(1410, prompts, outputs, point=1)
    assert gpu_state(twin)["locked_clock_mhz"] is None

    def by_shape(rows: list[Row]) -> dict[tuple[int, int, int], float]:
        shapes: dict[tuple[int, int, int], list[float]] = {}
        for r in rows:
            shapes.setdefault((r.batch, r.kv_blocks, r.prefill_tokens), []).append(r.ips)
        return {shape: float(np.median(ips)) for shape, ips in shapes.items()}

    slow_ips, fast_ips = by_shape(slow), by_shape(fast)
    common = slow_ips.keys() & fast_ips.keys()
    assert len(common) >= 10
    assert all(fast_ips[s] > slow_ips[s] for s in common)
    assert sum(r.iteration_ms for r in fast) < 0.8 * sum(r.iteration_ms for r in slow)


def test_triton_metrics_give_decode_windows_that_match_the_twin(twin):
    config = LiveConfig(
        engine="triton",
        engine_url=twin.http,
        metrics_url=twin.metrics,
        api="triton",
        model_name="ensemble",
        actuator="twin",
        twin_url=twin.http,
        max_seq_len=MAX_SEQ_LEN,
        settle_s=0.005,
        poll_s=0.002,
    )
    prompts, outputs = [500, 400, 300, 200], [150, 150, 150, 100]  # 100 iterations of 4, 50 of 3
    with LiveProfileTarget.open(config) as target:
        rows = target.run_point(900, prompts, outputs, point=0)
        assert target.setup_description()["timing"] == "decode_window_mean"
    assert gpu_state(twin)["locked_clock_mhz"] is None
    assert len(rows) >= 5 and {r.prefill_tokens for r in rows} == {0}
    virtual = VIRTUAL.run_point(900, prompts, outputs, point=0)
    for row in rows:
        same_batch = [r.iteration_ms for r in virtual if r.batch == row.batch and r.prefill_tokens == 0]
        assert 0.99 * min(same_batch) <= row.iteration_ms <= 1.01 * max(same_batch)


def _as_from_a_terminal() -> None:
    """Default SIGINT in the child: a shell starts background jobs (CI) with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_in_the_middle_of_a_point_resets_the_clock(twin, tmp_path, stop):
    out = tmp_path / "interrupted.csv"
    command = [sys.executable, "-m", "agent.cli", *live_args(twin, out, "--points", "1000")]
    # PYTHONFAULTHANDLER: if it hangs after Ctrl-C, SIGABRT makes it print where (see below).
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        deadline = time.monotonic() + 60
        # Past the probe lock and the first point: the next lock held is a point's.
        while not (out.exists() and out.read_text().count("\n") > 1 and gpu_state(twin)["locked_clock_mhz"]):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.001)
        proc.send_signal(stop)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            pytest.fail(
                f"no exit {STOP_TIMEOUT_S:g} s after Ctrl-C; its stacks:\n{proc.communicate()[1][-6000:]}"
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 130, proc.communicate()
    assert gpu_state(twin)["locked_clock_mhz"] is None
    assert read_meta(out)["target"] == "live"
