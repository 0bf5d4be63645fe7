"""The in-flight-batching engine: invariants under random workloads, and TRT-LLM behaviours."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.domain import Request
from agent.twin.engine import Engine, RequestRejectedError
from agent.twin.memory import EngineConfig, SchedulerPolicy


def drain(engine: Engine, requests: list[Request], step_s: float = 0.01):
    """Run to completion, auditing the running totals after every iteration."""
    pending = sorted(requests, key=lambda r: r.arrival_s)
    now, finished, iterations = 0.0, [], 0
    while pending or engine.has_work():
        while pending and pending[0].arrival_s <= now:
            engine.submit(pending.pop(0))
        batch = engine.schedule()
        assert engine.used_blocks <= engine.kv_blocks
        if batch.tokens == 0:
            assert pending, "stalled with nothing left to arrive"
            now = pending[0].arrival_s
            continue
        assert batch.tokens <= engine.config.max_num_tokens
        assert batch.decode_seqs + len(batch.context) <= engine.config.max_batch_size
        outcome = engine.complete(batch, now, now + step_s)
        assert outcome.end_s > outcome.start_s
        now = outcome.end_s
        finished.extend(outcome.finished)
        audit = engine.audit()
        assert audit["used_blocks"] == engine.used_blocks
        assert audit["decode_context"] == engine.decode_context_tokens
        if engine.config.scheduler is SchedulerPolicy.GUARANTEED_NO_EVICT:
            assert audit["reserved_blocks"] == engine.reserved_blocks <= engine.kv_blocks
        iterations += 1
        assert iterations < 100_000
    assert engine.used_blocks == 0
    return finished


requests_strategy = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=2.0, allow_nan=False),
        st.integers(min_value=1, max_value=300),
        st.integers(min_value=1, max_value=120),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    raw=requests_strategy,
    scheduler=st.sampled_from(list(SchedulerPolicy)),
    chunked=st.booleans(),
    tokens_per_block=st.sampled_from([4, 16, 64]),
    kv_tokens=st.integers(min_value=512, max_value=4096),
    max_batch=st.integers(min_value=1, max_value=16),
    max_num_tokens=st.integers(min_value=64, max_value=1024),
)
def test_invariants_under_random_load(
    raw, scheduler, chunked, tokens_per_block, kv_tokens, max_batch, max_num_tokens
):
    config = EngineConfig(
        max_batch_size=max_batch,
        max_num_tokens=max_num_tokens,
        tokens_per_block=tokens_per_block,
        scheduler=scheduler,
        chunked_context=chunked,
    )
    engine = Engine(config, kv_blocks=kv_tokens // tokens_per_block, max_seq_len=512)
    accepted = []
    requests = [
        Request(i, arrival, prompt, max_tokens=out, output_tokens=out)
        for i, (arrival, prompt, out) in enumerate(raw)
    ]
    runnable = []
    for req in requests:
        probe = Engine(config, engine.kv_blocks, 512)
        try:
            probe.submit(req)
        except RequestRejectedError:
            continue
        runnable.append(req)
    finished = drain(engine, runnable)
    accepted = {f.request.request_id: f for f in finished}
    assert sorted(accepted) == sorted(r.request_id for r in runnable)
    for req in runnable:
        done = accepted[req.request_id]
        assert done.output_tokens == req.output_tokens
        assert req.arrival_s <= done.first_token_s <= done.finish_s
    if scheduler is SchedulerPolicy.GUARANTEED_NO_EVICT:
        assert engine.preemptions == 0


def test_prefill_joins_ongoing_decodes_in_the_same_iteration():
    engine = Engine(EngineConfig(tokens_per_block=16), kv_blocks=1000, max_seq_len=4096)
    engine.submit(Request(0, 0.0, 100, 50, 50))
    engine.complete(engine.schedule(), 0.0, 0.1)
    engine.submit(Request(1, 0.1, 200, 50, 50))
    batch = engine.schedule()
    assert batch.decode_seqs == 1
    assert batch.prefill_chunks == ((200, 0),)


def test_first_token_comes_from_the_prefill_iteration():
    engine = Engine(EngineConfig(), kv_blocks=1000, max_seq_len=4096)
    engine.submit(Request(0, 0.0, 10, 3, 3))
    times = []
    t = 0.0
    while engine.has_work():
        outcome = engine.complete(engine.schedule(), t, t + 1.0)
        t += 1.0
        times.extend(outcome.finished)
    (done,) = times
    assert (done.first_token_s, done.finish_s, done.output_tokens) == (1.0, 3.0, 3)


def test_guaranteed_no_evict_reserves_for_max_tokens():
    # 10 blocks of 16 tokens: each request reserves ceil((16 + 64) / 16) = 5 blocks -> two at a time.
    engine = Engine(EngineConfig(tokens_per_block=16), kv_blocks=10, max_seq_len=4096)
    for i in range(3):
        engine.submit(Request(i, 0.0, 16, max_tokens=64, output_tokens=4))
    batch = engine.schedule()
    assert len(batch.context) == 2
    assert len(engine.waiting) == 1


def test_max_utilization_admits_more_and_pauses_when_full():
    config = EngineConfig(tokens_per_block=16, scheduler=SchedulerPolicy.MAX_UTILIZATION)
    engine = Engine(config, kv_blocks=10, max_seq_len=4096)
    for i in range(3):
        engine.submit(Request(i, 0.0, 16, max_tokens=64, output_tokens=64))
    assert len(engine.schedule().context) == 3
    finished = drain_from(engine)
    assert engine.preemptions > 0
    assert sorted(f.request.request_id for f in finished) == [0, 1, 2]
    assert all(f.output_tokens == 64 for f in finished)


def drain_from(engine: Engine):
    """Complete the batch already scheduled, then run to the end."""
    finished, t = [], 0.0
    batch = None
    while True:
        batch = batch or engine.schedule()
        outcome = engine.complete(batch, t, t + 0.01)
        finished.extend(outcome.finished)
        t += 0.01
        assert engine.audit()["used_blocks"] == engine.used_blocks <= engine.kv_blocks
        if not engine.has_work():
            return finished
        batch = engine.schedule()


def test_chunked_context_splits_long_prompts():
    engine = Engine(EngineConfig(max_num_tokens=256, chunked_context=True), kv_blocks=1000, max_seq_len=4096)
    engine.submit(Request(0, 0.0, 600, 5, 5))
    chunks = []
    t = 0.0
    while engine.has_work():
        batch = engine.schedule()
        chunks.extend(batch.prefill_chunks)
        engine.complete(batch, t, t + 0.01)
        t += 0.01
    assert chunks == [(256, 0), (256, 256), (88, 512)]


@pytest.mark.parametrize(
    ("request_", "config", "message"),
    [
        (Request(0, 0.0, 4000, 200), EngineConfig(), "max_seq_len"),
        (Request(0, 0.0, 3000, 10), EngineConfig(max_num_tokens=2048), "chunked context"),
        (Request(0, 0.0, 0, 10), EngineConfig(), "at least 1"),
    ],
)
def test_requests_the_engine_can_never_serve_are_rejected(request_, config, message):
    engine = Engine(config, kv_blocks=1000, max_seq_len=4096)
    with pytest.raises(RequestRejectedError, match=message):
        engine.submit(request_)


def test_max_batch_size_is_respected():
    engine = Engine(EngineConfig(max_batch_size=4), kv_blocks=10_000, max_seq_len=4096)
    for i in range(10):
        engine.submit(Request(i, 0.0, 10, 100, 100))
    assert len(engine.schedule().context) == 4
