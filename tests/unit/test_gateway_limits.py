"""Issue 12, items 1-2: what a client's bodies may cost the gateway, in bytes and in time.

Raw sockets where the point is what the gateway does *before* the body is there: a client
library would not send headers without their body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from agent.sidecar.gateway import GatewayLimits
from tests.unit.test_sidecar_gateway import eventually, run, stack

MIB = 1024 * 1024
SMALL = GatewayLimits(max_body_bytes=1 * MIB, body_buffer_bytes=4 * MIB, allow_paths=("/echo*",))


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    return await asyncio.open_connection(parts.hostname, parts.port)


def head(method: str, path: str, *fields: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", *fields, "", ""]
    return "\r\n".join(lines).encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers (lower-case), body."""
    status_line = await reader.readuntil(b"\r\n")
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def ask(url: str, request: bytes, timeout_s: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    """Send `request` (headers, maybe part of a body) and read the answer within `timeout_s`."""
    reader, writer = await connect(url)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout_s)
    finally:
        writer.close()


def test_a_content_length_over_the_limit_is_413_before_the_body_is_read():
    async def scenario() -> None:
        async with stack(limits=SMALL) as s:
            declared = "Content-Length: 60000000"  # 60 MB announced, none of it sent
            status, headers, body = await ask(
                s.url,
                head(
                    "POST", "/v2/models/ensemble/generate_stream", declared, "Content-Type: application/json"
                ),
            )
            assert status == 413 and headers["connection"] == "close"
            assert "60000000" in json.loads(body)["error"]
            status, _, body = await ask(s.url, head("POST", "/v1/completions", declared))
            error = json.loads(body)["error"]
            assert status == 413 and error["code"] == 413 and error["type"] == "request_too_large"
            status, _, _ = await ask(s.url, head("PUT", "/echo/upload", declared))  # untracked: same limit
            assert status == 413
            assert s.engine.received == [] and s.tracker.counters.arrived == 0
            assert s.gateway.bodies.peak_bytes == 0
            assert s.gateway.stats.rejected[413] == 3

    run(scenario)


def test_a_chunked_body_is_cut_off_at_the_limit():
    async def scenario() -> None:
        async with stack(limits=SMALL) as s:
            chunk = b"x" * 65536
            chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40)) + b"0\r\n\r\n"
            request = head("POST", "/v2/models/ensemble/generate", "Transfer-Encoding: chunked") + chunked
            status, _, body = await ask(s.url, request)
            assert status == 413 and "limit of 1048576 bytes" in json.loads(body)["error"]
            assert s.engine.received == []
            assert s.gateway.bodies.used_bytes == 0 and s.gateway.bodies.peak_bytes <= 1 * MIB
            s.tracker.assert_empty()
            assert s.only_span().attributes["throttllem.outcome"] == "refused"

    run(scenario)


def test_a_full_hold_queue_and_a_closing_gateway_answer_before_the_body_is_read():
    async def scenario() -> None:
        async with stack(limits=SMALL, max_held=1, max_hold_s=30) as s:
            s.tracker.gating = True
            body = {"text_input": "hi", "max_tokens": 2}
            held = asyncio.create_task(s.client.post(f"{s.url}/v2/models/ensemble/generate", json=body))
            await eventually(lambda: s.tracker.held == 1)
            unsent = head("POST", "/v2/models/ensemble/generate", "Content-Length: 500000")
            status, headers, answer = await ask(s.url, unsent)
            assert (
                status == 429
                and headers["retry-after"] == "1"
                and "already wait" in json.loads(answer)["error"]
            )
            s.tracker.release_all()
            async with await held as resp:
                assert resp.status == 200
            await s.gateway.close()
            status, headers, _ = await ask(
                s.url, head("POST", "/v1/chat/completions", "Content-Length: 500000")
            )
            assert status == 503 and headers["retry-after"] == "1"
            assert s.gateway.bodies.peak_bytes < 1000  # only the one small body was ever read

    run(scenario)


def test_concurrent_big_bodies_are_held_within_the_body_buffer():
    """8 bodies of 0.9 MiB at once against a 2 MiB buffer: all served, never more than 2 MiB held.

    The issue's 8 x 60 MB, scaled to what the fake engine accepts (aiohttp's 1 MiB default).
    """

    async def scenario() -> None:
        limits = GatewayLimits(max_body_bytes=1 * MIB, body_buffer_bytes=2 * MIB)
        async with stack(limits=limits) as s:
            prompt = "x" * (MIB * 9 // 10)
            body = {"text_input": prompt, "max_tokens": 2, "stream": True}

            async def send() -> int:
                url = f"{s.url}/v2/models/ensemble/generate_stream"
                async with s.client.post(url, json=body) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(send() for _ in range(8)))
            assert statuses == [200] * 8
            assert MIB * 9 // 10 <= s.gateway.bodies.peak_bytes <= 2 * MIB
            assert s.gateway.bodies.used_bytes == 0
            assert len(s.engine.received) == 8

    run(scenario)


def test_a_body_that_cannot_get_room_in_time_is_503_with_retry_after():
    async def scenario() -> None:
        async with stack(limits=SMALL) as s:
            # Four clients announce 1 MiB each and send nothing: the 4 MiB buffer is spoken for.
            stalled = [await connect(s.url) for _ in range(4)]
            for _, writer in stalled:
                writer.write(head("POST", "/v2/models/ensemble/generate", "Content-Length: 1048576"))
            await eventually(lambda: s.gateway.bodies.used_bytes == 4 * MIB)
            status, headers, body = await ask(
                s.url, head("POST", "/v1/completions", "Content-Length: 10") + b'{"prompt":', timeout_s=3
            )
            assert status == 503 and headers["retry-after"] == "1"
            assert "bytes of request bodies" in json.loads(body)["error"]["message"]
            for _, writer in stalled:
                writer.close()
            await eventually(lambda: s.gateway.bodies.used_bytes == 0)

    run(scenario)


def test_a_slow_body_is_408_after_the_body_timeout():
    async def scenario() -> None:
        limits = GatewayLimits(body_timeout_s=0.3)
        async with stack(limits=limits) as s:
            request = head("POST", "/v2/models/ensemble/generate", "Content-Length: 100") + b'{"text_in'
            status, headers, body = await ask(s.url, request)
            assert status == 408 and headers["connection"] == "close"
            assert "within 0.3 s" in json.loads(body)["error"]
            assert s.gateway.bodies.used_bytes == 0 and s.engine.received == []

    run(scenario)


async def closed_within(url: str, timeout_s: float, send: AsyncIterator[bytes]) -> bytes | None:
    """What the gateway sent before closing the connection within `timeout_s` (None: still open)."""
    reader, writer = await connect(url)

    async def trickle() -> None:
        async for piece in send:
            writer.write(piece)

    sender = asyncio.create_task(trickle())
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    except TimeoutError:
        return None
    finally:
        sender.cancel()
        writer.close()


def test_half_sent_headers_are_closed_after_the_header_timeout():
    async def slowloris() -> AsyncIterator[bytes]:
        yield b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n"
        for i in range(1000):
            await asyncio.sleep(0.05)
            yield f"X-Slow-{i}: 1\r\n".encode()

    async def scenario() -> None:
        limits = GatewayLimits(header_timeout_s=0.3, idle_timeout_s=30)
        async with stack(limits=limits) as s:
            started = asyncio.get_running_loop().time()
            assert await closed_within(s.url, 2.0, slowloris()) == b""
            assert asyncio.get_running_loop().time() - started < 1.0
            assert s.gateway.connections is not None and s.gateway.connections.header_timeouts == 1
            assert s.engine.received == []

    run(scenario)


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout():
    async def nothing() -> AsyncIterator[bytes]:
        yield head("GET", "/v2/health/ready")  # one request, then silence on the kept-alive connection

    async def scenario() -> None:
        limits = GatewayLimits(header_timeout_s=30, idle_timeout_s=0.3)
        async with stack(limits=limits) as s:
            answer = await closed_within(s.url, 2.0, nothing())
            assert answer is not None and answer.startswith(b"HTTP/1.1 200")
            async with s.client.get(f"{s.url}/v2/health/ready") as resp:  # a new connection serves
                assert resp.status == 200

    run(scenario)


def test_the_engine_gets_a_body_read_within_the_limits_unchanged():
    async def scenario() -> None:
        async with stack(limits=SMALL) as s:
            body = {"text_input": "y" * (MIB - 100), "max_tokens": 3}
            async with s.client.post(f"{s.url}/v2/models/ensemble/generate", json=body) as resp:
                assert resp.status == 200
            assert json.loads(s.engine.received[0][3]) == body
            assert s.gateway.bodies.used_bytes == 0

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b"z" * 1000

            async with s.client.put(f"{s.url}/echo/chunked", data=chunks()) as resp:
                assert len((await resp.json())["body"]) == 4000

    run(scenario)
