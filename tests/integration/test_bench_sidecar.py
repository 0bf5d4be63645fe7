"""`throttllem bench sidecar` end to end, shrunk: every figure present, every request answered."""

import json

from agent.cli import main


def test_bench_sidecar_reports_latency_footprint_and_decisions(tmp_path, capsys):
    argv = ["bench", "sidecar", "--requests", "20", "--duration", "5", "--logs", str(tmp_path), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    latency, footprint, decisions = out["gateway_latency"], out["sidecar_footprint"], out["decision_latency"]
    for side in ("direct", "gateway"):
        assert latency[side]["answered"] == latency[side]["requests"] == 20
        assert latency[side]["lag_samples"] == latency[side]["tokens"] > 0  # the twin stamps every token
        assert 0 <= latency[side]["token_lag_p50_ms"] <= latency[side]["token_lag_p99_ms"]
        assert latency[side]["request_lag_p50_ms"] is not None  # the twin stamps every arrival
    assert latency["direct"]["tokens"] == latency["gateway"]["tokens"]  # the same requests both ways
    assert set(latency["added"]) >= {"ttft_p99_ms", "gap_p99_ms", "token_lag_p99_ms"}
    assert latency["sidecar_cpu_ms_per_token"] > 0
    assert footprint["answered"] == footprint["requests"] > 0
    assert 0 < footprint["cpu_pct_of_core_mean"] < 200 and 30 < footprint["rss_mb_max"] < 2000
    assert decisions["decisions"] > 0 and decisions["histogram_p99_ms"] > 0
    assert decisions["bench_decide"]["decide_p99_ms"] > 0
    assert set(out["targets"]) == {"gateway_added_token_p99_ms", "sidecar_cpu_pct_of_core", "sidecar_rss_mb"}
    assert {p.name for p in tmp_path.iterdir()} >= {"twin.log", "sidecar-max.log", "sidecar-footprint.log"}
