import pytest

from agent.catalog import gpu_spec
from agent.twin.gpu import EngineGpus, UnsupportedClockError
from agent.twin.latency import IterationCost

A100 = gpu_spec("a100-sxm4-80gb")


def test_clock_change_takes_effect_after_the_delay():
    gpu = EngineGpus(A100, clock_change_delay_s=0.005)
    gpu.lock_sm_clock_mhz(1050, now_s=1.0)
    assert gpu.busy_clock_mhz(1.004) == 1410
    assert gpu.busy_clock_mhz(1.005) == 1050
    gpu.reset_sm_clock(now_s=2.0)
    assert gpu.locked_clock_mhz(2.001) == 1050
    assert gpu.locked_clock_mhz(2.006) is None
    assert gpu.clock_changes == 2


def test_repeated_requests_are_not_changes():
    gpu = EngineGpus(A100, clock_change_delay_s=0.0)
    for t in range(5):
        gpu.lock_sm_clock_mhz(1200, now_s=float(t))
    gpu.busy_clock_mhz(10.0)
    assert gpu.clock_changes == 1


def test_unsupported_clock_is_refused():
    with pytest.raises(UnsupportedClockError, match="1051 MHz is not a supported SM clock"):
        EngineGpus(A100).lock_sm_clock_mhz(1051, now_s=0.0)


def test_energy_only_grows_and_idle_respects_pending_change():
    gpu = EngineGpus(A100, clock_change_delay_s=0.5)
    gpu.run_idle(0.0, 1.0)
    stock_idle = gpu.energy_j
    assert stock_idle == pytest.approx(A100.idle_w)
    gpu.lock_sm_clock_mhz(1410, now_s=1.0)
    gpu.run_idle(1.0, 2.0)  # half stock, half locked at max
    locked = gpu.power.idle_w(1410)
    assert gpu.energy_j - stock_idle == pytest.approx(0.5 * A100.idle_w + 0.5 * locked)
    before = gpu.energy_j
    gpu.run_busy(1410, 0.02, IterationCost(0.02, 1.0, 0.2))
    assert gpu.energy_j > before
    with pytest.raises(ValueError, match="backwards"):
        gpu.run_idle(3.0, 2.0)


def test_an_engine_of_n_gpus_spends_n_times_what_one_gpu_does():
    one, four = EngineGpus(A100, 1, 0.0), EngineGpus(A100, 4, 0.0)
    cost = IterationCost(0.02, 0.9, 0.3, 0.1)
    for gpus in (one, four):
        gpus.run_idle(0.0, 1.0)
        gpus.lock_sm_clock_mhz(1050, now_s=1.0)
        gpus.run_busy(1050, 0.02, cost)
        gpus.run_idle(1.02, 2.0)
    assert four.energy_j == pytest.approx(4 * one.energy_j)
    assert four.idle_w(2.0) == pytest.approx(4 * one.idle_w(2.0))
    assert four.clock_changes == one.clock_changes == 1  # one lock moves every GPU
