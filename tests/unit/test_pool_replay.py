"""`capacity` and `replay --sizes`: capacity profiles beside the IPS models, and the sizing ablation."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from agent.bench.capacities import (
    CapacityKey,
    CapacityProfile,
    CapacityProfileError,
    load_capacity,
    save_capacity,
    steady_mix,
)
from agent.bench.pool_replay import PoolRun, busiest_minute_rps, plan_pool_runs, provisioned_size
from agent.catalog import gpu_spec, model_spec
from agent.cli import main
from agent.twin.setup import TwinSetup
from agent.workloads import Workload

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
KEY = CapacityKey("azure-conv", "mlperf-server", 8192, False, 2048)
GEOMETRY = ("--gpu", "a100-sxm4-80gb", "--model", "llama3-8b")


def run_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def profile(slo_rps: float, key: CapacityKey = KEY) -> CapacityProfile:
    return CapacityProfile(key, slo_rps, slo_rps * 1.5, 100, (600.0, 600.0), ((slo_rps, 0.99),))


def test_capacity_profiles_round_trip_and_a_new_profile_replaces_its_key(tmp_path):
    save_capacity(tmp_path, SETUP, profile(3.0))
    other = CapacityKey("azure-code", "mlperf-server", 512, True, 2048)
    save_capacity(tmp_path, SETUP, profile(1.0, other))
    save_capacity(tmp_path, SETUP, profile(4.0))
    assert load_capacity(tmp_path, SETUP, KEY).slo_rps == 4.0
    assert load_capacity(tmp_path, SETUP, other).slo_rps == 1.0
    document = json.loads((tmp_path / "a100-sxm4-80gb" / "llama3-8b-tp1" / "capacity.json").read_text())
    assert len(document["profiles"]) == 2 and document["engine"]["tp"] == 1


def test_a_missing_capacity_profile_says_which_command_makes_it(tmp_path):
    with pytest.raises(
        CapacityProfileError, match=r"run: throttllem capacity --gpu a100-sxm4-80gb .* --tp 1"
    ):
        load_capacity(tmp_path, SETUP, KEY)
    path = tmp_path / "a100-sxm4-80gb" / "llama3-8b-tp1" / "capacity.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(CapacityProfileError, match="not a capacity file"):
        load_capacity(tmp_path, SETUP, KEY)


def test_steady_mix_keeps_the_requests_and_arrives_at_one_per_second():
    window = Workload("w", np.linspace(0, 10, 2000), np.full(2000, 7), np.arange(1, 2001), 10.0)
    mix = steady_mix(window, seed=0)
    assert np.array_equal(mix.output_tokens, window.output_tokens)
    assert mix.mean_rate_rps == pytest.approx(1.0, rel=0.1)
    assert np.array_equal(steady_mix(window, seed=0).arrival_s, mix.arrival_s)


def test_busiest_minute_and_the_provisioned_size():
    arrivals = np.concatenate([np.linspace(0, 59, 60), np.linspace(60, 119.9, 300)])
    window = Workload("w", arrivals, np.ones(360), np.ones(360), 120.0)
    assert busiest_minute_rps(window) == pytest.approx(5.0)
    caps = {1: profile(1.0), 2: profile(4.0), 4: profile(9.0)}
    assert provisioned_size(caps, 0.5) == 1
    assert provisioned_size(caps, 5.0) == 4
    assert provisioned_size(caps, 50.0) == 4  # none covers it: the largest


def test_pool_plans_need_a_mode_the_baseline_and_expand_length_errors():
    plan = plan_pool_runs(["fixed:max", "autoscale:throttllem"], [0, 30])
    assert [run.label for run in plan] == [
        "fixed:max",
        "autoscale:throttllem:oracle",
        "autoscale:throttllem:noisy:30",
    ]
    assert plan[2] == PoolRun("autoscale", "throttllem:noisy:30", 30)
    with pytest.raises(ValueError, match="<mode>:<policy>"):
        plan_pool_runs(["fixed:max", "sometimes:max"], [])
    with pytest.raises(ValueError, match="list it"):
        plan_pool_runs(["autoscale:max"], [])
    with pytest.raises(ValueError, match="more than once"):
        plan_pool_runs(["fixed:max", "fixed:max"], [])


@pytest.fixture(scope="module")
def pool_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    models = tmp_path_factory.mktemp("models")
    out = tmp_path_factory.mktemp("pool")
    for tp in ("1", "2"):
        argv = ["capacity", *GEOMETRY, "--tp", tp, "--trace", "azure-code", "--start", "0"]
        run_json([*argv, "--duration", "300", "--models-dir", str(models), "--json"])
    # Minutes 0-4 of the code trace: two quiet minutes between bursts.
    argv = ["replay", *GEOMETRY, "--sizes", "1,2", "--trace", "azure-code", "--duration", "240"]
    argv += ["--policies", "fixed:max,autoscale:max", "--models-dir", str(models), "--period", "5"]
    argv += ["--peak-load", "1.0", "--cold-start", "10", "--grace", "20", "--out", str(out), "--json"]
    return run_json(argv), out


def test_pool_replay_writes_the_ablation_with_both_accountings(pool_report):
    results, out = pool_report
    runs = {run["run"]: run for run in results["runs"]}
    assert list(runs) == ["fixed:max", "autoscale:max"]
    assert results["meta"]["provisioned_size"] == 2
    fixed, auto = runs["fixed:max"]["summary"], runs["autoscale:max"]["summary"]
    assert fixed["scale_events"] == 0 and auto["scale_events"] > 0
    assert fixed["completed"] == auto["completed"] == fixed["requests"]
    for summary in (fixed, auto):
        assert summary["energy_node_j"] > summary["energy_engine_gpus_j"] > 0
    assert runs["fixed:max"]["versus_fixed_max"]["energy_saved_pct"] == 0.0
    saved = runs["autoscale:max"]["versus_fixed_max"]["energy_saved_pct"]
    assert saved == pytest.approx(100 * (1 - auto["energy_engine_gpus_j"] / fixed["energy_engine_gpus_j"]))
    assert auto["gpu_seconds_held"] < fixed["gpu_seconds_held"], "the quiet minutes run on tp1"
    assert (out / "timeline.png").read_bytes().startswith(PNG_MAGIC)
    assert "| autoscale:max |" in (out / "report.md").read_text()


def test_pool_replay_without_a_capacity_profile_fails_with_the_command(tmp_path, capsys):
    argv = ["replay", *GEOMETRY, "--sizes", "1,2", "--duration", "60", "--models-dir", str(tmp_path)]
    assert main([*argv, "--policies", "fixed:max", "--out", str(tmp_path / "out")]) == 1
    assert "run: throttllem capacity" in capsys.readouterr().err


def test_pool_replay_refuses_single_engine_loads(tmp_path, capsys):
    argv = ["replay", *GEOMETRY, "--sizes", "1,2", "--loads", "0.5", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert "--peak-load" in capsys.readouterr().err
