"""A clock change that takes effect while an iteration runs applies from then on, as on a real GPU."""

import pytest

from agent.catalog import gpu_spec, model_spec
from agent.control.policies import StaticPolicy
from agent.domain import Request
from agent.sim.loop import simulate
from agent.twin.engine import Batch
from agent.twin.gpu import EngineGpus
from agent.twin.power import PowerModel
from agent.twin.setup import TwinSetup
from agent.twin.step import Jitter, run_on_gpu

A100 = gpu_spec("a100-sxm4-80gb")
SETUP = TwinSetup(A100, model_spec("llama3-8b"))
PREFILL = Batch(
    iteration=0, decode_seqs=8, decode_context_tokens=8_000, prefill_chunks=((8000, 0),), context=()
)


def run(gpus: EngineGpus, start_s: float = 1.0):
    return run_on_gpu(gpus, SETUP.latency_model(), PREFILL, start_s, Jitter(0.0, 0))


def test_a_raise_that_lands_mid_prefill_runs_the_rest_of_it_at_the_new_clock():
    latency, power = SETUP.latency_model(), PowerModel(A100)
    slow = latency.iteration(600, 8, 8_000, [(8000, 0)])
    fast = latency.iteration(1410, 8, 8_000, [(8000, 0)])
    gpus = EngineGpus(A100, clock_change_delay_s=0.005)
    gpus.lock_sm_clock_mhz(600, 0.0)
    gpus.lock_sm_clock_mhz(1410, 1.0)  # asked as the iteration starts: in force 5 ms into it
    iteration = run(gpus)
    tail_s = (1 - 0.005 / slow.time_s) * fast.time_s
    assert iteration.duration_s == pytest.approx(0.005 + tail_s)
    assert iteration.clock_mhz == 1410 and iteration.cost == fast
    assert gpus.energy_j == pytest.approx(power.busy_w(600, slow) * 0.005 + power.busy_w(1410, fast) * tail_s)
    assert (
        slow.time_s > 2 * iteration.duration_s
    )  # held at 600 MHz it would have taken more than twice as long


def test_a_change_after_the_iteration_leaves_it_alone():
    gpus = EngineGpus(A100, clock_change_delay_s=5.0)
    gpus.lock_sm_clock_mhz(600, 1.0)  # in force at 6 s, after the iteration has ended
    iteration = run(gpus)
    alone = run(EngineGpus(A100, clock_change_delay_s=0.0))
    assert (iteration.clock_mhz, iteration.duration_s) == (1410, alone.duration_s)


def test_a_lowering_mid_iteration_slows_its_rest():
    gpus = EngineGpus(A100, clock_change_delay_s=0.010)
    gpus.lock_sm_clock_mhz(600, 1.0)
    iteration = run(gpus)
    full_speed = run(EngineGpus(A100, clock_change_delay_s=0.0))
    assert iteration.clock_mhz == 600 and iteration.duration_s > full_speed.duration_s


def test_a_static_lock_lands_inside_the_first_iteration():
    requests = [Request(i, 0.0, 4000, 64, 32) for i in range(4)]
    result = simulate(SETUP, StaticPolicy(600), requests)
    assert set(result.clock_mhz) == {600}  # the first iteration starts unlocked and ends at the lock
