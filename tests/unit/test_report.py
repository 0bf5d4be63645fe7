"""The replay report: files, the table's arithmetic, JSON round trip, robustness of the plots."""

import json
from pathlib import Path

import numpy as np
import pytest

from agent.bench.report import (
    RunRecord,
    comparison_figures,
    thin_indices,
    tpot_attainment,
    weighted_cdf,
    write_report,
)
from agent.domain import Slo
from agent.slo_presets import meets_slo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def summary(policy: str, energy_j: float, tokens: int, **extra: float | None) -> dict:
    figures = {
        "policy": policy,
        "requests": 100,
        "completed": 100,
        "energy_j": energy_j,
        "tokens_out": tokens,
        "tokens_per_joule": tokens / energy_j,
        "ttft_p50_s": 0.1,
        "ttft_p99_s": 1.5,
        "tbt_p50_ms": 20.0,
        "tbt_p99_ms": 150.0,
        "e2e_p50_s": 4.0,
        "e2e_p99_s": 19.8,
        "mean_clock_mhz": 1410.0,
        "clock_changes": 0,
        "slo_attainment": 0.995,
    }
    figures.update(extra)
    return figures


def record(policy: str, energy_j: float, clock: float, n: int = 20_000, **kwargs) -> RunRecord:
    rng = np.random.default_rng(len(policy))
    fields = {
        "trace": "azure-conv",
        "load": 0.9,
        "length_error": None,
        "summary": summary(policy, energy_j, 800_000),
        "time_s": np.cumsum(rng.uniform(0.01, 0.03, n)),
        "clock_mhz": np.full(n, clock),
        "power_w": rng.uniform(150, 400, n),
        "tbt_s": rng.uniform(0.01, 0.3, n),
        "tbt_weight": rng.integers(0, 64, n).astype(float),
        "tpot_s": rng.uniform(0.01, 0.25, 300),
        "tpot_target_s": 0.2,
    }
    fields.update(kwargs)
    return RunRecord(policy=policy, **fields)


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, path


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report")
    runs = [
        record("static:1050", 150_000.0, 1050),  # listed before max on purpose
        record("max", 200_000.0, 1410),
        record("throttllem", 120_000.0, 1000, length_error=30.0),
    ]
    return out, write_report(
        out, runs, {"gpu": "a100-sxm4-80gb", "model": "llama3-8b", "slo": "mlperf-server"}
    ).results


def test_every_file_is_written(report: tuple[Path, dict]) -> None:
    out, _ = report
    label = "azure-conv_load0.9_err30"
    assert (out / "results.json").is_file()
    assert (out / "report.md").is_file()
    for kind in ("clock_power", "tpot_cdf", "tbt_cdf", "energy"):
        assert_png(out / f"{kind}_{label}.png")


def test_table_has_max_first_and_savings_by_hand(report: tuple[Path, dict]) -> None:
    out, _ = report
    header, *rows = table_rows((out / "report.md").read_text())
    assert header[0] == "policy"
    assert [row[0] for row in rows] == ["max", "static:1050", "throttllem"]
    saved = header.index("saved vs max")
    ratio = header.index("tok/J vs max")
    # 1 − 150/200 = 25%, 1 − 120/200 = 40%; tokens/J ratio = 200/150, 200/120
    assert [row[saved] for row in rows] == ["0.0%", "25.0%", "40.0%"]
    assert [row[ratio] for row in rows] == ["1.00×", "1.33×", "1.67×"]
    assert rows[1][header.index("energy kJ")] == "150.0"
    assert rows[0][header.index("SLO attainment")] == "99.50%"
    assert rows[0][header.index("E2E p50 / p99 s")] == "4.0 / 19.8"


def test_results_json_round_trips(report: tuple[Path, dict]) -> None:
    out, results = report
    assert json.loads((out / "results.json").read_text()) == results
    assert results["meta"]["slo"] == "mlperf-server"
    assert [run["policy"] for run in results["runs"]] == ["static:1050", "max", "throttllem"]
    (group,) = results["groups"]
    assert group["policies"] == ["max", "static:1050", "throttllem"]
    assert group["versus_max"]["throttllem"]["energy_saved_pct"] == pytest.approx(40.0)
    assert "time_s" not in json.dumps(results)


def test_runs_without_length_error_join_every_length_error_group(tmp_path: Path) -> None:
    runs = [
        record("max", 200.0, 1410, n=50),
        record("throttllem", 150.0, 1000, n=50, length_error=0.0),
        record("throttllem", 160.0, 1000, n=50, length_error=30.0),
    ]
    results = write_report(tmp_path, runs, {}).results
    assert [g["label"] for g in results["groups"]] == ["azure-conv_load0.9_err0", "azure-conv_load0.9_err30"]
    assert all(g["policies"] == ["max", "throttllem"] for g in results["groups"])
    savings = [g["versus_max"]["throttllem"]["energy_saved_pct"] for g in results["groups"]]
    assert savings == pytest.approx([25.0, 20.0])


def test_degenerate_runs_still_give_valid_files(tmp_path: Path) -> None:
    nan_summary = summary("throttllem", 100.0, 10, ttft_p99_s=float("nan"), slo_attainment=None)
    nan_summary["energy_j"] = float("nan")
    runs = [
        record(
            "throttllem",
            100.0,
            1000,
            n=0,
            trace="data/my trace.csv",
            load=None,
            summary=nan_summary,
            tpot_s=np.array([]),
        ),
    ]
    results = write_report(tmp_path, runs, {"note": float("nan")}).results
    label = "my-trace.csv"
    for kind in ("clock_power", "tpot_cdf", "tbt_cdf", "energy"):
        assert_png(tmp_path / f"{kind}_{label}.png")
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text
    assert json.loads(text) == results
    assert results["meta"]["note"] is None
    (row,) = table_rows((tmp_path / "report.md").read_text())[1:]
    assert row[1] == "—"  # energy unknown
    assert "No `max` run" in (tmp_path / "report.md").read_text()


def test_nan_samples_are_plotted_around(tmp_path: Path) -> None:
    run = record("max", 200.0, 1410, n=100)
    run.power_w[::7] = np.nan
    run.tbt_s[::5] = np.nan
    run.tpot_s[::3] = np.nan  # 1-token outputs have no TPOT
    write_report(tmp_path, [run], {})
    for kind in ("clock_power", "tpot_cdf", "tbt_cdf"):
        assert_png(tmp_path / f"{kind}_azure-conv_load0.9.png")


def test_a_policy_twice_in_one_group_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="more than once"):
        write_report(tmp_path, [record("max", 1.0, 1410, n=5), record("max", 2.0, 1410, n=5)], {})


def test_mismatched_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        record("max", 1.0, 1410, n=5, power_w=np.ones(4))


def test_weighted_cdf_by_hand() -> None:
    x, y = weighted_cdf(np.array([3.0, 1.0, np.nan, 2.0, 9.0]), np.array([2.0, 1.0, 5.0, 1.0, 0.0]))
    assert x.tolist() == [1.0, 2.0, 3.0]
    assert y.tolist() == [0.25, 0.5, 1.0]


def test_thinning_keeps_the_ends_and_the_limit() -> None:
    idx = thin_indices(1_000_000)
    assert len(idx) <= 5000
    assert idx[0] == 0
    assert idx[-1] == 999_999
    assert thin_indices(3).tolist() == [0, 1, 2]


def curve_at(ax, label_start: str, x: float) -> float:
    """The height of a post-step CDF line at `x` (0 left of its first point)."""
    (line,) = [line for line in ax.get_lines() if line.get_label().startswith(label_start)]
    xs, ys = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    i = np.searchsorted(xs, x, side="right") - 1
    return float(ys[i]) if i >= 0 else 0.0


def vertical_lines_at(ax, x: float) -> list[str]:
    return [
        line.get_label()
        for line in ax.get_lines()
        if len(line.get_xdata()) == 2 and np.allclose(np.asarray(line.get_xdata(), float), x)
    ]


def test_tpot_plot_shows_each_request_against_its_target_and_the_gaps_plot_draws_no_target() -> None:
    # The tester's case: every fast request has one slow gap past the 100 ms target (5% of its gaps)
    # yet a mean well within it; 20 slow requests miss. TPOT attainment is 200/220, not a gap share.
    fast = np.tile(np.append(np.full(19, 0.04), 0.15), 200)
    slow = np.full(20 * 20, 0.12)
    gaps = np.concatenate([fast, slow])
    tpot = gaps.reshape(-1, 20).mean(axis=1)
    attainment = float(
        meets_slo(Slo(None, 0.1, None), np.zeros(220), tpot, np.ones(220), np.full(220, 21)).mean()
    )
    run = record("throttllem", 1.0, 1000, n=10, tbt_s=gaps, tbt_weight=np.ones_like(gaps), tpot_s=tpot)
    run = RunRecord(**{**vars(run), "tpot_target_s": 0.1})
    figures = comparison_figures([run], "test")

    (tpot_ax,) = figures["tpot_cdf"].axes
    assert attainment == pytest.approx(200 / 220)
    assert tpot_attainment(run) == pytest.approx(attainment)
    assert curve_at(tpot_ax, "throttllem", 100.0) == pytest.approx(attainment)
    assert any("90.9% within target" in line.get_label() for line in tpot_ax.get_lines())
    assert vertical_lines_at(tpot_ax, 100.0) == ["TPOT target 100 ms"]

    (gap_ax,) = figures["tbt_cdf"].axes
    assert curve_at(gap_ax, "throttllem", 100.0) < 0.9  # many single gaps exceed 100 ms ...
    assert vertical_lines_at(gap_ax, 100.0) == []  # ... and no target line says they should not
    assert [line.get_label() for line in gap_ax.get_lines()] == ["throttllem"]


def test_idle_spans_under_stock_clocks_are_shaded_and_the_first_is_named() -> None:
    run = record("throttllem", 1.0, 600, n=50, stock_idle_spans_s=((0.0, 0.3), (0.9, 1.0)))
    run = RunRecord(**{**vars(run), "time_s": np.linspace(0.0, 1.0, 50)})
    ax_clock = comparison_figures([run], "test")["clock_power"].axes[0]
    spans = [patch for patch in ax_clock.patches if str(patch.get_label()).startswith("throttllem: idle")]
    assert len(ax_clock.patches) == 2 and len(spans) == 1  # one legend entry for both spans
    assert [text.get_text() for text in ax_clock.texts] == ["idle: no request yet"]
    with pytest.raises(ValueError, match="idle spans"):
        record("max", 1.0, 1410, n=5, stock_idle_spans_s=((2.0, 1.0),))
