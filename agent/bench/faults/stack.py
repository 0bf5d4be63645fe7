"""One stack the fault suite breaks: twin, fault proxies, optional node agent, sidecar — real processes.

    client ──> sidecar gateway ──> twin (Triton API)
               sidecar loop ────> metrics proxy ──> twin metrics port
               sidecar actuator ─> [node agent ─>] GPU proxy ──> twin GPU endpoint (stands for NVML)

The proxies run in this process (`proxy.FaultProxy`), so a fault can make the GPU endpoint or
the metrics page hang, fail or lie without touching the twin, and so the suite sees every clock
request the sidecar (or the node agent) made, even while the twin cannot answer. The twin keeps
fixed ports, so it can be killed and started again where the sidecar expects it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from agent.bench.faults.proxy import FaultProxy, Mode
from agent.bench.processes import (
    NodeAgent,
    ProcessGroup,
    Sidecar,
    SidecarSpec,
    Twin,
    free_port,
    start_node_agent,
    start_sidecar,
    start_twin,
)
from agent.bench.scrape import get_json, get_page
from agent.gpus.twin import LOCK_PATH
from agent.shipped import SHIPPED_MODELS_DIR
from agent.twin.setup import TwinSetup

POLL_S = 0.02
LEASE_TTL_S = 1.0  # the node agent's default: a frozen holder's lease lapses after this


@dataclass(frozen=True, slots=True)
class StackConfig:
    """What every stack of one suite run shares."""

    setup: TwinSetup
    log_dir: Path
    models_dir: Path = SHIPPED_MODELS_DIR
    locked_mhz: int = 0  # the clock the sidecar holds (policy static:<MHz>); 0: a low supported one
    poll_interval_ms: int = 50
    telemetry_stale_s: float = 1.0
    sidecar_settings: dict[str, str] = field(default_factory=dict)  # more THROTTLLEM_* for the sidecar

    @property
    def clock_mhz(self) -> int:
        """The lock the sidecar is asked to hold: well below the max, so a reset is visible."""
        if self.locked_mhz:
            return self.locked_mhz
        gpu = self.setup.gpu
        usable = [mhz for mhz in gpu.sm_clocks_mhz if mhz >= gpu.calibrated_clock_floor_mhz]
        return usable[len(usable) // 2]

    @property
    def stale_bound_s(self) -> float:
        """How soon after its last fresh telemetry the sidecar must ask for stock clocks."""
        return self.telemetry_stale_s + self.poll_interval_ms / 1000.0


@dataclass(slots=True)
class Stack:
    """The running parts and the client's view of them."""

    config: StackConfig
    group: ProcessGroup
    twin: Twin
    twin_ports: tuple[int, int]
    gpu_proxy: FaultProxy
    metrics_proxy: FaultProxy
    session: aiohttp.ClientSession
    socket_dir: Path  # short, for the node agents' sockets (a socket path has 108 bytes at most)
    agent: NodeAgent | None = None
    sidecar: Sidecar | None = None

    # -- the GPU, as the twin reports it (never through the proxy) ---------------------------

    async def locked_mhz(self) -> int | str | None:
        """The twin GPU's lock now: MHz, None at stock, or "unknown" when the twin cannot say."""
        state = await get_json(self.session, self.twin.gpu_url)
        if state is None:
            return "unknown"
        locked = state.get("locked_clock_mhz")
        return None if locked is None else int(locked)

    async def wait_locked(self, mhz: int, timeout_s: float = 20.0) -> float | None:
        """Seconds until the twin GPU is locked to `mhz`; None if it is not within `timeout_s`."""

        async def locked() -> bool:
            return await self.locked_mhz() == mhz

        return await seconds_until(locked, timeout_s)

    async def wait_stock(self, timeout_s: float) -> float | None:
        """Seconds until the twin GPU runs at stock clocks; None if not within `timeout_s`."""

        async def stock() -> bool:
            return await self.locked_mhz() is None

        return await seconds_until(stock, timeout_s)

    def reset_requested_after(self, since_s: float) -> float | None:
        """Seconds from `since_s` to the first clock reset the GPU proxy received (None: none)."""
        resets = self.gpu_proxy.requests_since(since_s, "DELETE")
        return None if not resets else resets[0].at_s - since_s

    # -- the sidecar --------------------------------------------------------------------------

    @property
    def live_sidecar(self) -> Sidecar:
        """The sidecar started last (a fault that needs one fails loudly without it)."""
        if self.sidecar is None:
            raise RuntimeError("no sidecar running in this stack")
        return self.sidecar

    async def ready(self) -> bool:
        """/readyz answers 200."""
        try:
            async with self.session.get(
                f"{self.live_sidecar.url}/readyz", timeout=aiohttp.ClientTimeout(total=1.0)
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_ready(self, timeout_s: float = 20.0) -> float | None:
        """Seconds until /readyz answers 200; None if not within `timeout_s`."""
        return await seconds_until(self.ready, timeout_s)

    async def sidecar_gauge(self, name: str) -> float | None:
        """One unlabelled sample of the sidecar's /metrics page."""
        page = await get_page(self.session, self.live_sidecar.metrics_url)
        return None if page is None else page.value(name)

    async def start_sidecar(self, node_agent: bool, nofile: int | None = None) -> Sidecar:
        """`throttllem run`, policy static:<clock>, via the proxy (or the agent); `nofile`: its fd cap."""
        config = self.config
        settings = {
            "TWIN_URL": self.gpu_proxy.url,
            "ENGINE_METRICS_URL": f"{self.metrics_proxy.url}/metrics",
            "POLL_INTERVAL_MS": str(config.poll_interval_ms),
            "TELEMETRY_STALE_S": repr(config.telemetry_stale_s),
            "SHUTDOWN_TIMEOUT_S": "8",
            **config.sidecar_settings,
        }
        if node_agent:
            if self.agent is None:
                raise RuntimeError("start the node agent before a sidecar that uses it")
            settings |= {
                **self.agent.sidecar_settings(),
                "POD_NAMESPACE": "faults",
                "POD_NAME": "sidecar",
                "POD_UID": "00000000-0000-0000-0000-000000000001",
            }
        spec = SidecarSpec(
            policy=f"static:{config.clock_mhz}",
            models_dir=config.models_dir,
            settings=settings,
            inherit_otel=False,
            nofile=nofile,
        )
        self.sidecar = await start_sidecar(self.group, self.twin, config.setup, spec)
        return self.sidecar

    # -- the node agent -----------------------------------------------------------------------

    async def start_agent(self, socket_path: Path | None = None) -> NodeAgent:
        """`throttllem node` with the twin backend (the GPU proxy), no pod check.

        `socket_path`: where a restarted agent listens, its predecessor's, where the sidecar looks.
        """
        if socket_path is None:
            socket_path = self.socket_dir / f"node-{len(self.group.children)}.sock"
        agent = await start_node_agent(
            self.group,
            [self.gpu_proxy.url],
            socket_path,
            name=f"node-{len(self.group.children)}",
            lease_ttl_s=LEASE_TTL_S,
        )
        self.agent = agent
        return agent

    async def clear(self) -> None:
        """Back to a bare stack for the next fault: sidecar and agent stopped, twin up and at stock."""
        for child in (
            None if self.sidecar is None else self.sidecar.child,
            None if self.agent is None else self.agent.child,
        ):
            if child is not None and child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGCONT)
                await child.stop()
        self.sidecar, self.agent = None, None
        for proxy in (self.gpu_proxy, self.metrics_proxy):
            proxy.mode = Mode.PASS
            proxy.seen.clear()
        if self.twin.child.running:
            self.twin.child.process.send_signal(signal.SIGCONT)
        else:
            await self.restart_twin()
        async with self.session.delete(f"{self.twin.http_url}{LOCK_PATH}") as response:
            response.raise_for_status()

    # -- the engine ---------------------------------------------------------------------------

    async def restart_twin(self) -> Twin:
        """A new twin on the same ports (the old one must have exited)."""
        http_port, metrics_port = self.twin_ports
        self.twin = await start_twin(
            self.group,
            self.config.setup,
            name=f"twin-{len(self.group.children)}",
            http_port=http_port,
            metrics_port=metrics_port,
            metrics_interval_ms=100.0,
        )
        return self.twin


async def seconds_until(done: Callable[[], Awaitable[bool]], timeout_s: float) -> float | None:
    """Seconds until `done()` is true, checked every POLL_S; None if not within `timeout_s`."""
    began = time.monotonic()
    while time.monotonic() - began <= timeout_s:
        if await done():
            return time.monotonic() - began
        await asyncio.sleep(POLL_S)
    return None


@contextlib.asynccontextmanager
async def open_stack(config: StackConfig, group: ProcessGroup) -> AsyncIterator[Stack]:
    """Twin and proxies up; sidecar and agent are started by each fault as it needs them."""
    ports = (free_port(), free_port())
    twin = await start_twin(
        group, config.setup, http_port=ports[0], metrics_port=ports[1], metrics_interval_ms=100.0
    )
    gpu_proxy = await FaultProxy(twin.http_url).start()
    metrics_proxy = await FaultProxy(twin.metrics_url.removesuffix("/metrics")).start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
    sockets = tempfile.TemporaryDirectory(prefix="throttllem-faults-")
    try:
        yield Stack(config, group, twin, ports, gpu_proxy, metrics_proxy, session, Path(sockets.name))
    finally:
        sockets.cleanup()
        await session.close()
        await gpu_proxy.close()
        await metrics_proxy.close()


class RssPeak:
    """Samples a process's resident set in the background; `peak_mb` is the largest seen."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        self._process = psutil.Process(pid)
        self._every_s = every_s
        self.peak_bytes = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssPeak:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def peak_mb(self) -> float:
        """Largest resident set seen, in MiB."""
        return self.peak_bytes / (1024 * 1024)

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            await asyncio.sleep(self._every_s)
