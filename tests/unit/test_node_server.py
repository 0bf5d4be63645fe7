"""The node agent over its real Unix socket, steering twin GPU endpoints served on loopback."""

import asyncio
import json
import logging
import stat

import pytest
from aiohttp import web

from agent.node.server import AgentStartError
from tests.unit.node_harness import NamedTwinGpu, RawClient, leased, running_agent, socket_path, until


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_start_resets_every_gpu_before_serving():
    async def scenario():
        async with running_agent(2, locked_mhz=600) as harness:  # left locked by a dead sidecar
            return harness, [fake.locked for fake in harness.fakes]

    harness, locked = run(scenario())
    assert locked == [None, None]
    assert all(fake.requests[0] == ("DELETE", None) for fake in harness.fakes)
    assert harness.announced == {
        "event": "listening",
        "socket": str(harness.path),
        "gpus": ["GPU-0000-0000", "GPU-0001-0000"],
    }


def test_socket_is_group_only_and_stale_socket_is_replaced():
    async def scenario():
        path = socket_path()
        async with running_agent(1, path=path):
            mode = stat.S_IMODE(path.stat().st_mode)
        assert not path.exists()  # removed on exit
        # A socket file left by a dead agent: bound but nobody accepting.
        import socket as socketlib

        stale = socketlib.socket(socketlib.AF_UNIX)
        stale.bind(str(path))
        stale.close()
        async with running_agent(1, path=path) as harness:
            client, reply = await leased(path)
            client.close()
            return mode, reply, harness

    mode, reply, _ = run(scenario())
    assert mode == 0o660
    assert reply["ok"]


def test_a_second_agent_on_a_live_socket_refuses_and_touches_no_gpu():
    async def scenario():
        async with running_agent(1) as first:
            client, _ = await leased(first.path)
            assert (await client.ask({"op": "set_clock", "mhz": 900}))["ok"]
            with pytest.raises(AgentStartError, match="another node agent listens"):
                async with running_agent(1, path=first.path):
                    pass
            assert first.fakes[0].locked == 900  # the running agent's lease stands
            client.close()

    run(scenario())


def test_lease_set_clock_and_status():
    async def scenario():
        async with running_agent(2) as harness:
            client, reply = await leased(harness.path)
            assert [gpu["uuid"] for gpu in reply["gpus"]] == ["GPU-0000-0000", "GPU-0001-0000"]
            assert reply["gpus"][0]["supported_clocks_mhz"][0] == 1410 and reply["gpus"][0]["mig"] is False
            assert await client.ask({"op": "set_clock", "mhz": 1050}) == {"ok": True}
            clock = await client.ask({"op": "clock"})
            status = await (await RawClient.connect(harness.path)).ask({"op": "status"})
            client.close()
            return harness, clock, status

    harness, clock, status = run(scenario())
    assert clock == {"ok": True, "clock_mhz": 1050}
    assert [gpu["leased_to"] for gpu in status["gpus"]] == [status["leases"][0]["pod"]] * 2
    assert status["leases"][0]["pod"].startswith("pid ")
    posts = [r for r in harness.fakes[0].requests if r[0] == "POST"]
    assert posts == [("POST", {"min_mhz": 1050, "max_mhz": 1050})]


def test_a_second_holder_is_refused():
    async def scenario():
        async with running_agent(1) as harness:
            first, _ = await leased(harness.path)
            second = await RawClient.connect(harness.path)
            await second.ask({"op": "hello", "pod_namespace": "other", "pod_name": "intruder"})
            refused = await second.ask({"op": "acquire"})
            no_lease = await second.ask({"op": "set_clock", "mhz": 600})
            first.close()
            second.close()
            return harness, refused, no_lease

    harness, refused, no_lease = run(scenario())
    assert refused["ok"] is False and refused["kind"] == "refused"
    assert "GPU-0000-0000 is leased to pid" in refused["error"]
    assert no_lease["kind"] == "refused" and "acquire first" in no_lease["error"]
    assert not any(r[0] == "POST" for r in harness.fakes[0].requests)


def test_closed_connection_resets_at_once_and_frees_the_gpu(caplog):
    caplog.set_level(logging.INFO, logger="agent.node.server")

    async def scenario():
        async with running_agent(1, ttl_s=5.0, idle_timeout_s=10.0) as harness:
            client, _ = await leased(harness.path)
            await client.ask({"op": "set_clock", "mhz": 600})
            assert harness.fakes[0].locked == 600
            client.writer.transport.abort()  # as a SIGKILL closes it
            waited = await until(lambda: harness.fakes[0].locked is None)
            again, reply = await leased(harness.path)
            again.close()
            return waited, reply

    waited, reply = run(scenario())
    assert waited < 0.5  # not the 5 s TTL: the close is seen at once
    assert reply["ok"]
    assert any(
        "lease lapsed (connection closed)" in r.message and "GPU-0000-0000" in r.message
        for r in caplog.records
    )
    assert any("lease granted: pid" in r.message for r in caplog.records)


def test_a_silent_holder_lapses_after_the_ttl_and_is_disconnected(caplog):
    caplog.set_level(logging.INFO, logger="agent.node.server")

    async def scenario():
        async with running_agent(1, ttl_s=0.3) as harness:
            client, _ = await leased(harness.path)
            await client.ask({"op": "set_clock", "mhz": 600})
            waited = await until(lambda: harness.fakes[0].locked is None)
            return waited, await client.closed()

    waited, closed = run(scenario())
    assert 0.3 <= waited < 0.3 * 1.25 + 0.3  # TTL, a sweep period, a reset
    assert closed
    assert any("lapsed (no request for 0.3 s)" in r.message for r in caplog.records)


def test_heartbeats_keep_the_lease():
    async def scenario():
        async with running_agent(1, ttl_s=0.3) as harness:
            client, _ = await leased(harness.path)
            await client.ask({"op": "set_clock", "mhz": 600})
            for _ in range(10):
                await asyncio.sleep(0.1)
                assert (await client.ask({"op": "heartbeat"}))["ok"]
            locked = harness.fakes[0].locked
            client.close()
            return locked

    assert run(scenario()) == 600


def test_release_resets_and_exit_resets_what_is_leased(caplog):
    caplog.set_level(logging.INFO, logger="agent.node.server")

    async def scenario():
        async with running_agent(2) as harness:
            first, _ = await leased(harness.path, ["GPU-0000-0000"])
            await first.ask({"op": "set_clock", "mhz": 600})
            assert (await first.ask({"op": "release"}))["ok"]
            assert harness.fakes[0].locked is None
            second, _ = await leased(harness.path, ["GPU-0001-0000"])
            await second.ask({"op": "set_clock", "mhz": 900})
        return harness

    harness = run(scenario())
    assert harness.fakes[1].locked is None  # the agent's exit reset the lease it still had
    assert any("lease released: pid" in r.message for r in caplog.records)
    assert any("lease ended by agent shutdown" in r.message for r in caplog.records)


def test_hostile_lines_never_crash_the_agent():
    async def scenario():
        async with running_agent(1) as harness:
            client, _ = await leased(harness.path)
            answers = [
                await client.ask(b"garbage\n"),
                await client.ask(b"[" * 5000 + b"\n"),
                await client.ask({"op": "launch"}),
                await client.ask({"op": "set_clock", "mhz": 1051}),
                await client.ask({"op": "hello"}),
            ]
            huge = await client.ask(b'{"op": "' + b"x" * 20000 + b'"}\n')
            closed = await client.closed()
            fresh, reply = await leased(harness.path)  # the agent still serves
            fresh.close()
            return answers, huge, closed, reply

    answers, huge, closed, reply = run(scenario())
    assert [a["kind"] for a in answers] == [
        "bad_request",
        "bad_request",
        "bad_request",
        "unsupported_clock",
        "bad_request",
    ]
    assert "nearest supported: 1050 MHz" in answers[3]["error"]
    assert huge["kind"] == "bad_request" and "line over 8192 bytes" in huge["error"] and closed
    assert reply["ok"]


def test_protocol_order_and_unknown_gpus():
    async def scenario():
        async with running_agent(1) as harness:
            client = await RawClient.connect(harness.path)
            early = await client.ask({"op": "acquire"})
            await client.ask({"op": "hello"})
            unknown = await client.ask({"op": "acquire", "gpus": ["GPU-9999"]})
            power = await client.ask({"op": "set_power_limit", "watts": 250})
            await client.ask({"op": "acquire"})
            twin_power = await client.ask({"op": "set_power_limit", "watts": 250})
            client.close()
            return early, unknown, power, twin_power

    early, unknown, power, twin_power = run(scenario())
    assert early["kind"] == "bad_request" and "hello" in early["error"]
    assert unknown["kind"] == "not_found" and "steers GPU-0000-0000" in unknown["error"]
    assert power["kind"] == "refused"
    assert twin_power["kind"] == "not_supported" and "no power-limit control" in twin_power["error"]


def test_connections_beyond_the_bound_are_refused():
    async def scenario():
        async with running_agent(1, max_connections=2) as harness:
            held = [await RawClient.connect(harness.path) for _ in range(2)]
            for client in held:
                assert (await client.ask({"op": "heartbeat"}))["ok"]
            extra = await RawClient.connect(harness.path)
            refusal = json.loads(await asyncio.wait_for(extra.reader.readline(), 5))
            for client in held:
                client.close()
            return refusal

    refusal = run(scenario())
    assert refusal["kind"] == "transient" and "2 connections" in refusal["error"]


def test_idle_connections_are_closed():
    async def scenario():
        async with running_agent(1, ttl_s=0.1, idle_timeout_s=0.3) as harness:
            client = await RawClient.connect(harness.path)
            client.writer.write(b'{"op": "heart')  # half a line, then nothing
            return await client.closed(timeout_s=2)

    assert run(scenario())


class FlakyTwinGpu(NamedTwinGpu):
    """Refuses resets while `broken`: a GPU endpoint that fails the lapse reset at first."""

    broken = False

    async def delete(self, request: web.Request) -> web.Response:
        if self.broken:
            return web.json_response({"error": "busy"}, status=500)
        return await super().delete(request)


def test_a_failed_lapse_reset_is_retried_until_it_succeeds(monkeypatch):
    monkeypatch.setattr("tests.unit.node_harness.NamedTwinGpu", FlakyTwinGpu)

    async def scenario():
        async with running_agent(1, ttl_s=0.2) as harness:
            (fake,) = harness.fakes
            client, _ = await leased(harness.path)
            await client.ask({"op": "set_clock", "mhz": 600})
            fake.broken = True
            client.close()
            await asyncio.sleep(0.3)
            assert fake.locked == 600
            status = await (await RawClient.connect(harness.path)).ask({"op": "status"})
            fake.broken = False
            waited = await until(lambda: fake.locked is None)
            return status, waited

    status, waited = run(scenario())
    assert status["gpus"][0]["reset_pending"] is True
    assert waited < 0.2  # within a sweep period or two
