"""The sidecar port (/healthz, /readyz, /metrics) and the admin API, over real HTTP on loopback."""

import asyncio

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from agent.engines.base import EngineUnavailableError
from agent.sidecar.energy import EnergySampler
from agent.sidecar.http_api import build_admin_app, build_sidecar_app
from agent.sidecar.metrics import SidecarMetrics
from tests.unit.sidecar_fakes import FakeAdapter, ScriptedPolicy, rig, stats

FAMILIES = {
    "throttllem_sm_clock_mhz",
    "throttllem_clock_locked",
    "throttllem_predicted_ips",
    "throttllem_measured_ips",
    "throttllem_min_slack_seconds",
    "throttllem_requests_arrived",
    "throttllem_requests_admitted",
    "throttllem_requests_held",
    "throttllem_requests_rejected",
    "throttllem_requests_completed",
    "throttllem_decision_seconds",
    "throttllem_energy_joules",
    "throttllem_tokens_per_joule",
    "throttllem_clock_changes",
    "throttllem_loop_restarts",
    "throttllem_telemetry_stale",
    "throttllem_engine_restarts",
    "throttllem_sidecar_info",
}


class FixedMeter:
    name = "fixed"

    async def energy_j(self) -> float:
        return 2000.0

    async def power_w(self) -> float:
        return 250.0

    async def close(self) -> None:
        pass


def sidecar(r, tokens=None):
    energy = EnergySampler(FixedMeter())
    metrics = SidecarMetrics(r.loop, r.tracker, energy, {"engine": "triton"}, lambda: tokens)
    r.loop.add_observer(metrics.observe)
    return build_sidecar_app(r.loop, metrics), energy


def samples(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_readyz_flips_with_telemetry_and_metrics_parse():
    async def scenario():
        r = rig(ScriptedPolicy([1050]), stale_after_s=2.0)
        app, energy = sidecar(r, tokens=5000)
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/healthz")).status == 200
            await r.loop.start()
            response = await client.get("/readyz")
            assert response.status == 503 and (await response.json())["mode"] == "starting"
            await r.loop.tick()
            assert (await client.get("/readyz")).status == 200  # metrics read; no iteration yet is fine
            r.adapter.queue.append(EngineUnavailableError("refused"))
            r.clock.now += 3
            await r.loop.tick()
            body = await (await client.get("/readyz")).json()
            assert body["ready"] is False and body["mode"] == "stale"
            assert any("telemetry stale" in reason for reason in body["not_ready"])

            r.adapter.healthy = True
            r.adapter.queue.append(stats(1))
            await r.loop.tick()
            await energy.sample()
            response = await client.get("/readyz")
            assert response.status == 200 and (await response.json())["mode"] == "controlling"

            response = await client.get("/metrics")
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        families = {f.name for f in text_string_to_metric_families(text)}
        assert families >= FAMILIES
        values = samples(text)
        assert values["throttllem_sm_clock_mhz"] == 1050 and values["throttllem_clock_locked"] == 1
        assert values["throttllem_clock_changes_total"] == 3  # lock, reset when stale, lock again
        assert values["throttllem_measured_ips"] == 50.0
        assert values["throttllem_decision_seconds_count"] == 2
        assert values["throttllem_energy_joules_total"] == 2000.0
        assert values["throttllem_tokens_per_joule"] == 2.5
        assert values["throttllem_telemetry_stale"] == 0
        assert values["throttllem_telemetry_stale_episodes_total"] == 1
        (info,) = [
            s for f in text_string_to_metric_families(text) for s in f.samples if s.name.endswith("_info")
        ]
        assert info.labels == {"engine": "triton", "policy": "scripted", "actuator": "fake:GPU-0"}
        mode = {
            s.labels["throttllem_loop_mode"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "throttllem_loop_mode"
        }
        assert mode["controlling"] == 1 and mode["stale"] == 0

    asyncio.run(scenario())


def test_unknown_values_are_left_out_not_zero():
    async def scenario():
        r = rig(ScriptedPolicy([None]))
        app, _ = sidecar(r)
        async with TestClient(TestServer(app)) as client:
            text = await (await client.get("/metrics")).text()
        values = samples(text)
        assert "throttllem_predicted_ips" not in values and "throttllem_energy_joules_total" not in values
        assert values["throttllem_sm_clock_mhz"] == 1410 and values["throttllem_clock_locked"] == 0

    asyncio.run(scenario())


def test_admin_switches_policy_and_refuses_bad_specs():
    async def scenario():
        r = rig(ScriptedPolicy([None]))

        def check(spec: str) -> None:
            if not spec.startswith("static:"):
                raise ValueError(f"unknown policy {spec!r}")

        await r.loop.start()
        r.adapter.queue.append(stats(1))
        await r.loop.tick()
        async with TestClient(TestServer(build_admin_app(r.loop, check))) as client:
            bad = await client.post("/admin/policy", json={"policy": "turbo"})
            assert bad.status == 400 and "unknown policy" in (await bad.json())["error"]
            assert (await client.post("/admin/policy", data=b"nope")).status == 400
            ok = await client.post("/admin/policy", json={"policy": "static:1200"})
            assert ok.status == 202
            await r.loop.tick()
            state = await (await client.get("/admin/state")).json()
        assert r.actuator.calls[-1] == ("set", 1200)
        assert state["loop"]["policy"] == "static:1200" and state["loop"]["locked_mhz"] == 1200
        assert state["last_decision"]["sm_clock_mhz"] == 1200

    asyncio.run(scenario())


class HangingAdapter(FakeAdapter):
    """Answers what was queued until `hang` is set; from then on a poll never returns."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = asyncio.Event()

    async def poll(self):
        if self.hang.is_set():
            await asyncio.Event().wait()
        return await super().poll()


def test_readyz_turns_503_once_the_bound_passes_in_a_hung_tick():
    async def scenario():
        r = rig(ScriptedPolicy([1050]), stale_after_s=2.0)
        r.loop.adapter = HangingAdapter()
        app, _ = sidecar(r)
        async with TestClient(TestServer(app)) as client:
            await r.loop.start()
            r.loop.adapter.queue.append(stats(1))
            await r.loop.tick()
            assert (await client.get("/readyz")).status == 200
            r.loop.adapter.hang.set()
            tick = asyncio.create_task(r.loop.tick())
            await asyncio.sleep(0.01)
            r.clock.now += 1.5
            assert (await client.get("/readyz")).status == 200  # within the bound
            r.clock.now += 1.0
            response = await client.get("/readyz")
            body = await response.json()
            assert not tick.done()  # still stuck in the poll: nothing but the clock has moved
            tick.cancel()
        assert response.status == 503 and body["ready"] is False
        assert any("telemetry stale" in reason for reason in body["not_ready"]), body

    asyncio.run(scenario())


def test_readyz_is_not_ready_while_starting_without_a_policy():
    async def scenario():
        r = rig(ScriptedPolicy([900]), spec="throttllem")  # needs the engine's limits to be built
        app, _ = sidecar(r)
        async with TestClient(TestServer(app)) as client:
            await r.loop.start()
            await r.loop.tick()  # metrics readable and fresh, but no iteration yet: no policy
            starting = await client.get("/readyz")
            starting_body = await starting.json()
            r.adapter.queue.append(stats(1))
            await r.loop.tick()
            ready = await client.get("/readyz")
        assert starting.status == 503 and starting_body["mode"] == "starting"
        assert any("no policy" in reason for reason in starting_body["not_ready"]), starting_body
        assert ready.status == 200

    asyncio.run(scenario())
