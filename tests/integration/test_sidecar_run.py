"""`throttllem run` as a real process: it finds its engine, serves /metrics, and on SIGTERM resets the
GPU's clocks and exits 0. The engine (trtllm-serve iteration stats) and the twin GPU endpoint are
small servers this test runs on loopback."""

import asyncio
import json
import os
import signal
import sys
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.sidecar_fakes import FakeTrtllmServe
from tests.unit.test_gpus_twin import FakeTwinGpu, serve

START_TIMEOUT_S = 60.0  # the CLI imports a lot; a loaded CI machine needs the margin
STOP_TIMEOUT_S = 20.0


@asynccontextmanager
async def engine():
    fake = FakeTrtllmServe()
    app = web.Application()
    app.router.add_get("/metrics", fake.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield fake, f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    finally:
        await runner.cleanup()


def sidecar_env(metrics_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THROTTLLEM_", "OTEL_"))}
    env.update(
        THROTTLLEM_ENGINE="trtllm-serve",
        THROTTLLEM_ENGINE_METRICS_URL=metrics_url,
        THROTTLLEM_SIDECAR_HOST="127.0.0.1",
        THROTTLLEM_SIDECAR_PORT="0",
        THROTTLLEM_GATEWAY_PORT="0",
        THROTTLLEM_POLL_INTERVAL_MS="20",
        THROTTLLEM_POLICY="static:1050",
    )
    env.update({f"THROTTLLEM_{key.upper()}": value for key, value in settings.items()})
    return env


async def start(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, dict]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        listening = json.loads(line)
    except (TimeoutError, json.JSONDecodeError):
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"no listening line; stderr:\n{err.decode()}") from None
    assert listening["event"] == "listening" and listening["gateway_port"] is None
    return proc, listening


async def stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), STOP_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    return err.decode()


async def scrape(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return {
        sample.name + "".join(f"{{{v}}}" for v in sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def until_scraped(port: int, condition, timeout_s: float = 15.0) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        values = await scrape(port)
        if condition(values):
            return values
        assert loop.time() < deadline, f"metrics never matched: {values}"
        await asyncio.sleep(0.05)


def test_dry_run_sidecar_serves_metrics_and_stops_cleanly():
    async def scenario():
        async with engine() as (fake, url):
            proc, listening = await start(sidecar_env(url, actuator="dryrun"))
            try:
                values = await until_scraped(
                    listening["sidecar_port"], lambda v: v.get("throttllem_sm_clock_mhz") == 1050
                )
            finally:
                err = await stop(proc)
        assert fake.polls > 0
        assert values["throttllem_clock_locked"] == 1
        assert values["throttllem_actuator_mode{observing}"] == 1  # dry-run: recorded, never set
        assert values["throttllem_loop_mode{controlling}"] == 1
        assert values["throttllem_measured_ips"] == 50.0
        assert values["throttllem_telemetry_stale"] == 0
        assert "Traceback" not in err

    asyncio.run(scenario())


def test_twin_actuator_lock_is_reset_after_sigterm():
    async def scenario():
        gpu = FakeTwinGpu()
        runner, twin_url = await serve(gpu)
        try:
            async with engine() as (_, url):
                env = sidecar_env(url, actuator="twin", meter="twin", twin_url=twin_url)
                proc, listening = await start(env)
                try:
                    values = await until_scraped(
                        listening["sidecar_port"],
                        lambda v: (
                            v.get("throttllem_sm_clock_mhz") == 1050 and "throttllem_energy_joules_total" in v
                        ),
                    )
                    assert gpu.locked == 1050
                finally:
                    await stop(proc)
        finally:
            await runner.cleanup()
        return gpu, values

    gpu, values = asyncio.run(scenario())
    assert values["throttllem_actuator_mode{actuating}"] == 1
    assert values["throttllem_energy_joules_total"] > 0
    kinds = [kind for kind, _ in gpu.requests]
    assert kinds[0] == "DELETE"  # a lock left by a previous run is cleared before the first decision
    assert ("POST", {"min_mhz": 1050, "max_mhz": 1050}) in gpu.requests
    assert kinds[-1] == "DELETE" and gpu.locked is None  # and the lock does not outlive the sidecar
