"""Issue 12, item 2: a flood of idle connections cannot take the sidecar's own port down with it.

The gateway runs in a child process under a 256-descriptor limit (as in the issue), next to a
/healthz listener of its own; the test holds 300 idle connections to the gateway from outside.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

from agent.sidecar.connections import default_max_connections

CHILD = r"""
import asyncio, json, resource, socket, sys
from aiohttp import web
from agent.predict.lengths import MaxTokensPredictor
from agent.sidecar import gateway as gw
from agent.sidecar.prompt_tokens import EstimateCounter
from agent.sidecar.tracker import RequestTracker

_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def main() -> None:
    cap = None if sys.argv[1] == "auto" else int(sys.argv[1])
    limits = gw.GatewayLimits(header_timeout_s=60, idle_timeout_s=60, max_connections=cap)
    tracker = RequestTracker(MaxTokensPredictor())
    gateway = gw.Gateway(tracker, "http://127.0.0.1:9", prompt_tokens=EstimateCounter(), limits=limits)
    runner = web.AppRunner(gw.build_gateway_app(gateway), **gw.server_options(limits))
    await runner.setup()
    gateway_sock = socket.create_server(("127.0.0.1", 0))
    await gw.start_gateway_site(runner, gateway_sock)
    health = web.Application()
    health.router.add_get("/healthz", healthz)
    health_runner = web.AppRunner(health)
    await health_runner.setup()
    health_sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(health_runner, health_sock).start()
    ports = {"gateway": gateway_sock.getsockname()[1], "healthz": health_sock.getsockname()[1]}
    print(json.dumps({**ports, "cap": gateway.connections.max_connections}), flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
"""


def test_the_connection_cap_follows_the_descriptor_limit():
    assert 1 <= default_max_connections() <= 4096


def start_child(max_connections: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, max_connections],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, json.loads(child.stdout.readline())


def test_300_idle_sockets_under_a_256_descriptor_limit_leave_healthz_answering():
    child, ports = start_child("auto")
    idle: list[socket.socket] = []
    try:
        assert ports["cap"] == (256 - 64) // 2
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", ports["gateway"]), timeout=2))
        last = idle[-1]  # over the cap: told to come back, and closed
        last.settimeout(5)
        answer = b""
        while chunk := last.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        # The burst is accepted (its last connection answered): now, with the cap's sockets held,
        # the health probe still gets a descriptor and an answer in time.
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['healthz']}/healthz", timeout=1) as resp:
            assert resp.read() == b"ok"
        assert time.monotonic() - started < 1.0
    finally:
        for sock in idle:
            sock.close()
        child.terminate()
        _, stderr = child.communicate(timeout=10)
    assert "Traceback" not in stderr
    assert stderr.count("accept() fails") <= 1


def test_accept_failing_for_want_of_descriptors_logs_one_warning_per_episode():
    """A cap set above what the limit allows: accept() hits EMFILE, and says so once, untraced."""
    child, ports = start_child("1000")
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", ports["gateway"]), timeout=2))
        time.sleep(1.5)  # asyncio retries a failed accept every second
    finally:
        for sock in idle:
            sock.close()
        child.terminate()
        _, stderr = child.communicate(timeout=10)
    assert stderr.count("gateway accept() fails") == 1
    assert "Traceback" not in stderr and "out of system resource" not in stderr
