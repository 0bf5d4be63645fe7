"""DryRunActuator, the shared clock check and energy accumulator, and the factories' kind checks."""

import asyncio

import pytest

from agent.catalog import gpu_spec
from agent.gpus import (
    ACTUATOR_KINDS,
    METER_KINDS,
    DryRunActuator,
    UnsupportedClockError,
    build_actuator,
    build_meter,
)
from agent.gpus.base import EnergyAccumulator, check_supported_clock

A100 = gpu_spec("a100-sxm4-80gb")
H100 = gpu_spec("h100-sxm5-80gb")


class ReadOnlyActuator:
    """Observed by a dry run: reads answer, any write fails the test."""

    name = "fake:GPU-1"
    actuates = True

    def __init__(self) -> None:
        self.closed = False

    async def supported_clocks_mhz(self) -> tuple[int, ...]:
        return (1980, 1500, 1005)

    async def set_clock_mhz(self, mhz: int) -> None:
        raise AssertionError("a dry run must never set a clock")

    async def reset(self) -> None:
        raise AssertionError("a dry run must never reset")

    async def clock_mhz(self) -> int:
        return 1005

    async def close(self) -> None:
        self.closed = True


def test_dry_run_records_decisions_and_counts_would_be_changes():
    async def scenario():
        shadow = DryRunActuator.from_spec(A100)
        seen = []
        for step in (None, 1050, 1050, 900, None, None, 1410):
            await (shadow.reset() if step is None else shadow.set_clock_mhz(step))
            seen.append(shadow.last_decision_mhz)
        return shadow, seen, await shadow.clock_mhz(), await shadow.supported_clocks_mhz()

    shadow, seen, clock, clocks = asyncio.run(scenario())
    assert seen == [None, 1050, 1050, 900, None, None, 1410]
    assert shadow.would_be_changes == 4  # 1050, 900, reset, 1410
    assert shadow.decisions == 7
    assert clock == 1410  # no GPU observed: stock behaviour under load boosts to max
    assert clocks == A100.sm_clocks_mhz
    assert shadow.name == "dryrun:a100-sxm4-80gb" and not shadow.actuates


def test_dry_run_refuses_what_a_real_actuator_would():
    shadow = DryRunActuator.from_spec(H100)
    with pytest.raises(UnsupportedClockError, match="nearest supported: 1980 MHz"):
        asyncio.run(shadow.set_clock_mhz(2000))
    assert shadow.would_be_changes == 0 and shadow.last_decision_mhz is None


def test_dry_run_observes_without_writing_and_closes_what_it_observes():
    observed = ReadOnlyActuator()

    async def scenario():
        shadow = await DryRunActuator.observing(observed)
        await shadow.set_clock_mhz(1500)
        await shadow.reset()
        clock = await shadow.clock_mhz()
        await shadow.close()
        return shadow, clock

    shadow, clock = asyncio.run(scenario())
    assert clock == 1005
    assert shadow.name == "dryrun:fake:GPU-1"
    assert shadow.would_be_changes == 2
    assert observed.closed


def test_clock_check_names_the_nearest_and_the_range():
    check_supported_clock(1050, A100.sm_clocks_mhz, "gpu")
    with pytest.raises(UnsupportedClockError) as info:
        check_supported_clock(1043, A100.sm_clocks_mhz, "gpu")
    assert str(info.value) == (
        "1043 MHz is not a supported SM clock of gpu; nearest supported: 1050 MHz (range 210-1410 MHz)"
    )
    with pytest.raises(UnsupportedClockError, match="nearest supported: 1050 MHz"):
        check_supported_clock(1045, (1050, 1040), "gpu")  # a tie goes up: safer for SLOs


def test_energy_accumulator_is_monotone_across_resets():
    energy = EnergyAccumulator("test")
    totals = [energy.update(c) for c in (500.0, 510.0, 510.0, 3.0, 8.0, 0.0, 1.5)]
    assert totals == pytest.approx([0.0, 10.0, 10.0, 13.0, 18.0, 18.0, 19.5])
    assert energy.resets == 2


def test_factories_list_the_allowed_kinds():
    with pytest.raises(ValueError, match="allowed: nvml, twin, dryrun"):
        asyncio.run(build_actuator("rocm"))
    with pytest.raises(ValueError, match="allowed: nvml, dcgm, twin"):
        asyncio.run(build_meter("rapl"))
    assert ACTUATOR_KINDS == ("nvml", "twin", "dryrun", "node") and METER_KINDS == ("nvml", "dcgm", "twin")


def test_dry_run_factory_needs_a_clock_source():
    shadow = asyncio.run(build_actuator("dryrun", gpu_spec=H100))
    assert isinstance(shadow, DryRunActuator)
    assert asyncio.run(shadow.supported_clocks_mhz())[0] == 1980
    with pytest.raises(ValueError, match="needs uuid or index"):
        asyncio.run(build_actuator("dryrun"))
