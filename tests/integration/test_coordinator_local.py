"""The coordinator live on the local backend: real `twin serve` + `run` processes per size behind a router.

A burst drives the pool from tp1 to tp2 and the quiet after it back to tp1. Every request is
answered exactly once across both switches, traffic moves only to an engine that is up, and
each engine left behind drains and stops.
"""

import asyncio
import time
from dataclasses import replace

import numpy as np
from aiohttp import web

from agent.bench.local_backend import LocalBackend
from agent.bench.processes import ProcessGroup, SidecarSpec
from agent.bench.router import Router
from agent.catalog import gpu_spec, model_spec
from agent.control.scaling import ScalingConfig
from agent.coordinator.service import Coordinator
from agent.domain import Request
from agent.twin.setup import TwinSetup
from agent.workloads.loadgen import generate_load

BASE = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
SETUPS = {tp: replace(BASE, tp=tp) for tp in (1, 2)}
# Capacities small enough for a few requests per second to need tp2; grace short for a short test.
SCALING = ScalingConfig(((1, 4.0), (2, 50.0)), headroom=0.8, grace_s=4.0, shadow_timeout_s=90.0)
PERIOD_S = 2.0  # the rate of a quiet 0.3 req/s stays far below tp1's 3.2 over it


def phases(*spans: tuple[float, float], seed: int = 0) -> list[Request]:
    """Poisson arrivals at (rate, seconds) phase after phase; short prompts and answers."""
    rng = np.random.default_rng(seed)
    out, start = [], 0.0
    for rate, seconds in spans:
        t = start + rng.exponential(1 / rate)
        while t < start + seconds:
            out.append(Request(len(out), t, 64, 16, 16))
            t += rng.exponential(1 / rate)
        start += seconds
    return out


def test_a_burst_resizes_tp1_to_tp2_and_back_with_every_request_answered_once(tmp_path):
    requests = phases((0.3, 4.0), (8.0, 24.0), (0.3, 30.0))

    async def scenario():
        router = Router()
        runner = web.AppRunner(router.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with ProcessGroup(tmp_path) as group:
                backend = LocalBackend(group, SETUPS, SidecarSpec(policy="max", inherit_otel=False), router)
                coordinator = Coordinator(
                    backend, SCALING, initial_size=1, drain_timeout_s=60.0, min_drain_s=PERIOD_S
                )
                await coordinator.start()
                while backend.routed is None:  # the first engine comes up before load starts
                    await asyncio.sleep(PERIOD_S)
                    await coordinator.tick()

                async def drive() -> None:
                    while True:
                        await asyncio.sleep(PERIOD_S)
                        await coordinator.tick()

                driver = asyncio.create_task(drive())
                began = time.monotonic()
                report = await generate_load(url, "ensemble", requests, max_retries=0)
                settle = time.monotonic() + 60.0
                while (backend.routed != 1 or len(backend.engines) != 1) and time.monotonic() < settle:
                    await asyncio.sleep(PERIOD_S)
                driver.cancel()
                await backend.close()
                return report, coordinator.record.actions, router.relayed, began
        finally:
            await runner.cleanup()

    report, actions, relayed, began = asyncio.run(scenario())
    timeline = [(round(t - began, 1), a.kind, a.size) for t, a in actions]
    print("actions (s after load began):", timeline)
    answered = [r for r in report.results if r.answered]
    assert len(answered) == len(requests), [r.error for r in report.results if not r.answered]
    assert all(r.output_tokens == 16 and r.retries == 0 for r in answered), "each answered in full, once"
    assert relayed == len(requests), "no request relayed twice or lost"
    kinds = [(a.kind, a.size) for _, a in actions]
    assert kinds[:2] == [("start", 1), ("route", 1)]
    up = kinds.index(("route", 2))
    assert kinds.index(("start", 2)) < up and ("stop", 1) in kinds[up:]
    assert kinds[up + 1 :] == [("stop", 1), ("start", 1), ("route", 1), ("stop", 2)], timeline
