"""The faults, one coroutine each: inject it into a running stack, observe, judge against the targets.

Each returns a `FaultResult`: the GPU's clock 2 s after the fault, when stock clocks came back,
the traffic it saw (sent / answered / explicitly rejected / lost), the sidecar's RSS peak, how
long the service took to recover, and each target it was held to. Targets (issue 12):

    no request lost        wherever the process holding the connection stays alive
    stock within 2 s       every sidecar death with the node agent; SIGTERM always
    stock within stale     engine or metrics faults: stale bound + one poll (+ a margin for
                           the suite's own polling)
    RSS <= 300 MiB         the body flood and the huge metrics page
    /healthz <= 1 s        under slowloris

A fault that cannot hold a target by its nature says why instead (a SIGKILLed process's own
connections are cut; without the node agent a killed sidecar leaves its lock: that is the
reason the agent exists).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from agent.bench.faults.proxy import Mode
from agent.bench.faults.stack import LEASE_TTL_S, RssPeak, Stack
from agent.bench.faults.traffic import REQUEST_TIMEOUT_S, Tally, paced_streams, stream_body, streams, tally
from agent.config import Settings

OBSERVE_AFTER_S = 2.0  # "clock state 2 s later"
STOCK_DEADLINE_S = 2.0
STALE_MARGIN_S = 0.5  # the suite polls every 20 ms and the twin applies a lock after its delay
RSS_LIMIT_MB = 300.0
HEALTHZ_LIMIT_S = 1.0
FAULT_S = 3.0  # how long a transient fault lasts
RATE_HZ = 4.0  # background traffic during a fault
MAX_TOKENS = 24
FLOOD_BODIES = 8
FLOOD_BYTES = 60 * 1000 * 1000
SLOWLORIS_SOCKETS = 300
SLOWLORIS_NOFILE = 256  # the sidecar's descriptor limit, as the report had it
HEADER_TIMEOUT_S = Settings.model_fields["gateway_header_timeout_s"].default  # the sidecar runs with it
STREAMS = 1000
FORBIDDEN = (
    ("POST", "/twin/v1/gpu/locked_clocks"),
    ("DELETE", "/twin/v1/gpu/locked_clocks"),
    ("POST", "/v2/repository/models/ensemble/unload"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/logging"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("POST", "/v2/cudasharedmemory/region/x/unregister"),
    ("POST", "/v2/trace/setting"),
    ("GET", "/metrics"),
)


@dataclass(slots=True)
class FaultResult:
    """One fault's row of the table."""

    node_agent: bool
    fault: str = ""  # the name `--fault` takes; the suite sets it
    clock_2s: str = "-"  # "stock", "locked <MHz>", "unknown" (the twin could not say)
    stock_after_s: float | None = None  # fault to stock clocks (or to the reset request)
    traffic: Tally = field(default_factory=Tally)
    rss_peak_mb: float | None = None
    recovery_s: float | None = None  # end of the fault to ready and steering again
    targets: dict[str, bool] = field(default_factory=dict)
    note: str = ""

    @property
    def held(self) -> bool:
        """Every target this fault is held to was met."""
        return all(self.targets.values())

    def as_json(self) -> dict[str, object]:
        """The row as `bench faults --json` prints it."""
        return {
            "fault": self.fault,
            "node_agent": self.node_agent,
            "clock_2s": self.clock_2s,
            "stock_after_s": _round(self.stock_after_s),
            "sent": self.traffic.sent,
            "answered": self.traffic.answered,
            "rejected": self.traffic.rejected,
            "lost": self.traffic.lost,
            "statuses": dict(self.traffic.statuses),
            "rss_peak_mb": _round(self.rss_peak_mb, 1),
            "recovery_s": _round(self.recovery_s),
            "targets": self.targets,
            "held": self.held,
            "note": self.note,
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def clock_label(locked: int | str | None) -> str:
    """How the table shows a twin GPU lock."""
    if locked is None:
        return "stock"
    return "unknown" if isinstance(locked, str) else f"locked {locked}"


async def _locked_sidecar(stack: Stack, node_agent: bool) -> None:
    """A sidecar (and its node agent) holding its lock: the fault must have something to undo."""
    if node_agent:
        await stack.start_agent()
    await stack.start_sidecar(node_agent)
    if await stack.wait_locked(stack.config.clock_mhz) is None:
        raise RuntimeError(f"the sidecar never locked {stack.config.clock_mhz} MHz")


async def _background(stack: Stack, duration_s: float) -> asyncio.Task[Tally]:
    gateway = stack.live_sidecar.gateway_url
    assert gateway is not None
    return asyncio.create_task(paced_streams(gateway, duration_s, RATE_HZ, MAX_TOKENS))


# -- the sidecar dies or freezes ------------------------------------------------------------------


async def sidecar_signal(stack: Stack, node_agent: bool, sig: signal.Signals) -> FaultResult:
    """SIGTERM or SIGKILL the sidecar with requests in flight and arriving."""
    result = FaultResult(node_agent)
    await _locked_sidecar(stack, node_agent)
    sidecar = stack.live_sidecar
    gateway = sidecar.gateway_url
    assert gateway is not None
    in_flight = asyncio.create_task(streams(gateway, 6, MAX_TOKENS * 4))
    await asyncio.sleep(0.3)
    began = time.monotonic()
    sidecar.child.process.send_signal(sig)
    arriving = asyncio.create_task(paced_streams(gateway, 1.0, RATE_HZ, MAX_TOKENS))
    stock = asyncio.create_task(stack.wait_stock(OBSERVE_AFTER_S + 8.0))
    await asyncio.sleep(max(0.0, OBSERVE_AFTER_S - (time.monotonic() - began)))
    result.clock_2s = clock_label(await stack.locked_mhz())
    result.stock_after_s = await stock
    result.traffic = await in_flight + await arriving
    if sig is signal.SIGTERM:
        result.targets = {
            "stock within 2 s": result.clock_2s == "stock",
            "no request lost": not result.traffic.lost,
        }
        code = await sidecar.child.wait(10.0)
        result.targets["exit 0"] = code == 0
        result.note = f"exit code {code}"
    elif node_agent:
        result.targets = {"stock within 2 s": result.clock_2s == "stock"}
        result.note = "SIGKILL cuts the connections the sidecar held (lost by nature)"
    else:
        result.note = "no node agent: nothing outlives the sidecar to reset its lock (why the agent exists)"
    return result


async def sidecar_oom_kill(stack: Stack, node_agent: bool) -> FaultResult:
    """What the kernel's OOM killer sends: a SIGKILL with streams in flight.

    The same injection as `sidecar-sigkill`; its own row because users ask about OOM kills by name.
    """
    result = await sidecar_signal(stack, node_agent, signal.SIGKILL)
    result.note = "SIGKILL under load, as the OOM killer sends it; " + result.note
    return result


async def sidecar_freeze(stack: Stack, node_agent: bool) -> FaultResult:
    """SIGSTOP the sidecar (a frozen process holds its lock and its socket), then SIGCONT."""
    result = FaultResult(node_agent)
    await _locked_sidecar(stack, node_agent)
    child = stack.live_sidecar.child
    began = time.monotonic()
    child.process.send_signal(signal.SIGSTOP)
    try:
        stock = asyncio.create_task(stack.wait_stock(FAULT_S))
        await asyncio.sleep(OBSERVE_AFTER_S)
        result.clock_2s = clock_label(await stack.locked_mhz())
        result.stock_after_s = await stock
        await asyncio.sleep(max(0.0, FAULT_S - (time.monotonic() - began)))
    finally:
        child.process.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    relocked = await stack.wait_locked(stack.config.clock_mhz, 15.0)
    result.recovery_s = None if relocked is None else time.monotonic() - resumed
    if node_agent:
        result.targets = {
            f"stock within lease ttl ({LEASE_TTL_S:g} s) + 1 s": result.stock_after_s is not None
            and result.stock_after_s <= LEASE_TTL_S + 1.0,
            "steers again after SIGCONT": relocked is not None,
        }
    else:
        result.note = "no node agent: a frozen sidecar keeps its lock until it runs again"
    return result


async def agent_stop(stack: Stack, node_agent: bool, sig: signal.Signals) -> FaultResult:
    """The node agent stops (SIGTERM: an upgrade; SIGKILL: a crash) and a new one starts on its socket."""
    result = FaultResult(node_agent)
    await _locked_sidecar(stack, True)
    agent = stack.agent
    assert agent is not None
    traffic = await _background(stack, 4.0)
    began = time.monotonic()
    agent.child.process.send_signal(sig)
    result.stock_after_s = await stack.wait_stock(OBSERVE_AFTER_S)
    await asyncio.sleep(max(0.0, OBSERVE_AFTER_S - (time.monotonic() - began)))
    result.clock_2s = clock_label(await stack.locked_mhz())
    await agent.child.wait(10.0)
    restarted = time.monotonic()
    await stack.start_agent(agent.socket)
    relocked = await stack.wait_locked(stack.config.clock_mhz, 15.0)
    result.recovery_s = None if relocked is None else time.monotonic() - restarted
    result.traffic = await traffic
    result.targets = {
        "steers again with the new agent": relocked is not None,
        "no request lost": not result.traffic.lost,
        "sidecar still running": stack.live_sidecar.child.running,
    }
    if sig is signal.SIGTERM:
        result.targets["stock within 2 s"] = result.clock_2s == "stock"
        result.note = "an agent that exits resets the GPUs it leased"
    else:
        result.targets["the new agent resets at start"] = stack.reset_requested_after(restarted) is not None
        result.note = "a killed agent resets nothing: its successor resets every GPU when it starts"
    return result


# -- the engine and what the sidecar reads or steers ------------------------------------------------


async def engine_kill_restart(stack: Stack, node_agent: bool) -> FaultResult:
    """SIGKILL the engine (here the twin, which is also the GPU), start it again on its ports."""
    result = FaultResult(node_agent)
    await _locked_sidecar(stack, node_agent)
    stack.twin.child.kill()
    await stack.twin.child.wait()
    during = await paced_streams(_gateway(stack), 1.5, RATE_HZ, MAX_TOKENS)
    await stack.restart_twin()
    restarted = time.monotonic()
    relocked = await stack.wait_locked(stack.config.clock_mhz, 20.0)
    result.recovery_s = None if relocked is None else time.monotonic() - restarted
    result.clock_2s = clock_label(await stack.locked_mhz())
    result.traffic = during + await paced_streams(_gateway(stack), 1.0, RATE_HZ, MAX_TOKENS)
    result.targets = {
        "no request lost": not result.traffic.lost,
        "steers again after restart": relocked is not None,
        "sidecar still running": stack.live_sidecar.child.running,
    }
    result.note = "the twin is engine and GPU at once: its restart starts at stock"
    return result


async def engine_freeze(stack: Stack, node_agent: bool) -> FaultResult:
    """SIGSTOP the engine: its metrics poll hangs; stock must be asked for within the stale bound."""
    result = FaultResult(node_agent)
    await _locked_sidecar(stack, node_agent)
    traffic = await _background(stack, FAULT_S)
    await asyncio.sleep(0.5)
    began = time.monotonic()
    stack.twin.child.process.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(FAULT_S)
        result.stock_after_s = stack.reset_requested_after(began)
        ready_while_stopped = await stack.ready()
    finally:
        stack.twin.child.process.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    await asyncio.sleep(OBSERVE_AFTER_S)
    result.clock_2s = clock_label(await stack.locked_mhz())
    ready = await stack.wait_ready(15.0)
    result.recovery_s = None if ready is None else time.monotonic() - resumed
    result.traffic = await traffic
    bound = stack.config.stale_bound_s + STALE_MARGIN_S
    result.targets = {
        f"stock asked within {bound:g} s": result.stock_after_s is not None and result.stock_after_s <= bound,
        "/readyz 503 while stale": not ready_while_stopped,
        "no request lost": not result.traffic.lost,
    }
    result.note = "stock_after_s: when the reset reached the GPU endpoint (the stopped twin cannot apply it)"
    return result


async def gpu_endpoint(stack: Stack, node_agent: bool, mode: Mode) -> FaultResult:
    """The GPU endpoint (NVML's stand-in) hangs or fails for a while; service must go on."""
    result = FaultResult(node_agent)
    await _locked_sidecar(stack, node_agent)
    traffic = await _background(stack, FAULT_S + 1.0)
    stack.gpu_proxy.mode = mode
    await asyncio.sleep(FAULT_S)
    stack.gpu_proxy.mode = Mode.PASS
    healed = time.monotonic()
    relocked = await stack.wait_locked(stack.config.clock_mhz, 15.0)
    result.recovery_s = None if relocked is None else time.monotonic() - healed
    result.clock_2s = clock_label(await stack.locked_mhz())
    result.traffic = await traffic
    result.targets = {
        "no request lost": not result.traffic.lost,
        "steers again after": relocked is not None,
        "sidecar still running": stack.live_sidecar.child.running,
    }
    return result


async def metrics_page(stack: Stack, node_agent: bool, mode: Mode) -> FaultResult:
    """The engine's metrics page turns to garbage or to hundreds of MB: stock clocks, bounded memory."""
    result = FaultResult(node_agent)
    await _locked_sidecar(stack, node_agent)
    traffic = await _background(stack, FAULT_S + 1.0)
    async with RssPeak(stack.live_sidecar.child.pid) as rss:
        began = time.monotonic()
        stack.metrics_proxy.mode = mode
        await asyncio.sleep(FAULT_S)
        result.stock_after_s = stack.reset_requested_after(began)
        stack.metrics_proxy.mode = Mode.PASS
    healed = time.monotonic()
    ready = await stack.wait_ready(15.0)
    result.recovery_s = None if ready is None else time.monotonic() - healed
    result.clock_2s = clock_label(await stack.locked_mhz())
    result.rss_peak_mb = rss.peak_mb
    result.traffic = await traffic
    bound = stack.config.stale_bound_s + STALE_MARGIN_S
    result.targets = {
        f"stock asked within {bound:g} s": result.stock_after_s is not None and result.stock_after_s <= bound,
        "no request lost": not result.traffic.lost,
        "ready again after": ready is not None,
    }
    if mode is Mode.HUGE:
        result.targets[f"RSS <= {RSS_LIMIT_MB:g} MiB"] = rss.peak_mb <= RSS_LIMIT_MB
    return result


# -- hostile clients ------------------------------------------------------------------------------


async def slowloris(stack: Stack, node_agent: bool) -> FaultResult:
    """300 sockets trickling headers at a sidecar limited to 256 descriptors; /healthz must answer."""
    result = FaultResult(node_agent)
    await stack.start_sidecar(False, nofile=SLOWLORIS_NOFILE)
    sidecar = stack.live_sidecar
    gateway = sidecar.gateway_url
    assert gateway is not None
    host, port = gateway.removeprefix("http://").split(":")
    async with RssPeak(sidecar.child.pid) as rss:
        trickle = asyncio.create_task(_trickle(host, int(port), SLOWLORIS_SOCKETS, HEADER_TIMEOUT_S + 2.0))
        await asyncio.sleep(1.0)
        healthz, traffic = await asyncio.gather(
            _worst_healthz(stack, FAULT_S), paced_streams(gateway, FAULT_S, RATE_HZ, MAX_TOKENS)
        )
        open_at_end = await trickle
    result.rss_peak_mb = rss.peak_mb
    result.traffic = traffic
    result.recovery_s = healthz
    result.targets = {
        f"/healthz <= {HEALTHZ_LIMIT_S:g} s": healthz is not None and healthz <= HEALTHZ_LIMIT_S,
        "slow sockets closed by the gateway": open_at_end == 0,
        "sidecar still running": sidecar.child.running,
    }
    result.note = f"recovery_s: worst /healthz latency; {open_at_end} slow sockets still open at the end"
    return result


async def _trickle(host: str, port: int, sockets: int, duration_s: float) -> int:
    """Open `sockets` connections sending one header byte each 0.5 s; how many are open at the end."""
    peers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(sockets):
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v2/models/ensemble/generate_stream HTTP/1.1\r\nHost: x\r\n")
            peers.append((reader, writer))
    began = time.monotonic()
    while time.monotonic() - began < duration_s:
        for _, writer in peers:
            if not writer.is_closing():
                writer.write(b"X")
        await asyncio.sleep(0.5)
    still_open = 0
    for reader, writer in peers:
        still_open += not await _closed_by_peer(reader)
        writer.close()
    return still_open


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the other end closed (after whatever it answered, e.g. a 408)."""
    try:
        while await asyncio.wait_for(reader.read(65536), 0.05):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


async def _worst_healthz(stack: Stack, duration_s: float) -> float | None:
    """The slowest /healthz answer over `duration_s` (None: one failed or took over 5 s)."""
    worst = 0.0
    began = time.monotonic()
    url = f"{stack.live_sidecar.url}/healthz"
    while time.monotonic() - began < duration_s:
        sent = time.monotonic()
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as session,
                session.get(url) as response,
            ):
                if response.status != 200:
                    return None
        except (aiohttp.ClientError, TimeoutError):
            return None
        worst = max(worst, time.monotonic() - sent)
        await asyncio.sleep(0.1)
    return worst


async def body_flood(stack: Stack, node_agent: bool) -> FaultResult:
    """Eight concurrent 60 MB generate_stream bodies, half with a length, half chunked."""
    result = FaultResult(node_agent)
    await stack.start_sidecar(False)
    gateway = _gateway(stack)
    url = f"{gateway}/v2/models/ensemble/generate_stream"
    body = b"{" + b" " * (FLOOD_BYTES - 2) + b"}"

    async def chunks() -> object:
        for start in range(0, FLOOD_BYTES, 1 << 20):
            yield body[start : start + (1 << 20)]

    async def upload(session: aiohttp.ClientSession, chunked: bool) -> tuple[str, int]:
        try:
            async with session.post(
                url, data=chunks() if chunked else body, headers={"Content-Type": "application/json"}
            ) as response:
                answer = await response.read()
                return ("rejected" if response.status >= 400 and answer else "lost"), response.status
        except (aiohttp.ClientError, TimeoutError):
            return "lost", 0

    async with RssPeak(stack.live_sidecar.child.pid) as rss:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            verdicts = await asyncio.gather(*(upload(session, i % 2 == 1) for i in range(FLOOD_BODIES)))
        after = await paced_streams(gateway, 1.0, RATE_HZ, MAX_TOKENS)
    result.traffic = tally(list(verdicts)) + after
    result.rss_peak_mb = rss.peak_mb
    result.targets = {
        f"RSS <= {RSS_LIMIT_MB:g} MiB": rss.peak_mb <= RSS_LIMIT_MB,
        "no request lost": not result.traffic.lost,
        "sidecar still running": stack.live_sidecar.child.running,
    }
    return result


async def many_streams(stack: Stack, node_agent: bool) -> FaultResult:
    """1,000 concurrent streams: each answered or refused with 429/503, none lost."""
    result = FaultResult(node_agent)
    await stack.start_sidecar(False)
    async with RssPeak(stack.live_sidecar.child.pid) as rss:
        result.traffic = await streams(_gateway(stack), STREAMS, 8)
    result.rss_peak_mb = rss.peak_mb
    result.targets = {"no request lost": not result.traffic.lost}
    return result


async def client_disconnects(stack: Stack, node_agent: bool) -> FaultResult:
    """Clients that hang up mid-request on every tracked route leave no ticket open."""
    result = FaultResult(node_agent)
    await stack.start_sidecar(False)
    gateway = _gateway(stack)
    routes = ("generate", "generate_stream")
    for route in routes:
        for _ in range(5):
            await _hang_up(f"{gateway}/v2/models/ensemble/{route}", route == "generate_stream")
    await asyncio.sleep(OBSERVE_AFTER_S)
    in_flight = await stack.sidecar_gauge("throttllem_requests_in_flight")
    held = await stack.sidecar_gauge("throttllem_requests_held")
    result.traffic = Tally(sent=len(routes) * 5)
    result.targets = {"no ticket left open": in_flight == 0 and held == 0}
    result.note = (
        f"{in_flight:g} in flight, {held:g} held 2 s after the last hang-up"
        if in_flight is not None and held is not None
        else "no /metrics"
    )
    return result


async def _hang_up(url: str, streamed: bool) -> None:
    """Send a long request and close the connection before it is answered."""
    body = stream_body(4096) | {"stream": streamed}
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.4)) as session,
            session.post(url, json=body) as response,
        ):
            await response.content.readany()
            await asyncio.sleep(10.0)  # the timeout hangs up first


async def forbidden_paths(stack: Stack, node_agent: bool) -> FaultResult:
    """Admin and GPU routes through the gateway: each refused, the GPU untouched."""
    result = FaultResult(node_agent)
    await _locked_sidecar(stack, False)
    gateway = _gateway(stack)
    verdicts = []
    for method, path in FORBIDDEN:
        body = {"min_mhz": 210, "max_mhz": 210} if "locked_clocks" in path else {}
        try:
            async with stack.session.request(method, f"{gateway}{path}", json=body) as response:
                await response.read()
                verdicts.append(("rejected" if response.status == 403 else "answered", response.status))
        except (aiohttp.ClientError, TimeoutError):
            verdicts.append(("lost", 0))
    result.traffic = tally(verdicts)
    result.clock_2s = clock_label(await stack.locked_mhz())
    result.targets = {
        "every path refused (403)": result.traffic.rejected == len(FORBIDDEN),
        "GPU lock unchanged": result.clock_2s == clock_label(stack.config.clock_mhz),
    }
    return result


def _gateway(stack: Stack) -> str:
    gateway = stack.live_sidecar.gateway_url
    assert gateway is not None
    return gateway


Fault = Callable[[Stack, bool], Awaitable[FaultResult]]


def _signal(sig: signal.Signals) -> Fault:
    async def fault(stack: Stack, node_agent: bool) -> FaultResult:
        return await sidecar_signal(stack, node_agent, sig)

    return fault


def _agent(sig: signal.Signals) -> Fault:
    async def fault(stack: Stack, node_agent: bool) -> FaultResult:
        return await agent_stop(stack, node_agent, sig)

    return fault


def _mode(run: Callable[[Stack, bool, Mode], Awaitable[FaultResult]], mode: Mode) -> Fault:
    async def fault(stack: Stack, node_agent: bool) -> FaultResult:
        return await run(stack, node_agent, mode)

    return fault


BOTH, ALONE, AGENT = (False, True), (False,), (True,)  # without and with the node agent, or one
# name -> (the fault, the ways it runs: without the node agent, with it)
FAULTS: dict[str, tuple[Fault, tuple[bool, ...]]] = {
    "sidecar-sigterm": (_signal(signal.SIGTERM), BOTH),
    "sidecar-sigkill": (_signal(signal.SIGKILL), BOTH),
    "sidecar-oom-kill": (sidecar_oom_kill, BOTH),
    "sidecar-sigstop": (sidecar_freeze, BOTH),
    "agent-sigterm": (_agent(signal.SIGTERM), AGENT),
    "agent-sigkill": (_agent(signal.SIGKILL), AGENT),
    "engine-kill-restart": (engine_kill_restart, ALONE),
    "engine-sigstop": (engine_freeze, ALONE),
    "gpu-endpoint-hang": (_mode(gpu_endpoint, Mode.HANG), BOTH),
    "gpu-endpoint-error": (_mode(gpu_endpoint, Mode.ERROR), BOTH),
    "metrics-malformed": (_mode(metrics_page, Mode.GARBAGE), ALONE),
    "metrics-huge": (_mode(metrics_page, Mode.HUGE), ALONE),
    "slowloris": (slowloris, ALONE),
    "body-flood": (body_flood, ALONE),
    "streams-1000": (many_streams, ALONE),
    "client-disconnects": (client_disconnects, ALONE),
    "forbidden-paths": (forbidden_paths, ALONE),
}
