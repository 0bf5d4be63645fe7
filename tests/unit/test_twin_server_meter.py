"""Reading the twin GPU's energy, power and utilisation at arbitrary instants."""

import pytest

from agent.catalog import gpu_spec
from agent.twin.gpu import EngineGpus
from agent.twin.latency import IterationCost
from agent.twin.server.meter import GpuMeter

SPEC = gpu_spec("a100-sxm4-80gb")
COST = IterationCost(time_s=0.01, busy_fraction=0.8, compute_share=0.2)


def busy(meter: GpuMeter, start: float, duration: float) -> float:
    """Run one iteration as the driver does; returns its power."""
    power = meter.gpu.run_busy(SPEC.max_clock_mhz, duration, COST)
    meter.busy(start, start + duration, power, COST.busy_fraction)
    return power


def test_energy_rises_through_an_iteration_and_through_idle_time():
    meter = GpuMeter(EngineGpus(SPEC))
    idle_w = SPEC.idle_w
    assert meter.energy_j(1.0) == pytest.approx(idle_w * 1.0)
    power = busy(meter, 1.0, 0.5)
    assert meter.energy_j(1.25) == pytest.approx(idle_w + power * 0.25)
    assert meter.energy_j(1.5) == pytest.approx(idle_w + power * 0.5)
    meter.go_idle()
    assert meter.energy_j(3.5) == pytest.approx(idle_w * 3.0 + power * 0.5)
    readings = [meter.energy_j(t) for t in (3.6, 3.7, 3.8)]
    assert readings == sorted(readings) and readings[0] < readings[-1]


def test_a_late_driver_does_not_book_energy_twice():
    meter = GpuMeter(EngineGpus(SPEC))
    power = busy(meter, 0.0, 0.1)
    # The clock is past the iteration's end but the driver has not started the next one yet.
    assert meter.energy_j(0.3) == pytest.approx(power * 0.1)
    busy(meter, 0.1, 0.1)
    assert meter.gpu.energy_j == pytest.approx(2 * power * 0.1)


def test_power_and_utilization_are_time_weighted_means_over_the_window():
    meter = GpuMeter(EngineGpus(SPEC))
    power = busy(meter, 0.0, 0.4)
    meter.go_idle()
    # Window [0.2, 0.6]: half busy, half idle.
    assert meter.power_w(0.6, 0.4) == pytest.approx((power + SPEC.idle_w) / 2)
    assert meter.utilization(0.6, 0.4) == pytest.approx(COST.busy_fraction / 2)
    # A window longer than the history averages over what there is.
    assert meter.power_w(0.6, 10.0) == pytest.approx((power * 0.4 + SPEC.idle_w * 0.2) / 0.6)


def test_idle_power_follows_a_lock_booked_up_to_the_change():
    gpu = EngineGpus(SPEC, clock_change_delay_s=0.0)
    meter = GpuMeter(gpu)
    meter.settle(1.0)
    gpu.lock_sm_clock_mhz(SPEC.max_clock_mhz, 1.0)
    locked_idle_w = gpu.power.idle_w(SPEC.max_clock_mhz)
    assert locked_idle_w > SPEC.idle_w
    assert meter.energy_j(2.0) == pytest.approx(SPEC.idle_w + locked_idle_w)
    assert meter.power_w(2.0, 0.5) == pytest.approx(locked_idle_w)


def test_a_fresh_meter_reports_idle_power_and_no_utilization():
    meter = GpuMeter(EngineGpus(SPEC))
    assert meter.power_w(0.0, 0.1) == SPEC.idle_w
    assert meter.utilization(0.0, 0.1) == 0.0
