"""Sidecar settings: every bad value is refused with the variable's name and what it accepts."""

import logging
import re

import pytest

from agent.config import (
    ConfigError,
    Settings,
    env_name,
    load_settings,
    settings_table_markdown,
    warn_unknown_variables,
)
from agent.coordinator.settings import load_coordinator_settings  # also loads its settings class


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)


def test_defaults_are_a_safe_sidecar():
    settings = load_settings(sidecar=True)
    assert (settings.actuator, settings.meter, settings.gateway_port) == ("dryrun", "none", 0)
    assert settings.poll_interval_ms == 100 and settings.telemetry_stale_s == 2.0
    assert not settings.admin_enabled
    assert settings.metrics_url == "http://127.0.0.1:8002/metrics"


def test_metrics_url_default_follows_the_engine(monkeypatch):
    monkeypatch.setenv("THROTTLLEM_ENGINE", "trtllm-serve")
    assert load_settings().metrics_url == "http://127.0.0.1:8000/metrics"
    monkeypatch.setenv("THROTTLLEM_ENGINE_METRICS_URL", "http://engine:9000/stats")
    assert load_settings().metrics_url == "http://engine:9000/stats"


BAD_VALUES = [
    ("THROTTLLEM_ENGINE", "tgi", "must be 'triton', 'trtllm-serve' or 'vllm'"),
    ("THROTTLLEM_ENGINE_METRICS_URL", "localhost:8002", "must be an http(s) URL"),
    ("THROTTLLEM_ENGINE_URL", "ftp://x", "must be an http(s) URL"),
    ("THROTTLLEM_ENGINE_URL", "http://h:80 80", "without whitespace"),
    ("THROTTLLEM_ENGINE_URL", "http://h:80:90", "must be an http(s) URL"),  # urlsplit takes it, aiohttp not
    ("THROTTLLEM_ENGINE_URL", "http://user@:80", "must be an http(s) URL"),
    ("THROTTLLEM_ENGINE_METRICS_URL", "http://h:99999/metrics", "the port must be a number in 1..65535"),
    ("THROTTLLEM_ENGINE_METRICS_URL", "http://h:0/metrics", "the port must be a number in 1..65535"),
    ("THROTTLLEM_ENGINE_METRICS_URL", "http://h:+80/metrics", "the port must be a number in 1..65535"),
    ("THROTTLLEM_TWIN_URL", "http://a..b:8000", "must be a DNS name"),
    ("THROTTLLEM_DCGM_URL", "http://-dcgm-:9400/metrics", "must be a DNS name"),
    ("THROTTLLEM_DCGM_URL", "http://dcgm\t:9400/metrics", "without whitespace"),
    ("THROTTLLEM_GATEWAY_HOST", "0.0.0.0 ", "must be a DNS name"),
    ("THROTTLLEM_SIDECAR_HOST", "my host", "must be a DNS name"),
    ("THROTTLLEM_GATEWAY_PORT", "70000", "must be less than or equal to 65535"),
    ("THROTTLLEM_SIDECAR_PORT", "-1", "must be greater than or equal to 0"),
    ("THROTTLLEM_ADMIN_ENABLED", "perhaps", "must be a valid boolean"),
    ("THROTTLLEM_ADMIN_PORT", "x", "must be a valid integer"),
    ("THROTTLLEM_ACTUATOR", "sysfs", "must be 'nvml', 'twin', 'dryrun'"),
    ("THROTTLLEM_METER", "rapl", "must be 'nvml', 'dcgm', 'twin' or 'none'"),
    ("THROTTLLEM_GPU_UUID", "0", "must be a full GPU UUID"),
    ("THROTTLLEM_GPU_INDEX", "-2", "must be greater than or equal to 0"),
    ("THROTTLLEM_GPU_UUIDS", "GPU-1,2", "must be full GPU UUIDs"),
    ("THROTTLLEM_GPU_UUIDS", "GPU-1, GPU-1", "lists a GPU twice"),
    ("THROTTLLEM_TWIN_URL", "twin:8000", "must be an http(s) URL"),
    ("THROTTLLEM_DCGM_URL", "nope", "must be an http(s) URL"),
    ("THROTTLLEM_POLICY", "turbo", "must be max | static:<MHz>"),
    ("THROTTLLEM_POLICY", "static:1234", "not a supported clock"),
    ("THROTTLLEM_POLICY", "throttllem-exact", "needs true output lengths"),
    ("THROTTLLEM_POLICY", "throttllem:oracle", "live requests have no true output length"),
    ("THROTTLLEM_POLICY", "throttllem:noisy:30", "live requests have no true output length"),
    ("THROTTLLEM_SLO", "fastest", "unknown SLO preset"),
    ("THROTTLLEM_MODELS_DIR", "/nonexistent/models", "must be an existing directory"),
    ("THROTTLLEM_POLL_INTERVAL_MS", "5", "must be greater than or equal to 10"),
    ("THROTTLLEM_TELEMETRY_STALE_S", "0", "must be greater than 0"),
    ("THROTTLLEM_HOLD_QUEUE_MAX", "0", "must be greater than or equal to 1"),
    ("THROTTLLEM_MAX_HOLD_S", "-1", "must be greater than 0"),
    ("THROTTLLEM_TOKENIZER", "/nonexistent/tokenizer.json", "must be an existing tokenizer file"),
    ("THROTTLLEM_LOG_LEVEL", "LOUD", "must be one of DEBUG | INFO | WARNING | ERROR"),
    ("THROTTLLEM_SHUTDOWN_TIMEOUT_S", "0", "must be greater than 0"),
    ("THROTTLLEM_TRACE_SAMPLE_EVERY", "0", "must be greater than or equal to 1"),
    ("THROTTLLEM_MAX_BATCH_SIZE", "0", "must be greater than or equal to 1"),
    ("THROTTLLEM_MAX_NUM_TOKENS", "0", "must be greater than or equal to 1"),
    ("THROTTLLEM_ENERGY_TENANT_HEADER", "X Tenant", "must be an HTTP header name"),
    ("THROTTLLEM_ENERGY_TENANT_HEADER", "X-Tenant:", "must be an HTTP header name"),
    ("THROTTLLEM_ENERGY_TENANT_HEADER", "", "must be an HTTP header name"),
    ("THROTTLLEM_ENERGY_TENANT_HEADER", "X-Ténant", "must be an HTTP header name"),
    ("THROTTLLEM_ENERGY_MAX_TENANTS", "0", "must be greater than or equal to 1"),
    ("THROTTLLEM_ENERGY_MAX_TENANTS", "10001", "must be less than or equal to 10000"),
]


def test_energy_labels_default_to_no_tenant_header_and_a_cap_of_64(monkeypatch):
    settings = load_settings(sidecar=True)
    assert (settings.energy_tenant_header, settings.energy_max_tenants) == (None, 64)
    monkeypatch.setenv("THROTTLLEM_ENERGY_TENANT_HEADER", "X-Tenant_ID.v2")
    monkeypatch.setenv("THROTTLLEM_ENERGY_MAX_TENANTS", "10000")
    settings = load_settings(sidecar=True)
    assert (settings.energy_tenant_header, settings.energy_max_tenants) == ("X-Tenant_ID.v2", 10000)


@pytest.mark.parametrize(("variable", "value", "message"), BAD_VALUES)
def test_bad_value_names_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    if variable == "THROTTLLEM_MODELS_DIR":
        monkeypatch.setenv("THROTTLLEM_POLICY", "throttllem")
        monkeypatch.setenv("THROTTLLEM_GATEWAY_PORT", "8080")
    with pytest.raises(ConfigError) as caught:
        load_settings(sidecar=True)
    text = str(caught.value)
    assert text.startswith(f"{variable}=")
    assert message in text


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"THROTTLLEM_ACTUATOR": "twin"}, "THROTTLLEM_TWIN_URL"),
        ({"THROTTLLEM_METER": "twin"}, "THROTTLLEM_TWIN_URL"),
        ({"THROTTLLEM_ACTUATOR": "nvml"}, "THROTTLLEM_GPU_UUID"),
        ({"THROTTLLEM_METER": "dcgm"}, "THROTTLLEM_GPU_UUID"),
        ({"THROTTLLEM_GPU_UUID": "GPU-1", "THROTTLLEM_GPU_INDEX": "0"}, "THROTTLLEM_GPU_INDEX"),
        ({"THROTTLLEM_GPU_UUIDS": "GPU-1,GPU-2", "THROTTLLEM_GPU_UUID": "GPU-1"}, "THROTTLLEM_GPU_UUID"),
        ({"THROTTLLEM_GPU_UUIDS": "GPU-1,GPU-2", "THROTTLLEM_ACTUATOR": "nvml"}, "THROTTLLEM_GPU_UUIDS"),
        ({"THROTTLLEM_GPU_UUID": "GPU-1", "THROTTLLEM_TP": "2"}, "THROTTLLEM_GPU_UUID"),
        ({"THROTTLLEM_POLICY": "throttllem"}, "THROTTLLEM_GATEWAY_PORT"),
        (
            {"THROTTLLEM_POLL_INTERVAL_MS": "1000", "THROTTLLEM_TELEMETRY_STALE_S": "1.5"},
            "THROTTLLEM_TELEMETRY_STALE_S",
        ),
    ],
)
def test_settings_that_do_not_fit_together_name_what_to_change(monkeypatch, env, variable):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    load_settings()  # each value is fine alone: other commands are not affected
    with pytest.raises(ConfigError, match=f"^{variable}( is unset|=)"):
        load_settings(sidecar=True)


def test_a_tp_engine_is_selected_by_all_its_gpus(monkeypatch):
    monkeypatch.setenv("THROTTLLEM_TP", "2")
    monkeypatch.setenv("THROTTLLEM_GPU_UUIDS", " GPU-a , GPU-b ")
    monkeypatch.setenv("THROTTLLEM_ACTUATOR", "nvml")
    settings = load_settings(sidecar=True)
    assert settings.selected_gpu_uuids == ("GPU-a", "GPU-b")
    monkeypatch.setenv("THROTTLLEM_TP", "4")
    with pytest.raises(ConfigError, match=r"^THROTTLLEM_GPU_UUIDS=.*selects 2 GPU\(s\) but THROTTLLEM_TP=4"):
        load_settings(sidecar=True)


def test_flag_overrides_are_named_as_flags(monkeypatch):
    monkeypatch.setenv("THROTTLLEM_POLICY", "static:1050")
    assert load_settings({"policy": "max"}).policy == "max"
    with pytest.raises(ConfigError, match=r"^--sidecar-port=70000: must be less than or equal to 65535"):
        load_settings({"sidecar_port": 70000})


def test_table_lists_every_variable_with_its_default():
    table = settings_table_markdown()
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in table
    assert "| `THROTTLLEM_POLL_INTERVAL_MS` | `100` |" in table
    assert "| `THROTTLLEM_ADMIN_ENABLED` | `false` |" in table
    assert "| `THROTTLLEM_TWIN_URL` | unset |" in table
    rows = table.strip().splitlines()
    assert all(len(re.split(r"(?<!\\)\|", row)) == 5 for row in rows)  # 3 cells: every | escaped


def test_run_with_settings_that_do_not_fit_prints_one_line_and_exits_1(monkeypatch, capsys):
    from agent.cli import main

    monkeypatch.setenv("THROTTLLEM_ACTUATOR", "twin")
    assert main(["run"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(
        "throttllem: error: THROTTLLEM_TWIN_URL is unset: needed when THROTTLLEM_ACTUATOR=twin: "
        "the twin server's HTTP URL"
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"THROTTLLEM_METER": "twin"}, "THROTTLLEM_TWIN_URL is unset: needed when THROTTLLEM_METER=twin"),
        (
            {"THROTTLLEM_ACTUATOR": "twin", "THROTTLLEM_METER": "twin"},
            "THROTTLLEM_TWIN_URL is unset: needed when THROTTLLEM_ACTUATOR=twin and THROTTLLEM_METER=twin",
        ),
        ({"THROTTLLEM_ACTUATOR": "nvml"}, "THROTTLLEM_GPU_UUID is unset: set it (or THROTTLLEM_GPU_UUIDS"),
        ({"THROTTLLEM_METER": "dcgm"}, "THROTTLLEM_GPU_UUID is unset: set it (or THROTTLLEM_GPU_UUIDS"),
    ],
)
def test_a_missing_setting_reads_unset_never_none(monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(sidecar=True)
    assert str(caught.value).startswith(expected)
    assert "None" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8002/metrics",
        "https://engine.ns.svc.cluster.local:8000",
        "http://[::1]:8000/metrics",
        "http://triton_engine:8002/metrics",  # a Docker Compose service name
        "http://user:secret@host:1/x?y=1",
        "http://host.:65535/",
    ],
)
def test_good_urls_and_hosts_pass(monkeypatch, url):
    monkeypatch.setenv("THROTTLLEM_ENGINE_URL", url)
    monkeypatch.setenv("THROTTLLEM_SIDECAR_HOST", "::")
    settings = load_settings(sidecar=True)
    assert settings.engine_url == url and settings.sidecar_host == "::"


def test_unresolvable_host_is_left_to_runtime(monkeypatch):
    monkeypatch.setenv("THROTTLLEM_ENGINE_METRICS_URL", "http://engine-not-created-yet.invalid:8002/metrics")
    assert load_settings(sidecar=True).metrics_url.startswith("http://engine-not-created-yet.invalid")


def test_misspelt_and_unknown_variables_are_warned_once_each_never_fatal(monkeypatch, caplog):
    monkeypatch.setenv("THROTTLLEM_POLCY", "max")  # a typo of THROTTLLEM_POLICY
    monkeypatch.setenv("THROTTLLEM_TELEMETRY_STALE", "3")
    monkeypatch.setenv("THROTTLLEM_FROM_A_NEWER_RELEASE", "1")
    monkeypatch.setenv("THROTTLLEM_COORDINATOR_PORT", "9500")  # the coordinator's: known
    monkeypatch.setenv("THROTTLLEM_GPU", "a100-sxm4-80gb")
    with caplog.at_level(logging.WARNING, logger="agent.config"):
        warn_unknown_variables()
        settings = load_settings(sidecar=True)  # still starts
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("THROTTLLEM_FROM_A_NEWER_RELEASE is set but no setting reads it")
    assert "did you mean" not in warnings[0]
    assert warnings[1].startswith("THROTTLLEM_POLCY") and "did you mean THROTTLLEM_POLICY?" in warnings[1]
    assert "did you mean THROTTLLEM_TELEMETRY_STALE_S?" in warnings[2]
    assert settings.policy == "max"


def test_the_coordinator_refuses_hosts_as_the_sidecar_does(monkeypatch):
    monkeypatch.setenv("THROTTLLEM_COORDINATOR_ROUTER_HOST", "127.0.0.1 9100")
    with pytest.raises(
        ConfigError, match=r"^THROTTLLEM_COORDINATOR_ROUTER_HOST='127.0.0.1 9100': must be a DNS"
    ):
        load_coordinator_settings()
