"""Energy readings for /metrics, taken on their own schedule so a slow meter never delays control.

A meter read is I/O (an NVML call in a thread, an HTTP scrape of dcgm-exporter or the twin), and
energy only feeds metrics, so it is sampled once a second rather than every control period. A
failing meter is logged when its error changes and counted; the last good reading is kept.
"""

from __future__ import annotations

import asyncio
import logging

from agent.gpus.base import Meter

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0


class EnergySampler:
    """The latest energy and power of one meter (None until read, or without a meter)."""

    def __init__(self, meter: Meter | None, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.meter = meter
        self.interval_s = interval_s
        self.energy_j: float | None = None  # joules since the meter was opened
        self.power_w: float | None = None
        self.errors = 0  # failed reads since start
        self._last_error: str | None = None

    async def sample(self) -> None:
        """Read the meter once."""
        if self.meter is None:
            return
        try:
            energy_j, power_w = await self.meter.energy_j(), await self.meter.power_w()
        except Exception as exc:  # energy only feeds metrics: no meter failure may stop the sidecar
            self.errors += 1
            if str(exc) != self._last_error:
                log.warning("energy meter %s: %s", self.meter.name, exc)
            self._last_error = str(exc)
            return
        if self._last_error is not None:
            log.info("energy meter %s readable again", self.meter.name)
        self._last_error = None
        self.energy_j, self.power_w = energy_j, power_w

    async def run(self) -> None:
        """Sample every `interval_s` until cancelled."""
        if self.meter is None:
            return
        while True:
            await self.sample()
            await asyncio.sleep(self.interval_s)
