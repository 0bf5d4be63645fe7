"""Per-request energy, as the sidecar attributes it: the client half of its request-energy endpoint.

The gateway names every request it proxies in the `X-Throttllem-Request-Id` response header; the
sidecar's HTTP port (the one with /metrics) answers `GET /v1/requests/{id}/energy` with

    200 {"request_id": "...", "energy_j": <float>, "tokens": <int>, "final": <bool>}
    404 {"error": "..."}                         (an id it does not know, or no longer keeps)

`final` is false until the control tick after the request finished has been attributed, so a
finished request is polled every POLL_S until final, for at most DEADLINE_S. Anything but a
final figure in time (404, a figure still growing, an unreachable sidecar, a body that is not
the contract) is None: an unknown energy, never a partial one passed off as whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp

REQUEST_ID_HEADER = "X-Throttllem-Request-Id"
POLL_S = 0.05  # a control tick is 100 ms by default: final within two ticks of the answer
DEADLINE_S = 1.0  # per request, from its answer
READ_TIMEOUT_S = 1.0  # one GET
MAX_BODY_BYTES = 4096  # the answer is a few dozen bytes; more is not the contract


class RequestEnergyReader:
    """Reads finished requests' energy from one sidecar, many at once over one connection pool."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        poll_s: float = POLL_S,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._poll_s = poll_s
        self._deadline_s = deadline_s

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, base_url: str | None) -> AsyncIterator[RequestEnergyReader | None]:
        """A reader of the sidecar at `base_url` (None: no reader), its session closed on the way out."""
        if base_url is None:
            yield None
            return
        timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            yield cls(session, base_url)

    async def energy_j(self, request_id: str | None) -> float | None:
        """The request's final attributed energy; None when it has no id or is not final in time."""
        if request_id is None:
            return None
        url = f"{self._base_url}/v1/requests/{quote(request_id, safe='')}/energy"
        deadline = time.monotonic() + self._deadline_s
        while True:
            reading = await self._read(url)
            if reading is None:
                return None
            energy_j, final = reading
            if final:
                return energy_j
            if time.monotonic() + self._poll_s > deadline:
                return None
            await asyncio.sleep(self._poll_s)

    async def _read(self, url: str) -> tuple[float, bool] | None:
        """(energy, final) from one GET; None when there is no usable answer."""
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    return None
                body = await response.content.read(MAX_BODY_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError):
            return None
        if len(body) > MAX_BODY_BYTES:
            return None
        try:
            document = json.loads(body)
        except ValueError:
            return None
        return parse_energy(document)


def parse_energy(document: object) -> tuple[float, bool] | None:
    """(energy_j, final) from an endpoint answer; None unless it is the documented shape."""
    if not isinstance(document, dict):
        return None
    energy_j, final = document.get("energy_j"), document.get("final")
    if isinstance(energy_j, bool) or not isinstance(energy_j, int | float) or not isinstance(final, bool):
        return None
    if not (math.isfinite(energy_j) and energy_j >= 0):
        return None
    return float(energy_j), final
