"""Energy sampling for /metrics: a failing meter is counted and never stops anything."""

import asyncio

from agent.gpus import TransientGpuError
from agent.sidecar.energy import EnergySampler


class FlakyMeter:
    name = "flaky"

    def __init__(self) -> None:
        self.readings = [10.0, RuntimeError("exporter restarting"), TransientGpuError("no data"), 25.0]

    async def energy_j(self) -> float:
        reading = self.readings.pop(0)
        if isinstance(reading, Exception):
            raise reading
        return reading

    async def power_w(self) -> float:
        return 300.0

    async def close(self) -> None:
        pass


def test_failures_keep_the_last_reading_and_are_counted():
    async def scenario():
        sampler = EnergySampler(FlakyMeter())
        await sampler.sample()
        assert (sampler.energy_j, sampler.power_w, sampler.errors) == (10.0, 300.0, 0)
        await sampler.sample()
        await sampler.sample()
        assert (sampler.energy_j, sampler.errors) == (10.0, 2)
        await sampler.sample()
        assert sampler.energy_j == 25.0

    asyncio.run(scenario())


def test_without_a_meter_nothing_is_read():
    async def scenario():
        sampler = EnergySampler(None)
        await sampler.run()  # returns at once: no task spins
        assert sampler.energy_j is None and sampler.power_w is None

    asyncio.run(scenario())
