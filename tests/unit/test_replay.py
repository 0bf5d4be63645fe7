"""`replay`: policies side by side on the same arrivals, the peak search, the measured E2E target."""

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from agent.bench.replay import (
    BISECTIONS,
    PlannedRun,
    capacity_rate_scale,
    find_peak,
    plan_runs,
    replay_slo,
    run_policy,
    saturated_p99_e2e_s,
)
from agent.bench.report import PEAK, comparison_figures, tpot_attainment
from agent.catalog import gpu_spec, model_spec
from agent.cli import main
from agent.domain import Slo
from agent.policy_registry import build_policy
from agent.shipped import SHIPPED_MODELS_DIR
from agent.sim.loop import simulate
from agent.sim.policies import policy_context
from agent.slo_presets import load_slo_preset, meets_slo
from agent.twin.setup import TwinSetup
from agent.workloads import load_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
CAP = 2048
WINDOW = ("--trace", "azure-conv", "--start", "600")


def replay_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["replay", *WINDOW, *argv, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def three_policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("replay")
    argv = ("--duration", "60", "--policies", "max,static:1050,throttllem", "--rate-scale", "1")
    return replay_json(*argv, "--out", str(out)), out


@pytest.fixture(scope="module")
def tiny_window():
    return load_trace("azure-conv").window(600, 20)  # about 90 requests


def test_replay_writes_results_report_and_plots(three_policies):
    results, out = three_policies
    assert json.loads((out / "results.json").read_text()) == results
    report = (out / "report.md").read_text()
    for plot in results["groups"][0]["plots"].values():
        assert (out / plot).read_bytes().startswith(PNG_MAGIC)
        assert plot in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "policy" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| max", "| static:1050", "| throttllem"]
    page = (out / "report.html").read_text()  # the same report as one page, every plot embedded
    assert page.count('<img src="data:image/png;base64,') == len(results["groups"][0]["plots"]) == 4


def test_every_policy_replays_the_same_requests_for_different_energy(three_policies):
    results, _ = three_policies
    (group,) = results["groups"]
    assert group["policies"][0] == "max"
    summaries = [run["summary"] for run in results["runs"]]
    assert len({s["requests"] for s in summaries}) == 1 and summaries[0]["requests"] > 200
    assert all(s["completed"] == s["requests"] for s in summaries)
    assert len({round(s["energy_j"]) for s in summaries}) == 3
    assert all(0 <= s["slo_attainment"] <= 1 for s in summaries)
    meta = results["meta"]
    assert meta["peak_rate_scale"] is None and meta["slo"]["tpot_s"] == 0.1
    assert meta["arguments"]["policies"] == ["max", "static:1050", "throttllem"]
    assert meta["wall_seconds"] > 0 and meta["versions"]["throttllem"]


def test_length_errors_give_throttllem_one_run_each_and_share_the_baseline(tmp_path):
    argv = ("--duration", "10", "--policies", "max,throttllem", "--length-error", "0,30", "--rate-scale", "1")
    results = replay_json(*argv, "--out", str(tmp_path))
    assert [(r["policy"], r["length_error"]) for r in results["runs"]] == [
        ("max", None),
        ("throttllem:oracle", 0.0),
        ("throttllem:noisy:30", 30.0),
    ]
    assert [g["policies"] for g in results["groups"]] == [
        ["max", "throttllem:oracle"],
        ["max", "throttllem:noisy:30"],
    ]


def test_plan_runs_expands_only_plain_throttllem():
    assert plan_runs(["max", "throttllem", "throttllem-exact"], [0, 15]) == (
        PlannedRun("max", None),
        PlannedRun("throttllem:oracle", 0),
        PlannedRun("throttllem:noisy:15", 15),
        PlannedRun("throttllem-exact", None),
    )
    assert plan_runs(["throttllem:noisy:15"], []) == (PlannedRun("throttllem:noisy:15", None),)
    for policies, errors in ((["throttllem:oracle"], [15]), (["max", "max"], []), (["max"], [-1]), ([], [])):
        with pytest.raises(ValueError):
            plan_runs(policies, errors)


def test_peak_search_brackets_then_bisects_to_the_last_passing_scale(tiny_window):
    slo = replay_slo(load_slo_preset("mlperf-server", "llama3-8b"))
    start = capacity_rate_scale(SETUP, tiny_window, CAP)
    peak = find_peak(SETUP, tiny_window, slo, start, CAP)
    assert len(peak.probes) <= 3 + BISECTIONS
    passing = {p.rate_scale for p in peak.probes if p.attainment >= 0.99}
    failing = [p.rate_scale for p in peak.probes if p.attainment < 0.99]
    assert peak.rate_scale in passing
    assert (
        min(f for f in failing if f > peak.rate_scale) <= peak.rate_scale * 2 ** (1 / 2**BISECTIONS) * 1.001
    )


def test_loads_are_fractions_of_the_peak_found(tmp_path):
    results = replay_json(
        "--duration", "20", "--policies", "max", "--loads", "0.5,0.9", "--out", str(tmp_path)
    )
    peak = results["meta"]["peak_rate_scale"]
    assert peak > 0 and len(results["meta"]["peak_search"]) >= 2
    assert [(r["load"], r["summary"]["rate_scale"]) for r in results["runs"]] == [
        (0.5, pytest.approx(0.5 * peak)),
        (0.9, pytest.approx(0.9 * peak)),
    ]


def test_every_run_is_judged_against_the_bound_and_the_hindsight_reference(three_policies):
    results, out = three_policies
    summaries = {run["policy"]: run["summary"] for run in results["runs"]}
    bound = summaries["max"]["energy_bound_j"]
    hindsight = summaries["max"]["hindsight_energy_j"]
    assert summaries["max"]["hindsight_feasible"]
    assert 0 < bound <= summaries["max"]["hindsight_lp_energy_j"] <= hindsight <= summaries["max"]["energy_j"]
    for summary in summaries.values():
        assert summary["energy_bound_j"] == bound  # one bound per load, whatever the policy
        assert summary["energy_j"] >= bound
        share = (summaries["max"]["energy_j"] - summary["energy_j"]) / (summaries["max"]["energy_j"] - bound)
        assert summary["saving_share"] == pytest.approx(share)
        assert summary["gap_to_hindsight_pct"] == pytest.approx(100 * (summary["energy_j"] / hindsight - 1))
    assert summaries["max"]["saving_share"] == 0
    assert f"Lower bound {bound / 1000:,.1f} kJ" in (out / "report.md").read_text()


def test_no_limits_skips_the_bound_and_hindsight(tmp_path):
    results = replay_json(
        "--duration", "10", "--policies", "max", "--rate-scale", "1", "--no-limits", "--out", str(tmp_path)
    )
    assert "energy_bound_j" not in results["runs"][0]["summary"]
    assert "Lower bound" not in (tmp_path / "report.md").read_text()


def test_utilisations_are_fractions_of_capacity_and_need_no_peak(tmp_path):
    results = replay_json(
        "--duration", "20", "--policies", "max", "--utilisations", "0.25,0.5", "--out", str(tmp_path)
    )
    capacity = results["meta"]["capacity_rate_scale"]
    assert results["meta"]["peak_search"] is None  # utilisations are defined without max's SLO
    runs = results["runs"]
    assert [(r["load"], r["load_basis"]) for r in runs] == [(0.25, "capacity"), (0.5, "capacity")]
    assert [r["summary"]["rate_scale"] for r in runs] == [
        pytest.approx(0.25 * capacity),
        pytest.approx(0.5 * capacity),
    ]
    assert [r["summary"]["offered_load_of_capacity"] for r in runs] == [
        pytest.approx(0.25),
        pytest.approx(0.5),
    ]
    busy = [r["summary"]["busy_fraction"] for r in runs]
    assert 0 < busy[0] < busy[1] <= 1  # twice the offered load keeps the engine busier
    assert [g["label"] for g in results["groups"]] == ["azure-conv_util0.25", "azure-conv_util0.5"]
    assert "load 50% of capacity" in (tmp_path / "report.md").read_text()


def test_paper_preset_takes_its_e2e_from_max_at_saturation(tiny_window, tmp_path):
    preset = load_slo_preset("paper", "llama3-8b")
    capacity = capacity_rate_scale(SETUP, tiny_window, CAP)
    p99 = saturated_p99_e2e_s(SETUP, tiny_window, capacity, CAP)
    slo = replay_slo(preset, p99)
    assert math.isfinite(slo.targets.e2e_s) and slo.targets.e2e_s > 0 and slo.target.e2e_s == p99
    with pytest.raises(ValueError, match="saturating"):
        replay_slo(preset)
    results = replay_json(
        "--duration", "20", "--slo", "paper", "--policies", "max", "--rate-scale", "1", "--out", str(tmp_path)
    )
    assert results["meta"]["slo"]["e2e_s"] == pytest.approx(p99)
    assert results["meta"]["capacity_rate_scale"] == pytest.approx(capacity)


def test_unreachable_slo_is_one_error_line(tmp_path, capsys):
    preset = tmp_path / "tight.toml"
    preset.write_text(
        'name = "tight"\nsource = "test"\npercentile = 99\ne2e = "none"\n[models.llama3-8b]\ntpot_s = 0.001\n'
    )
    argv = [*WINDOW, "--duration", "5", "--slo", str(preset), "--policies", "max", "--out", str(tmp_path)]
    assert main(["replay", *argv, "--json"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "misses the tight SLO" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--policies", "max,bogus", "--rate-scale", "1"), "unknown policy 'bogus'"),
        (("--policies", "max", "--slo", "nope", "--rate-scale", "1"), "unknown SLO preset 'nope'"),
        (("--model", "llama2-70b", "--gpu", "a100-sxm4-40gb", "--policies", "max"), "does not fit"),
        (("--policies", "max", "--loads", "0.5", "--rate-scale", "2"), "pass one"),
        (("--policies", "max", "--utilisations", "0.5", "--rate-scale", "2"), "pass one"),
        (("--policies", "max", "--utilisations", "0,0.5"), "must be > 0"),
    ],
)
def test_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main(["replay", *WINDOW, "--duration", "5", *argv, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_the_tpot_plot_gives_the_share_of_requests_meeting_the_tpot_target(tiny_window):
    """On a simulated run: the TPOT CDF at the target is the per-request TPOT attainment."""
    slo = replay_slo(load_slo_preset("mlperf-server", "llama3-8b"))
    capacity = capacity_rate_scale(SETUP, tiny_window, CAP)
    requests = tiny_window.scale_rate(capacity).requests(max_tokens=CAP)  # saturated: some misses
    context = policy_context(SETUP, slo.targets, SHIPPED_MODELS_DIR)
    record = run_policy(
        build_policy("static:600", context),
        SETUP,
        requests,
        slo,
        trace="azure-conv",
        load=None,
        load_basis=PEAK,
        length_error=None,
        rate_scale=capacity,
        capacity_rate_scale=capacity,
    )
    # The independent answer: the SLO module's own per-request check, TPOT target only.
    result = simulate(SETUP, build_policy("static:600", context).policy, requests)
    tokens = np.asarray(result.output_tokens)
    met = meets_slo(Slo(None, slo.preset.tpot_s, None), result.ttft_s, result.tpot_s, result.e2e_s, tokens)[
        tokens > 1
    ]
    expected = float(met.mean())
    assert 0.3 < expected < 0.95  # misses and hits both, so the share is a real test

    (ax,) = comparison_figures([record], "test")["tpot_cdf"].axes
    (curve,) = [line for line in ax.get_lines() if line.get_label().startswith("static:600")]
    xs, ys = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
    at_target = ys[np.searchsorted(xs, slo.preset.tpot_s * 1e3, side="right") - 1]
    assert at_target == pytest.approx(expected)
    assert tpot_attainment(record) == pytest.approx(expected)
    assert f"{expected:.1%} within target" in curve.get_label()
