"""What the coordinator needs from the place engines run: start, check, route to, read and stop by size.

Every action is idempotent, so the coordinator may repeat one after a failure or a restart:
starting a size that runs, routing to the size already routed to and stopping a size that is
gone all succeed without doing anything. State lives in the backend (on Kubernetes: the
Deployments' replicas and the Service's selector), so a restarted coordinator asks it where
things stand instead of remembering.
"""

from __future__ import annotations

from typing import Protocol

from agent.coordinator.load import EngineLoad


class BackendError(RuntimeError):
    """The backend could not do what was asked; the coordinator retries on its next tick."""


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
