"""Child processes for demos, benches and tests: started, announced, failed readably, always stopped."""

import argparse
import asyncio
import dataclasses
import os
import signal

import pytest

from agent.bench.processes import (
    ENGINES,
    LoadSpec,
    ProcessGroup,
    ProcessStartError,
    SidecarSpec,
    Twin,
    cancel_on_sigterm,
    child_env,
    load_args,
    setup_args,
    sidecar_env,
    start_twin,
)
from agent.catalog import gpu_spec, model_spec
from agent.cli import build_parser
from agent.cli.common import add_setup_args, setup_from_args
from agent.cli.load import served_name
from agent.twin.memory import EngineConfig, SchedulerPolicy
from agent.twin.setup import TwinSetup

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))


def test_setup_args_describe_the_same_twin():
    setup = TwinSetup(
        gpu_spec("a100-sxm4-40gb"),
        model_spec("llama2-13b"),
        tp=2,
        engine=EngineConfig(
            max_batch_size=64,
            max_num_tokens=4096,
            tokens_per_block=32,
            scheduler=SchedulerPolicy("max_utilization"),
            chunked_context=True,
        ),
        clock_change_delay_s=0.0125,
        noise=0.02,
        seed=7,
    )
    parser = argparse.ArgumentParser()
    add_setup_args(parser)
    assert setup_from_args(parser.parse_args(setup_args(setup))) == setup


def test_child_env_drops_our_settings_and_keeps_otel_only_when_asked(monkeypatch):
    monkeypatch.setenv("THROTTLLEM_POLICY", "static:900")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    inherited = child_env({"THROTTLLEM_SLO": "paper"})
    assert "THROTTLLEM_POLICY" not in inherited and inherited["THROTTLLEM_SLO"] == "paper"
    assert inherited["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert inherited["PATH"] == os.environ["PATH"]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in child_env({}, inherit_otel=False)


def test_sidecar_env_points_the_sidecar_at_the_twin(tmp_path):
    twin = Twin(None, "http://127.0.0.1:1234", "http://127.0.0.1:5678/metrics")  # type: ignore[arg-type]
    spec = SidecarSpec(models_dir=tmp_path, settings={"poll_interval_ms": "50"}, env={"OTEL_X": "1"})
    env = sidecar_env(spec, twin, SETUP, 4321)
    assert env["THROTTLLEM_ENGINE"] == "triton"
    assert env["THROTTLLEM_ENGINE_METRICS_URL"] == "http://127.0.0.1:5678/metrics"
    assert env["THROTTLLEM_TWIN_URL"] == env["THROTTLLEM_ENGINE_URL"] == "http://127.0.0.1:1234"
    assert (env["THROTTLLEM_ACTUATOR"], env["THROTTLLEM_POLICY"], env["THROTTLLEM_GATEWAY_PORT"]) == (
        "twin",
        "throttllem",
        "4321",
    )
    assert env["THROTTLLEM_POLL_INTERVAL_MS"] == "50" and env["OTEL_X"] == "1"
    assert env["THROTTLLEM_MODELS_DIR"] == str(tmp_path.resolve())


def test_load_args_parse_as_the_load_command():
    spec = LoadSpec(
        url="http://127.0.0.1:9", start_s=600.0, duration_s=12.5, rate_scale=0.61, max_tokens=2048
    )
    args = build_parser().parse_args(load_args(spec))
    assert (args.command, args.events, args.url, args.trace) == ("load", True, spec.url, "azure-conv")
    assert (args.start, args.duration, args.rate_scale, args.max_tokens) == (600.0, 12.5, 0.61, 2048)
    assert (args.api, args.model, args.model_name, args.energy_url) == ("triton", "llama3-8b", None, None)
    assert served_name(args) == "ensemble"
    assert "--max-tokens" not in load_args(dataclasses.replace(spec, max_tokens=None))
    openai = dataclasses.replace(spec, api="openai-chat", model="llama2-13b", energy_url="http://127.0.0.1:8")
    args = build_parser().parse_args(load_args(openai))
    assert (args.api, args.model, args.energy_url) == ("openai-chat", "llama2-13b", "http://127.0.0.1:8")
    assert served_name(args) == "llama2-13b"  # the catalog name, as `twin serve --api vllm` serves it
    named = build_parser().parse_args(load_args(dataclasses.replace(openai, model_name="served")))
    assert served_name(named) == "served"


def test_the_sidecar_reads_the_engine_the_twin_emulates(tmp_path):
    twin = Twin(None, "http://127.0.0.1:1234", "http://127.0.0.1:1234/metrics", "vllm", "llama3-8b")  # type: ignore[arg-type]
    env = sidecar_env(SidecarSpec(models_dir=tmp_path), twin, SETUP, 4321)
    assert env["THROTTLLEM_ENGINE"] == "vllm"
    assert env["THROTTLLEM_ENGINE_METRICS_URL"] == "http://127.0.0.1:1234/metrics"
    forced = sidecar_env(SidecarSpec(models_dir=tmp_path, engine="trtllm-serve"), twin, SETUP, 4321)
    assert forced["THROTTLLEM_ENGINE"] == "trtllm-serve"
    assert ENGINES == ("triton", "trtllm-serve", "vllm")
    with pytest.raises(ValueError, match="api must be one of"):
        asyncio.run(start_twin(ProcessGroup(tmp_path), SETUP, api="sglang"))


def test_a_child_that_fails_on_start_is_one_error_quoting_its_log(tmp_path):
    async def scenario():
        async with ProcessGroup(tmp_path) as group:
            with pytest.raises(ProcessStartError) as failed:
                await group.start("twin", ["twin", "serve", "--http-port", "70000"])
            with pytest.raises(ProcessStartError) as chatty:
                await group.start("gpus", ["twin", "gpus", "--json"])
            return str(failed.value), str(chatty.value), group.children

    failed, chatty, children = asyncio.run(scenario())
    assert failed.startswith("twin exited with code 1 on start;")
    assert "http_port must be 0..65535" in failed and str(tmp_path / "twin.log") in failed
    assert "\n" not in failed
    assert chatty.startswith("gpus printed") and "instead of its listening line" in chatty
    assert all(not child.running for child in children)


def test_a_started_twin_announces_its_ports_and_is_stopped_on_exit(tmp_path):
    async def scenario():
        async with ProcessGroup(tmp_path) as group:
            twin = await start_twin(group, SETUP, time_scale=10.0)
            assert twin.child.running and twin.child.announced["time_scale"] == 10.0
            assert twin.metrics_url.endswith("/metrics") and twin.gpu_url.endswith("/twin/v1/gpu")
        return twin

    twin = asyncio.run(scenario())
    assert not twin.child.running and twin.child.process.returncode == 0  # SIGTERM: a clean exit


def test_sigterm_cancels_the_work_and_its_children_are_stopped(tmp_path):
    started = []

    async def work():
        async with ProcessGroup(tmp_path) as group:
            started.append(await start_twin(group, SETUP))
            os.kill(os.getpid(), signal.SIGTERM)  # as a supervisor would
            await asyncio.sleep(60)

    async def scenario():
        with pytest.raises(asyncio.CancelledError):
            await cancel_on_sigterm(work())

    asyncio.run(scenario())
    (twin,) = started
    assert not twin.child.running and twin.child.process.returncode == 0
