"""TwinActuator / TwinMeter against a small server implementing the twin GPU endpoint contract."""

import asyncio
import socket

import pytest
from aiohttp import web

from agent.gpus import (
    DryRunActuator,
    GpuControlError,
    TransientGpuError,
    TwinActuator,
    TwinMeter,
    UnsupportedClockError,
    build_actuator,
    build_meter,
)

UUID = "GPU-twin-0000"
CLOCKS = list(range(1410, 209, -15))


class FakeTwinGpu:
    """The contract: GET state, POST/DELETE locked_clocks; refuses clocks below `floor_mhz`."""

    def __init__(self) -> None:
        self.locked: int | None = None
        self.energy_j = 1000.0
        self.requests: list[tuple[str, object]] = []
        self.floor_mhz = 210
        self.malformed = False
        self.lock_reply_delay_s = 0.0  # a slow GPU endpoint: the lock lands, the answer is late

    def state(self) -> dict:
        self.energy_j += 2.5
        state = {
            "name": "NVIDIA A100-SXM4-80GB",
            "uuid": UUID,
            "supported_clocks_mhz": CLOCKS,
            "max_clock_mhz": 1410,
            "clock_mhz": self.locked or 1410,
            "locked_clock_mhz": self.locked,
            "power_w": 312.5,
            "energy_j": self.energy_j,
            "clock_changes": len([r for r in self.requests if r[0] == "POST"]),
        }
        if self.malformed:
            del state["supported_clocks_mhz"]
        return state

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def post(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("POST", body))
        if body["min_mhz"] < self.floor_mhz:
            return web.json_response({"error": f"{body['min_mhz']} MHz is below the floor"}, status=400)
        self.locked = body["max_mhz"]
        await asyncio.sleep(self.lock_reply_delay_s)
        return web.json_response(self.state())

    async def delete(self, request: web.Request) -> web.Response:
        self.requests.append(("DELETE", None))
        self.locked = None
        return web.json_response(self.state())


async def serve(fake: FakeTwinGpu) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/twin/v1/gpu", fake.get)
    app.router.add_post("/twin/v1/gpu/locked_clocks", fake.post)
    app.router.add_delete("/twin/v1/gpu/locked_clocks", fake.delete)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_actuator_locks_min_equals_max_skips_repeats_and_resets_on_close():
    fake = FakeTwinGpu()

    async def scenario():
        runner, url = await serve(fake)
        act = await TwinActuator.open(url)
        clocks = await act.supported_clocks_mhz()
        await act.set_clock_mhz(1050)
        await act.set_clock_mhz(1050)
        locked = await act.clock_mhz()
        await act.reset()
        stock = await act.clock_mhz()
        await act.set_clock_mhz(600)
        await act.close()
        await runner.cleanup()
        return act, clocks, locked, stock

    act, clocks, locked, stock = asyncio.run(scenario())
    assert clocks == tuple(CLOCKS) and act.name == f"twin:{UUID}" and act.actuates
    assert (locked, stock) == (1050, 1410)
    assert fake.requests == [
        ("POST", {"min_mhz": 1050, "max_mhz": 1050}),
        ("DELETE", None),
        ("POST", {"min_mhz": 600, "max_mhz": 600}),
        ("DELETE", None),
    ]
    assert fake.locked is None


def test_unsupported_clock_is_refused_before_any_request():
    fake = FakeTwinGpu()

    async def scenario():
        runner, url = await serve(fake)
        act = await TwinActuator.open(url)
        try:
            await act.set_clock_mhz(1049)
        finally:
            await act.close()
            await runner.cleanup()

    with pytest.raises(UnsupportedClockError, match="nearest supported: 1050 MHz"):
        asyncio.run(scenario())
    assert fake.requests == []


def test_refusal_by_the_twin_quotes_its_error():
    fake = FakeTwinGpu()
    fake.floor_mhz = 600

    async def scenario():
        runner, url = await serve(fake)
        act = await TwinActuator.open(url)
        try:
            await act.set_clock_mhz(450)
        finally:
            await act.close()
            await runner.cleanup()

    with pytest.raises(GpuControlError, match="HTTP 400: 450 MHz is below the floor"):
        asyncio.run(scenario())
    assert fake.requests == [("POST", {"min_mhz": 450, "max_mhz": 450})]  # no reset: nothing locked


def test_unreachable_endpoint_is_transient_and_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TransientGpuError, match=f"{url}/twin/v1/gpu is unreachable"):
        asyncio.run(TwinActuator.open(url))


def test_endpoint_that_goes_away_mid_run_is_transient():
    fake = FakeTwinGpu()

    async def scenario():
        runner, url = await serve(fake)
        act = await TwinActuator.open(url)
        await runner.cleanup()
        try:
            await act.set_clock_mhz(900)
        finally:
            await act.close()

    with pytest.raises(TransientGpuError, match="unreachable"):
        asyncio.run(scenario())


def test_malformed_state_names_the_missing_key():
    fake = FakeTwinGpu()
    fake.malformed = True

    async def scenario():
        runner, url = await serve(fake)
        try:
            await TwinActuator.open(url)
        finally:
            await runner.cleanup()

    with pytest.raises(GpuControlError, match=r"malformed state.*supported_clocks_mhz"):
        asyncio.run(scenario())


def test_meter_counts_from_open_and_survives_a_twin_restart():
    fake = FakeTwinGpu()

    async def scenario():
        runner, url = await serve(fake)
        meter = await TwinMeter.open(url)
        first = await meter.energy_j()
        fake.energy_j = 0.0  # the twin restarted
        after_restart = await meter.energy_j()
        power = await meter.power_w()
        await meter.close()
        await runner.cleanup()
        return meter, first, after_restart, power

    meter, first, after_restart, power = asyncio.run(scenario())
    assert meter.name == f"twin:{UUID}"
    assert first == pytest.approx(2.5)
    assert after_restart == pytest.approx(5.0)
    assert power == pytest.approx(312.5)


def test_factories_build_twin_backends_and_a_twin_shadow():
    fake = FakeTwinGpu()

    async def scenario():
        runner, url = await serve(fake)
        act = await build_actuator("twin", twin_url=url)
        meter = await build_meter("twin", twin_url=url)
        shadow = await build_actuator("dryrun", twin_url=url)
        await shadow.set_clock_mhz(900)
        shadow_clock = await shadow.clock_mhz()
        for closeable in (shadow, meter, act):
            await closeable.close()
        await runner.cleanup()
        return act, meter, shadow, shadow_clock

    act, meter, shadow, shadow_clock = asyncio.run(scenario())
    assert isinstance(act, TwinActuator) and isinstance(meter, TwinMeter)
    assert isinstance(shadow, DryRunActuator) and shadow.last_decision_mhz == 900
    assert shadow_clock == 1410
    assert fake.requests == []
    with pytest.raises(ValueError, match="needs twin_url"):
        asyncio.run(build_actuator("twin"))
