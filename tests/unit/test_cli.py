"""The command line as a user meets it: real process for the console script, main() for the rest."""

import json
import subprocess
import sys

import pytest

from agent.cli import main
from agent.shipped import SHIPPED_MODELS_DIR

SIM_KEYS = {
    "requests",
    "completed",
    "energy_j",
    "tokens_out",
    "tokens_per_joule",
    "ttft_p50_s",
    "ttft_p99_s",
    "tbt_p50_ms",
    "tbt_p99_ms",
    "e2e_p50_s",
    "e2e_p99_s",
    "mean_clock_mhz",
    "sim_seconds",
    "wall_seconds",
}


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_simulate_json_has_the_contract_keys(capsys):
    out = run_json(capsys, "simulate", "--trace", "azure-conv", "--duration", "60", "--json")
    assert out.keys() >= SIM_KEYS
    assert out["requests"] == out["completed"] > 0
    assert out["mean_clock_mhz"] == pytest.approx(1410)


def test_static_clock_and_rate_scale(capsys):
    base = run_json(capsys, "simulate", "--duration", "60", "--policy", "static:1050", "--json")
    fast = run_json(
        capsys, "simulate", "--duration", "60", "--rate-scale", "2", "--policy", "static:1050", "--json"
    )
    assert base["mean_clock_mhz"] == pytest.approx(1050, rel=1e-3)  # the lock lands after 5 ms
    assert fast["requests"] == base["requests"]
    assert fast["sim_seconds"] < base["sim_seconds"]


def test_load_scales_to_a_fraction_of_peak(capsys):
    low = run_json(
        capsys, "simulate", "--trace", "azure-code", "--duration", "300", "--load", "0.3", "--json"
    )
    high = run_json(
        capsys, "simulate", "--trace", "azure-code", "--duration", "300", "--load", "0.9", "--json"
    )
    assert high["busy_fraction"] > low["busy_fraction"]


def test_probe_decode_and_prefill(capsys):
    args = ("twin", "probe", "--gpu", "a100-sxm4-80gb", "--model", "llama3-8b", "--tp", "1")
    decode = run_json(
        capsys, *args, "--phase", "decode", "--batch", "32", "--context", "1024", "--clock", "1050", "--json"
    )
    prefill = run_json(capsys, *args, "--phase", "prefill", "--tokens", "2048", "--json")
    assert decode.keys() >= {"iteration_ms", "power_w"}
    assert decode["clock_mhz"] == 1050 and prefill["clock_mhz"] == 1410
    assert prefill["power_w"] > decode["power_w"]


def test_lists(capsys):
    gpus = run_json(capsys, "twin", "gpus", "--json")
    models = run_json(capsys, "twin", "models", "--json")
    assert {g["name"] for g in gpus} == {"a100-sxm4-80gb", "a100-sxm4-40gb", "h100-sxm5-80gb"}
    assert {m["name"] for m in models} == {"llama2-7b", "llama3-8b", "llama2-13b", "llama2-70b", "llama3-70b"}


def test_twin_validate_reports_each_group_against_its_limit(capsys):
    groups = run_json(capsys, "twin", "validate", "--source", "trtllm-docs", "--json")
    assert {g["source"] for g in groups} == {"trtllm-docs"}
    assert {g["tp"] for g in groups} == {1, 4, 8}
    for g in groups:
        assert g["within_limit"] == (g["mape"] <= g["limit"]) and g["points"] > 0


def test_sourced_clock_range_keeps_every_clock_at_or_above_the_calibrated_floor(capsys):
    out = run_json(
        capsys,
        "simulate",
        "--trace",
        "azure-conv",
        "--duration",
        "30",
        "--policy",
        "reactive",
        "--clock-range",
        "sourced",
        "--json",
    )
    assert out["min_clock_mhz"] == 855 and out["clock_range"] == "sourced"
    assert out["mean_clock_mhz"] >= 855


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--policy", "static:1051"], "not a supported clock"),
        (["simulate", "--trace", "/nonexistent.csv"], "nonexistent.csv"),
        (["simulate", "--model", "llama2-70b", "--gpu", "a100-sxm4-40gb", "--tp", "1"], "does not fit"),
        (["simulate", "--load", "0.5", "--rate-scale", "2"], "pass one"),
        (["demo", "--autoscale", "--live-baseline"], "simulated only"),
        (["demo", "--autoscale", "--sizes", "1"], "two engine sizes"),
        (["demo", "--autoscale", "--sizes", "1,0"], "--sizes="),
        (["demo", "--autoscale", "--model", "llama3-8b", "--gpu", "a100-sxm4-80gb"], "throttllem capacity"),
    ],
)
def test_errors_are_one_readable_line(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("throttllem: error:") and message in err
    assert "\n" not in err


def test_invalid_env_var_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("THROTTLLEM_TP", "three")
    assert main(["twin", "gpus"]) == 1
    assert "THROTTLLEM_TP" in capsys.readouterr().err
    monkeypatch.setenv("THROTTLLEM_TP", "1")
    monkeypatch.setenv("THROTTLLEM_GPU", "v100")
    assert main(["twin", "gpus"]) == 1
    err = capsys.readouterr().err
    assert "THROTTLLEM_GPU='v100'" in err and "a100-sxm4-80gb" in err


def test_env_sets_defaults(monkeypatch, capsys):
    monkeypatch.setenv("THROTTLLEM_POLICY", "static:1200")
    out = run_json(capsys, "simulate", "--duration", "30", "--json")
    assert out["policy"] == "static:1200"


def test_console_script_help():
    help_text = subprocess.run(
        [sys.executable, "-m", "agent.cli", "simulate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--policy" in help_text and "--load" in help_text


def test_synthetic_workloads_follow_the_seed(capsys):
    a = run_json(
        capsys, "simulate", "--trace", "synthetic:poisson:2", "--duration", "60", "--seed", "3", "--json"
    )
    b = run_json(
        capsys, "simulate", "--trace", "synthetic:poisson:2", "--duration", "60", "--seed", "3", "--json"
    )
    c = run_json(
        capsys, "simulate", "--trace", "synthetic:poisson:2", "--duration", "60", "--seed", "4", "--json"
    )
    assert a["energy_j"] == b["energy_j"] and a["requests"] == b["requests"]
    assert (a["requests"], a["energy_j"]) != (c["requests"], c["energy_j"])
    assert 60 <= a["requests"] <= 180  # 2 req/s for 60 s
    assert main(["simulate", "--trace", "synthetic:gamma:2", "--json"]) == 1
    assert "synthetic:gamma:<rate rps>:<cv>" in capsys.readouterr().err


def test_profile_train_and_bench_predictor_end_to_end(tmp_path, capsys):
    data, model_dir = tmp_path / "profile.csv", tmp_path / "model"
    setup = ("--gpu", "a100-sxm4-80gb", "--model", "llama3-8b", "--tp", "1")
    prof = run_json(
        capsys, "profile", "--target", "twin", *setup, "--samples", "3000", "--out", str(data), "--json"
    )
    assert prof["rows"] >= 3000 and data.with_suffix(".csv.json").exists()
    before = data.read_bytes()
    again = run_json(
        capsys, "profile", "--target", "twin", *setup, "--samples", "3000", "--out", str(data), "--json"
    )
    # Resuming re-runs only the last point (it may have been cut short) and rewrites it identically.
    assert again["rows"] == prof["rows"] and again["new_rows"] < 300
    assert data.read_bytes() == before
    trained = run_json(capsys, "train", "--data", str(data), "--out", str(model_dir), "--json")
    assert trained["held_out_90_10.r2"] > 0.95 and trained["onnx_max_rel_error"] <= 1e-4
    bench = run_json(
        capsys, "bench", "predictor", *setup, "--model-dir", str(model_dir), "--rows", "1000", "--json"
    )
    assert bench["held_out"]["r2"] > 0.95
    assert {"predict_1_rows", "predict_64_rows", "predict_1024_rows", "decode_table"} <= bench.keys()
    assert bench["predict_64_rows"]["p50_us"] > 0


def test_profile_refuses_a_dataset_of_another_setup(tmp_path, capsys):
    data = tmp_path / "profile.csv"
    assert main(["profile", "--samples", "200", "--out", str(data), "--json"]) == 0
    capsys.readouterr()
    assert main(["profile", "--samples", "200", "--out", str(data), "--tp", "2", "--json"]) == 1
    assert "tp" in capsys.readouterr().err


def test_shipped_models_load_and_pass_parity():

    from agent.predict.ips import IpsModel

    shipped = sorted(p for p in SHIPPED_MODELS_DIR.glob("*/*/card.json") if p.parent.parent.name != "lengths")
    assert len(shipped) >= 5
    for card in shipped:
        model = IpsModel(card.parent)
        assert model.card["metrics"]["onnx_max_rel_error"] <= 1e-4
        assert model.card["metrics"]["held_out_90_10"]["r2"] >= 0.98
        assert model.card["features"]["clock_mhz"]["monotone"] == 1


def test_simulate_runs_predictive_policies_and_reports_attainment(capsys):
    stock = run_json(capsys, "simulate", "--duration", "60", "--json")
    smart = run_json(capsys, "simulate", "--duration", "60", "--policy", "throttllem", "--json")
    assert stock["slo_attainment"] >= 0.99 and stock["slo"] == "mlperf-server"
    assert smart["completed"] == stock["completed"]
    assert smart["energy_j"] < stock["energy_j"]
    assert 0.0 <= smart["slo_attainment"] <= 1.0


def test_bench_decide_reports_latency(capsys):
    out = run_json(capsys, "bench", "decide", "--running", "64", "--queued", "8", "--repeats", "20", "--json")
    for search in ("two-level", "bisect", "all"):
        assert out[search]["decide_p50_ms"] > 0 and out[search]["running"] == 64
