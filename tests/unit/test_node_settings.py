"""THROTTLLEM_NODE_* settings: defaults, and errors that name the variable (or the flag)."""

import asyncio
import json

import pytest

from agent.cli import main
from agent.config import ConfigError
from agent.node.settings import NODE_PREFIX, NodeSettings, load_node_settings
from tests.unit.node_harness import leased, running_agent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for field in NodeSettings.model_fields:
        monkeypatch.delenv(f"{NODE_PREFIX}{field.upper()}", raising=False)


def test_defaults_are_the_daemonset_contract():
    settings = load_node_settings()
    assert str(settings.socket) == "/run/throttllem/node.sock"
    assert settings.gpu_backend == "nvml" and settings.pod_check == "kubelet"
    assert settings.lease_ttl_s == 1.0
    assert str(settings.pod_resources_socket) == "/var/lib/kubelet/pod-resources/kubelet.sock"


def test_twin_backend_reads_the_url_list(monkeypatch):
    monkeypatch.setenv("THROTTLLEM_NODE_GPU_BACKEND", "twin")
    monkeypatch.setenv("THROTTLLEM_NODE_TWIN_URLS", "http://127.0.0.1:1, http://127.0.0.1:2")
    assert load_node_settings().twin_url_list == ("http://127.0.0.1:1", "http://127.0.0.1:2")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GPU_BACKEND": "cuda"}, "THROTTLLEM_NODE_GPU_BACKEND='cuda': must be 'nvml' or 'twin'"),
        ({"GPU_BACKEND": "twin"}, "THROTTLLEM_NODE_TWIN_URLS: must be set"),
        ({"TWIN_URLS": "localhost:8000"}, "THROTTLLEM_NODE_TWIN_URLS='localhost:8000': must be http"),
        ({"LEASE_TTL_S": "0"}, "THROTTLLEM_NODE_LEASE_TTL_S='0'"),
        (
            {"LEASE_TTL_S": "20"},
            "THROTTLLEM_NODE_IDLE_TIMEOUT_S=10.0: must exceed THROTTLLEM_NODE_LEASE_TTL_S",
        ),
        ({"POD_CHECK": "trust"}, "THROTTLLEM_NODE_POD_CHECK='trust'"),
        ({"MAX_CONNECTIONS": "0"}, "THROTTLLEM_NODE_MAX_CONNECTIONS='0'"),
        ({"LOG_LEVEL": "LOUD"}, "THROTTLLEM_NODE_LOG_LEVEL='LOUD'"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(f"{NODE_PREFIX}{key}", value)
    with pytest.raises(ConfigError) as caught:
        load_node_settings()
    assert message in str(caught.value)


def test_a_bad_flag_is_named_as_the_flag():
    with pytest.raises(ConfigError, match="--lease-ttl-s=-1"):
        load_node_settings({"lease_ttl_s": -1})


def test_help_lists_every_variable(capsys):
    with pytest.raises(SystemExit):
        main(["node", "--help"])
    out = capsys.readouterr().out
    for field in NodeSettings.model_fields:
        assert f"{NODE_PREFIX}{field.upper()}" in out


def test_a_bad_setting_stops_the_command_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("THROTTLLEM_NODE_GPU_BACKEND", "twin")
    assert main(["node"]) == 1
    assert "THROTTLLEM_NODE_TWIN_URLS: must be set" in capsys.readouterr().err


def test_status_prints_the_running_agents_leases(capsys):
    async def scenario():
        async with running_agent(1) as harness:
            client, _ = await leased(harness.path)
            code = await asyncio.to_thread(main, ["node", "--status", "--socket", str(harness.path)])
            client.close()
            return code

    assert asyncio.run(scenario()) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ok"] and status["gpus"][0]["uuid"] == "GPU-0000-0000" and len(status["leases"]) == 1


def test_status_without_an_agent_says_so(capsys):
    assert main(["node", "--status", "--socket", "/nonexistent/node.sock"]) == 1
    assert "no node agent answered on /nonexistent/node.sock" in capsys.readouterr().err
