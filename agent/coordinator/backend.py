"""What the coordinator needs from the place engines run: start, check, route to, read and stop by size.

Every action is idempotent, so the coordinator may repeat one after a failure or a restart:
starting a size that runs, routing to the size already routed to and stopping a size that is
gone all succeed without doing anything. State lives in the backend (on Kubernetes: the
Deployments' replicas and the Service's selector), so a restarted coordinator asks it where
things stand instead of remembering.
"""

from __future__ import annotations

from typing import Protocol

import aiohttp

from agent.coordinator.load import EngineLoad, LoadUnreadableError, parse_load

READ_TIMEOUT_S = 5.0  # a sidecar that does not answer within this is unreadable this period


class BackendError(RuntimeError):
    """The backend could not do what was asked; the coordinator retries on its next tick."""


class SidecarLoadReader:
    """Reads engines' load from their sidecars' /metrics pages, over one HTTP session."""

    def __init__(self, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def read(self, url: str) -> EngineLoad:
        """The load figures at `url`; BackendError when they cannot be read."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            async with self._session.get(url) as response:
                response.raise_for_status()
                return parse_load(await response.text())
        except (aiohttp.ClientError, TimeoutError, LoadUnreadableError) as err:
            raise BackendError(f"could not read the load at {url}: {err}") from err

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()


class ScaleBackend(Protocol):
    """Engines of one model, one per tensor-parallel size, behind one route."""

    async def routed_size(self) -> int | None:
        """The size traffic goes to now; None when nothing is routed yet."""
        ...

    async def running_sizes(self) -> tuple[int, ...]:
        """Sizes with an engine started (ready or not)."""
        ...

    async def start(self, size: int) -> None:
        """Start the engine of `size` (its GPUs, its sidecar), in the background."""
        ...

    async def is_ready(self, size: int) -> bool:
        """Whether the engine of `size` serves: its pods or processes report ready."""
        ...

    async def route_to(self, size: int) -> None:
        """Send new requests to the engine of `size`."""
        ...

    async def load(self, size: int) -> EngineLoad:
        """The load its sidecar reports; BackendError when it cannot be read."""
        ...

    async def stop(self, size: int) -> None:
        """Stop the engine of `size`: its sidecar resets its GPUs as it goes."""
        ...
