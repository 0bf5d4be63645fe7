"""The whole sidecar in-process: built from Settings, serving its ports, stopping with clocks reset."""

import asyncio
import os
import socket
import time

import aiohttp
import pytest
from aiohttp import web

from agent.config import Settings
from agent.sidecar.app import HARD_EXIT_CODE, HardExitBackstop, serve
from tests.unit.sidecar_fakes import FakeTrtllmServe
from tests.unit.test_gpus_twin import FakeTwinGpu
from tests.unit.test_gpus_twin import serve as serve_twin

COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "model": "m",
    "choices": [{"index": 0, "text": " one two three", "finish_reason": "length"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_engine() -> tuple[web.AppRunner, str]:
    stats = FakeTrtllmServe()

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(COMPLETION)

    async def ready(_: web.Request) -> web.Response:
        return web.Response(text="ready")

    app = web.Application()
    app.router.add_get("/metrics", stats.metrics)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v2/health/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def settings(engine_url: str, twin_url: str, **extra) -> Settings:
    return Settings(
        engine="trtllm-serve",
        engine_metrics_url=f"{engine_url}/metrics",
        engine_url=engine_url,
        sidecar_host="127.0.0.1",
        sidecar_port=0,
        actuator="twin",
        twin_url=twin_url,
        policy="static:1050",
        poll_interval_ms=20,
        **extra,
    )


async def until(condition, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_admin_api_switches_policy_and_stop_resets_the_clock():
    async def scenario():
        gpu = FakeTwinGpu()
        twin, twin_url = await serve_twin(gpu)
        engine, engine_url = await start_engine()
        stop, announced = asyncio.Event(), asyncio.Queue()
        task = asyncio.create_task(
            serve(
                settings(engine_url, twin_url, admin_enabled=True, admin_port=0), stop, announced.put_nowait
            )
        )
        ports = await asyncio.wait_for(announced.get(), 10)
        assert ports["gateway_port"] is None and ports["admin_port"]
        admin = f"http://127.0.0.1:{ports['admin_port']}/admin"

        async def locked_at(mhz):
            return gpu.locked == mhz

        async with aiohttp.ClientSession() as session:
            await until(lambda: locked_at(1050))
            async with session.post(f"{admin}/policy", json={"policy": "static:1700"}) as resp:
                assert resp.status == 400 and "not a supported clock" in (await resp.json())["error"]
            async with session.post(f"{admin}/policy", json={"policy": "throttllem"}) as resp:
                assert resp.status == 400 and "needs the gateway" in (await resp.json())["error"]
            async with session.post(f"{admin}/policy", json={"policy": "static:900"}) as resp:
                assert resp.status == 202
            await until(lambda: locked_at(900))
            async with session.get(f"{admin}/state") as resp:
                state = await resp.json()
            assert state["loop"]["policy"] == "static:900" and state["loop"]["mode"] == "controlling"
        stop.set()
        await asyncio.wait_for(task, 10)
        await engine.cleanup()
        await twin.cleanup()
        return gpu

    gpu = asyncio.run(scenario())
    assert gpu.requests[-1] == ("DELETE", None) and gpu.locked is None


def test_gateway_serves_through_the_sidecar_and_feeds_the_tracker():
    pytest.importorskip("agent.sidecar.gateway")

    async def scenario():
        gpu = FakeTwinGpu()
        twin, twin_url = await serve_twin(gpu)
        engine, engine_url = await start_engine()
        stop, announced = asyncio.Event(), asyncio.Queue()
        config = settings(
            engine_url,
            twin_url,
            gateway_host="127.0.0.1",
            gateway_port=free_port(),
            admin_enabled=True,
            admin_port=0,
            meter="twin",
            energy_tenant_header="X-Tenant",
        )
        task = asyncio.create_task(serve(config, stop, announced.put_nowait))
        ports = await asyncio.wait_for(announced.get(), 10)
        gateway = f"http://127.0.0.1:{ports['gateway_port']}"
        sidecar = f"http://127.0.0.1:{ports['sidecar_port']}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway}/v2/health/ready") as resp:
                assert resp.status == 200 and await resp.text() == "ready"
            body = {"model": "m", "prompt": "hello there", "max_tokens": 3}
            async with session.post(
                f"{gateway}/v1/completions", json=body, headers={"X-Tenant": "acme"}
            ) as resp:
                assert resp.status == 200 and (await resp.json())["choices"][0]["text"] == " one two three"
                request_id = resp.headers["X-Throttllem-Request-Id"]

            async def final() -> bool:  # at the sampler's next reading (once a second)
                async with session.get(f"{sidecar}/v1/requests/{request_id}/energy") as resp:
                    energy.update(await resp.json())
                return energy["final"]

            energy: dict = {}
            await until(final)
            async with session.get(f"http://127.0.0.1:{ports['admin_port']}/admin/state") as resp:
                requests = (await resp.json())["requests"]
            async with session.get(f"{sidecar}/metrics") as resp:
                metrics = await resp.text()
        stop.set()
        await asyncio.wait_for(task, 15)
        await engine.cleanup()
        await twin.cleanup()
        return requests, metrics, gpu, energy

    requests, metrics, gpu, energy = asyncio.run(scenario())
    assert requests["admitted"] == 1 and requests["completed"] == 1 and requests["held"] == 0
    assert "throttllem_requests_completed_total 1.0" in metrics
    assert energy["tokens"] == 3 + 3 and energy["energy_j"] > 0  # prompt ~11 chars / 4, then 3 output
    assert f'throttllem_request_energy_joules_sum{{model="m",tenant="acme"}} {energy["energy_j"]}' in metrics
    assert gpu.locked is None


def test_backstop_exits_hard_only_when_cleanup_hangs(monkeypatch):
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    finished = HardExitBackstop(0.05)
    finished.arm()
    finished.cancel()
    hung = HardExitBackstop(0.05)
    hung.arm()
    time.sleep(0.3)
    assert exits == [HARD_EXIT_CODE]


def test_a_sidecar_that_cannot_bind_its_port_never_touches_the_gpu_the_running_one_steers():
    async def scenario():
        gpu = FakeTwinGpu()
        twin, twin_url = await serve_twin(gpu)
        engine, engine_url = await start_engine()
        stop, announced = asyncio.Event(), asyncio.Queue()
        first = asyncio.create_task(serve(settings(engine_url, twin_url), stop, announced.put_nowait))
        ports = await asyncio.wait_for(announced.get(), 10)

        async def locked():
            return gpu.locked == 1050

        await until(locked)
        seen = list(gpu.requests)
        second = settings(engine_url, twin_url).model_copy(
            update={"sidecar_port": ports["sidecar_port"], "policy": "static:900"}
        )
        with pytest.raises(
            OSError, match=f"THROTTLLEM_SIDECAR_PORT: cannot listen on 127.0.0.1:{ports['sidecar_port']}"
        ):
            await serve(second, asyncio.Event(), announced.put_nowait)
        await asyncio.sleep(0.1)
        touched = gpu.requests[len(seen) :]
        still = gpu.locked
        stop.set()
        await asyncio.wait_for(first, 10)
        await engine.cleanup()
        await twin.cleanup()
        return touched, still

    touched, still = asyncio.run(scenario())
    assert touched == [] and still == 1050, "the second sidecar reset or re-locked the first one's GPU"


def test_a_failed_reset_on_the_way_out_is_reported_and_exits_non_zero(monkeypatch, caplog):
    from agent.sidecar import app

    class UnresettableGpu(FakeTwinGpu):
        refuse = False  # once the sidecar runs: its start-up reset succeeds, its last one fails

        async def delete(self, request):
            if not self.refuse:
                return await super().delete(request)
            self.requests.append(("DELETE", None))
            return web.json_response({"error": "NVML_ERROR_UNKNOWN"}, status=500)

    async def scenario():
        gpu = UnresettableGpu()
        twin, twin_url = await serve_twin(gpu)
        engine, engine_url = await start_engine()
        stop, announced = asyncio.Event(), asyncio.Queue()
        task = asyncio.create_task(serve(settings(engine_url, twin_url), stop, announced.put_nowait))
        await asyncio.wait_for(announced.get(), 10)
        await until(lambda: locked(gpu))
        gpu.refuse = True
        stop.set()
        error = await asyncio.wait_for(task, 10)
        await engine.cleanup()
        await twin.cleanup()
        return error

    async def locked(gpu):
        return gpu.locked == 1050

    error = asyncio.run(scenario())
    assert error is not None and "500" in error, "serve says the reset failed"

    async def failed_reset(*_args, **_kwargs):
        return error

    monkeypatch.setattr(app, "serve", failed_reset)
    config = settings("http://127.0.0.1:1", "http://127.0.0.1:1", gpu_uuids="GPU-1")
    with caplog.at_level("CRITICAL"):
        assert app.run_sidecar(config) == app.LEFT_LOCKED_EXIT_CODE != 0
    assert "GPU-1" in caplog.text and "nvidia-smi -rgc" in caplog.text
