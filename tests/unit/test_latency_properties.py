"""Properties every iteration-time model must have, whatever its calibration.

More work never takes less time, a higher clock is never slower: the clock search and the
admission check rely on both, and a twin that breaks them rewards the wrong decisions.
"""

import functools
import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.catalog import GPUS, MODELS
from agent.twin.latency import LatencyModel
from agent.twin.memory import EngineConfig, ModelDoesNotFitError, kv_cache_blocks

MAX_TOKENS = 8192


def _fits(gpu: str, model: str, tp: int) -> bool:
    try:
        kv_cache_blocks(GPUS[gpu], MODELS[model], tp, EngineConfig())
    except ModelDoesNotFitError:
        return False
    return True


SETUPS = [
    (gpu, model, tp)
    for gpu, model, tp in itertools.product(sorted(GPUS), sorted(MODELS), (1, 2, 4, 8))
    if _fits(gpu, model, tp)
]


@functools.cache
def _latency(gpu: str, model: str, tp: int) -> LatencyModel:
    return LatencyModel(GPUS[gpu], MODELS[model], tp, MAX_TOKENS)


setups = st.sampled_from(SETUPS)


def _clock(setup: tuple[str, str, int]) -> st.SearchStrategy[int]:
    return st.sampled_from(GPUS[setup[0]].sm_clocks_mhz)


def test_every_catalog_model_has_setups_to_check():
    assert {model for _, model, _ in SETUPS} == set(MODELS)
    assert {tp for _, _, tp in SETUPS} == {1, 2, 4, 8}


@settings(max_examples=300, deadline=None)
@given(setups, st.data())
def test_decode_time_never_falls_with_batch(setup, data):
    latency = _latency(*setup)
    clock = data.draw(_clock(setup))
    per_request_context = data.draw(st.integers(1, 4096))
    batch = np.arange(1, 513)
    times = latency.decode_time_s(np.full(batch.shape, clock), batch, batch * per_request_context)
    assert np.all(np.diff(times) >= 0), np.flatnonzero(np.diff(times) < 0)[:5] + 1


@settings(max_examples=300, deadline=None)
@given(setups, st.data())
def test_decode_time_never_falls_with_context(setup, data):
    latency = _latency(*setup)
    clock = data.draw(_clock(setup))
    batch = data.draw(st.integers(1, 512))
    context = np.sort(np.asarray(data.draw(st.lists(st.integers(0, 2_000_000), min_size=2, max_size=20))))
    times = latency.decode_time_s(np.full(context.shape, clock), np.full(context.shape, batch), context)
    assert np.all(np.diff(times) >= 0)


@settings(max_examples=200, deadline=None)
@given(setups, st.data())
def test_prefill_time_never_falls_with_prompt_tokens(setup, data):
    latency = _latency(*setup)
    clock = data.draw(_clock(setup))
    past = data.draw(st.integers(0, 4096))
    decodes = data.draw(st.integers(0, 64))
    chunks = sorted(data.draw(st.lists(st.integers(1, MAX_TOKENS - decodes), min_size=2, max_size=12)))
    times = [latency.iteration(clock, decodes, decodes * 512, [(c, past)]).time_s for c in chunks]
    assert all(a <= b for a, b in itertools.pairwise(times))


@settings(max_examples=100, deadline=None)
@given(setups, st.integers(0, 256), st.integers(0, MAX_TOKENS // 2))
def test_a_higher_clock_is_never_slower(setup, decodes, prefill):
    latency = _latency(*setup)
    if decodes + prefill == 0:
        decodes = 1
    chunks = [(prefill, 0)] if prefill else []
    clocks = sorted(GPUS[setup[0]].sm_clocks_mhz)
    times = [latency.iteration(f, decodes, decodes * 1024, chunks).time_s for f in clocks]
    assert all(a >= b for a, b in itertools.pairwise(times))
