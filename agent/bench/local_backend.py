"""The coordinator's local backend: one `twin serve` + `throttllem run` pair per engine size, on loopback.

What a Deployment per size and a Service are on Kubernetes, processes and a `Router` are here:

- `start(size)` launches the twin of that size and its sidecar in the background (the cold
  start is their start-up); `is_ready(size)` is true once both announced their ports;
- `route_to(size)` points the router at that sidecar's gateway;
- `load(size)` reads that sidecar's /metrics (`agent.coordinator.load`);
- `stop(size)` sends the sidecar SIGTERM first — it resets the GPU's clocks as it exits — then
  the twin.

Every action is idempotent, as `agent.coordinator.backend` requires. The processes belong to a
`ProcessGroup`, so whatever happens they are all stopped when the group ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bench.processes import ProcessGroup, Sidecar, SidecarSpec, Twin, start_sidecar, start_twin
from agent.bench.router import Router
from agent.coordinator.backend import BackendError, SidecarLoadReader
from agent.coordinator.http_api import build_coordinator_app
from agent.coordinator.load import EngineLoad
from agent.coordinator.service import Coordinator, wait_period
from agent.sidecar.app import listen
from agent.twin.setup import TwinSetup

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LocalEngine:
    """One size's processes, once started."""

    size: int
    starting: asyncio.Task[tuple[Twin, Sidecar]]
    twin: Twin | None = None
    sidecar: Sidecar | None = None
    stopped: bool = False


@dataclass(slots=True)
class LocalBackend:
    """Engines of `setups` (one per TP size) as processes, behind `router`."""

    group: ProcessGroup
    setups: dict[int, TwinSetup]
    sidecar: SidecarSpec
    router: Router
    time_scale: float = 1.0  # the twins' wall time per engine second (see `twin serve --time-scale`)
    # Called with an engine whose sidecar has stopped and whose twin still runs (a last reading).
    on_stopping: Callable[[LocalEngine], Awaitable[None]] | None = None
    engines: dict[int, LocalEngine] = field(default_factory=dict)
    routed: int | None = None
    _sidecars: SidecarLoadReader = field(default_factory=SidecarLoadReader)

    async def routed_size(self) -> int | None:
        """The size the router points at."""
        return self.routed

    async def running_sizes(self) -> tuple[int, ...]:
        """Sizes started and not stopped."""
        return tuple(sorted(self.engines))

    async def start(self, size: int) -> None:
        """Launch the size's twin and sidecar in the background (nothing if it runs already)."""
        if size not in self.setups:
            raise BackendError(f"no engine of tp{size} in this pool ({sorted(self.setups)})")
        if size in self.engines:
            return
        task = asyncio.create_task(self._launch(size), name=f"start-tp{size}")
        self.engines[size] = LocalEngine(size, task)

    async def _launch(self, size: int) -> tuple[Twin, Sidecar]:
        setup = self.setups[size]
        twin = await start_twin(self.group, setup, name=f"twin-tp{size}", time_scale=self.time_scale)
        sidecar = await start_sidecar(self.group, twin, setup, self.sidecar, name=f"sidecar-tp{size}")
        return twin, sidecar

    async def is_ready(self, size: int) -> bool:
        """Whether the size's twin and sidecar both announced their ports."""
        engine = self.engines.get(size)
        if engine is None or not engine.starting.done():
            return False
        if engine.starting.cancelled() or engine.starting.exception() is not None:
            log.error("tp%d did not start: %s", size, engine.starting.exception())
            return False
        engine.twin, engine.sidecar = engine.starting.result()
        return engine.sidecar.child.running and engine.twin.child.running

    async def route_to(self, size: int) -> None:
        """Point the router at the size's gateway."""
        sidecar = self._sidecar(size)
        if sidecar.gateway_url is None:
            raise BackendError(f"the sidecar of tp{size} runs without a gateway: nothing to route to")
        self.router.point_at(sidecar.gateway_url)
        self.routed = size

    async def load(self, size: int) -> EngineLoad:
        """The size's sidecar's load figures."""
        return await self._sidecars.read(self._sidecar(size).metrics_url)

    async def stop(self, size: int) -> None:
        """Stop the size's sidecar (it resets the clocks), then its twin; nothing if it is gone."""
        engine = self.engines.pop(size, None)
        if engine is None:
            return
        if not engine.starting.done():
            engine.starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            engine.twin, engine.sidecar = await engine.starting
        if engine.sidecar is not None:
            await engine.sidecar.child.stop()
        if engine.twin is not None:
            if self.on_stopping is not None:
                await self.on_stopping(engine)
            await engine.twin.child.stop()
        engine.stopped = True

    async def close(self) -> None:
        """Close the HTTP session (the group stops the processes)."""
        await self._sidecars.close()

    def _sidecar(self, size: int) -> Sidecar:
        engine = self.engines.get(size)
        if engine is None or engine.sidecar is None:
            raise BackendError(f"tp{size} is not running")
        return engine.sidecar


async def serve_local(
    coordinator_for: Callable[[LocalBackend], Coordinator],
    setups: dict[int, TwinSetup],
    sidecar: SidecarSpec,
    *,
    log_dir: Path,
    period_s: float,
    ready_poll_s: float,
    host: str,
    port: int,
    router_host: str,
    router_port: int,
    announce: Callable[[dict[str, Any]], None],
) -> None:
    """The coordinator on the local backend until cancelled; every engine process stops on the way out."""
    router = Router()
    async with contextlib.AsyncExitStack() as stack:
        group = await stack.enter_async_context(ProcessGroup(log_dir))
        backend = LocalBackend(group, setups, sidecar, router)
        stack.push_async_callback(backend.close)
        coordinator = coordinator_for(backend)
        ports = {
            "port": await listen(build_coordinator_app(coordinator), host, port, stack, access_log=None),
            "router_port": await listen(router.app(), router_host, router_port, stack, access_log=None),
        }
        await coordinator.start()
        announce(ports)
        while True:
            await wait_period(coordinator, period_s, asyncio.sleep, ready_poll_s)
            await coordinator.tick()
