"""Energy readings for /metrics, taken on their own schedule so a slow meter never delays control.

A meter read is I/O (an NVML call in a thread, an HTTP scrape of dcgm-exporter or the twin), and
energy only feeds metrics, so it is sampled once a second rather than every control period. A
failing meter is logged when its error changes and counted; the last good reading is kept.

Each sample, good or failed, is also the tick of per-request energy (`request_energy`): the
ledger charges the energy since the last reading to the requests that processed tokens, and the
requests whose energy became final go to the observers (the histogram, the request spans).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from agent.gpus.base import Meter
from agent.sidecar.request_energy import RequestEnergy, RequestEnergyLedger

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0

SettledObserver = Callable[[Sequence[RequestEnergy]], None]


class EnergySampler:
    """The latest energy and power of one meter (None until read, or without a meter)."""

    def __init__(
        self,
        meter: Meter | None,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        ledger: RequestEnergyLedger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.meter = meter
        self.interval_s = interval_s
        self.ledger = ledger  # per-request energy, ticked by every sample; the tracker's clock
        self.clock = clock
        self.energy_j: float | None = None  # joules since the meter was opened
        self.power_w: float | None = None
        self.errors = 0  # failed reads since start
        self._last_error: str | None = None
        self._observers: list[SettledObserver] = []

    def add_observer(self, observer: SettledObserver) -> None:
        """Call `observer` with the requests whose energy became final; its failures are contained."""
        self._observers.append(observer)

    async def sample(self) -> None:
        """Read the meter once, and tick the ledger with the reading (None when it failed)."""
        if self.meter is None:
            return
        try:
            energy_j, power_w = await self.meter.energy_j(), await self.meter.power_w()
        except Exception as exc:  # energy only feeds metrics: no meter failure may stop the sidecar
            self.errors += 1
            if str(exc) != self._last_error:
                log.warning("energy meter %s: %s", self.meter.name, exc)
            self._last_error = str(exc)
            self._tick(None)
            return
        if self._last_error is not None:
            log.info("energy meter %s readable again", self.meter.name)
        self._last_error = None
        self.energy_j, self.power_w = energy_j, power_w
        self._tick(energy_j)

    def _tick(self, reading_j: float | None) -> None:
        if self.ledger is None:
            return
        settled = self.ledger.tick(reading_j, self.clock())
        if not settled:
            return
        for observer in self._observers:
            try:
                observer(settled)
            except Exception:  # telemetry never breaks anything else
                log.exception("request energy observer %r failed", observer)

    async def run(self) -> None:
        """Sample every `interval_s` until cancelled."""
        if self.meter is None:
            return
        while True:
            await self.sample()
            await asyncio.sleep(self.interval_s)
