"""Shared adapter machinery: factory, URLs, iteration tracking, health, Prometheus helpers."""

import asyncio
import logging
import socket

import aiohttp
import pytest

from agent.engines import build_adapter
from agent.engines.base import (
    EngineConfigError,
    EngineUnavailableError,
    HealthTracker,
    IterationChange,
    IterationTracker,
    MalformedMetricsError,
)
from agent.engines.http import metrics_url
from agent.engines.prometheus_text import count, parse_samples, select, value, values_by_label
from agent.engines.triton_trtllm import TritonTrtllmAdapter
from agent.engines.trtllm_serve import TrtllmServeAdapter
from agent.engines.vllm import VllmAdapter
from tests.unit.engine_server import FakeClock, MetricsServer


def test_build_adapter_kinds_and_options():
    triton = build_adapter("triton", "http://localhost:8002", model="tensorrt_llm", version="1")
    assert isinstance(triton, TritonTrtllmAdapter)
    assert (triton.url, triton.model, triton.version) == (
        "http://localhost:8002/metrics",
        "tensorrt_llm",
        "1",
    )
    assert isinstance(build_adapter("trtllm-serve", "http://h:8000/"), TrtllmServeAdapter)
    vllm = build_adapter("vllm", "http://h:8000/custom/metrics", kv_blocks_max=100, timeout_s=0.5)
    assert isinstance(vllm, VllmAdapter)
    assert (vllm.url, vllm.kv_blocks_max, vllm.timeout_s) == ("http://h:8000/custom/metrics", 100, 0.5)
    assert vllm.name == "vllm http://h:8000/custom/metrics"


def test_build_adapter_unknown_kind_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="'sglang'; choose one of: triton, trtllm-serve, vllm"):
        build_adapter("sglang", "http://h:30000")


@pytest.mark.parametrize("url", ["localhost:8002", "/metrics", ""])
def test_urls_need_scheme_and_host(url):
    with pytest.raises(ValueError, match="http://host:port"):
        metrics_url(url)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        TritonTrtllmAdapter("http://h:8002", timeout_s=0)
    with pytest.raises(ValueError, match="kv_blocks_max"):
        VllmAdapter("http://h:8000", kv_blocks_max=0)


def test_iteration_tracker():
    tracker = IterationTracker()
    assert tracker.observe(5, 1.0) is IterationChange.NEW
    assert tracker.observe(5, 1.0) is IterationChange.SAME
    assert tracker.observe(9, 2.0) is IterationChange.NEW
    assert tracker.observe(2, 3.0) is IterationChange.RESTART
    assert tracker.observe(2, 4.0) is IterationChange.RESTART  # same counter, another engine time
    assert tracker.observe(2) is IterationChange.SAME  # no marker: the counter alone decides
    assert tracker.restarts == 2


def test_health_tracker_logs_a_lasting_failure_once(caplog):
    clock = FakeClock()
    health = HealthTracker("engine", logging.getLogger("test.health"), clock)
    assert not health.snapshot(0).healthy  # never succeeded yet
    with caplog.at_level(logging.DEBUG, logger="test.health"):
        health.succeeded(new_stats=True)
        for _ in range(3):
            clock.advance(1)
            health.failed(EngineUnavailableError("down"))
        health.failed(MalformedMetricsError("garbage"))
        clock.advance(1)
        health.succeeded(new_stats=False)
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert levels == [
        ("WARNING", "engine: down"),
        ("DEBUG", "engine: down"),
        ("DEBUG", "engine: down"),
        ("WARNING", "engine: garbage"),
        ("INFO", "engine: engine metrics readable again after 4 failed polls"),
    ]
    snapshot = health.snapshot(restarts=3)
    assert snapshot.healthy and snapshot.restarts == 3
    assert (snapshot.last_success_s, snapshot.last_new_stats_s) == (104, 100)
    assert str(snapshot.last_error) == "garbage"


def test_select_reports_present_choices():
    choices = {("a", "1"), ("b", "1")}
    assert select(choices, ("b", None), ("model", "version"), "src") == ("b", "1")
    with pytest.raises(EngineConfigError, match=r"2 series match.*set model and version"):
        select(choices, (None, None), ("model", "version"), "src")


def test_counter_samples_are_found_by_sample_name():
    text = '# HELP x_total X\n# TYPE x_total counter\nx_total{k="a"} 3.0\nx_total{k="b"} 1.027453e+06\n'
    samples = parse_samples(text)
    assert values_by_label(samples, "x_total", "k", {}) == {"a": 3.0, "b": 1027453.0}
    assert value(samples, "x_total", {"k": "b"}) == 1027453.0
    assert value(samples, "x_total", {"k": "c"}) is None


@pytest.mark.parametrize("raw", [float("nan"), float("inf"), -1.0])
def test_count_rejects_impossible_values(raw):
    with pytest.raises(MalformedMetricsError, match="not a count"):
        count(raw, "series")


def test_adapter_closes_only_the_session_it_made():
    async def scenario():
        server = MetricsServer()
        await server.start()
        await server.stop()  # nothing listens on this port any more
        adapter = TritonTrtllmAdapter(server.url)
        with pytest.raises(EngineUnavailableError, match="cannot reach"):
            await adapter.poll()
        own = adapter._session
        await adapter.close()
        async with aiohttp.ClientSession() as shared:
            await TritonTrtllmAdapter(server.url, session=shared).close()
            return own.closed, shared.closed

    assert asyncio.run(scenario()) == (True, False)


def test_an_unreachable_engine_is_logged_naming_the_variable_that_set_its_url(caplog):
    with socket.socket() as probe:  # a loopback port nothing listens on: refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario():
        adapter = TritonTrtllmAdapter(
            f"http://127.0.0.1:{port}/metrics", setting="THROTTLLEM_ENGINE_METRICS_URL"
        )
        with pytest.raises(EngineUnavailableError):
            await adapter.poll()
        await adapter.close()

    with caplog.at_level(logging.WARNING, logger="agent.engines.triton_trtllm"):
        asyncio.run(scenario())
    (warning,) = caplog.records
    assert "THROTTLLEM_ENGINE_METRICS_URL" in warning.getMessage()
    assert "cannot reach" in warning.getMessage()
