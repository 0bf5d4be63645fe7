"""The IPS model's range warning: silent while tables are built, once when a decision asks past the profile.

Each test copies the shipped model to its own directory: the warning is once per model directory
and feature in a process, so a shared directory would let one test's warning hide another's.
"""

import logging
import shutil

import numpy as np
import pytest

from agent.predict.ips import BATCH, KV, PREFILL, IpsModel
from agent.predict.timing import LearnedTimeModel
from agent.shipped import SHIPPED_MODELS_DIR

SHIPPED = SHIPPED_MODELS_DIR / "a100-sxm4-80gb" / "llama3-8b-tp1"  # profiled at 256 / 7240 blocks / 8192
CLOCKS = (600, 1050, 1410)  # a few: tabulating every clock takes seconds


@pytest.fixture
def model_dir(tmp_path):
    return shutil.copytree(SHIPPED, tmp_path / "a100-sxm4-80gb" / "llama3-8b-tp1")


def range_warnings(caplog) -> list[str]:
    """Every warning the IPS model logged, whatever its wording."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "agent.predict.ips" and r.levelno >= logging.WARNING
    ]


def build(model_dir, max_batch: int, kv_blocks: int, max_num_tokens: int) -> LearnedTimeModel:
    return LearnedTimeModel.build(
        IpsModel(model_dir), 1, CLOCKS, max_batch, kv_blocks, prefill_tokens=(256, max_num_tokens)
    )


def test_the_profiled_range_is_the_profiled_engines_limits(model_dir):
    model = IpsModel(model_dir)
    assert model.covered_high == {BATCH: 256, KV: 7240, PREFILL: 8192}
    assert model.high[KV] < 7240  # the sweep fills 95% of the cache: its rows stop short


def test_building_tables_past_the_profile_is_silent(model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        build(model_dir, max_batch=512, kv_blocks=10_000, max_num_tokens=16_384)
    assert range_warnings(caplog) == []


def test_decisions_at_the_profiled_engines_limits_are_silent(model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        time_model = build(model_dir, max_batch=256, kv_blocks=7240, max_num_tokens=8192)
        time_model.decode_s(np.arange(3), np.array([1, 128, 256]), np.array([0.0, 3000.0, 7240.0]))
        time_model.prefill_s(256, 7240.0, 8192)
        time_model.prefill_s(200, 5000.0, 4096)  # no table at 4096 tokens: the model itself
    assert range_warnings(caplog) == []


def ask_batch(time_model: LearnedTimeModel) -> None:
    time_model.decode_s(np.arange(2), np.array([8, 300]), np.array([10.0, 10.0]))


def ask_kv(time_model: LearnedTimeModel) -> None:
    time_model.decode_s(np.arange(2), np.array([8, 8]), np.array([10.0, 9000.0]))


def ask_prefill(time_model: LearnedTimeModel) -> None:
    time_model.prefill_s(8, 10.0, 16_384)


@pytest.mark.parametrize(
    ("ask", "expected"),
    [
        (ask_batch, ("batch=300", "past the 256", "--max-batch-size")),
        (ask_kv, ("kv_blocks=9000", "past the 7240", "KV cache")),
        (ask_prefill, ("prefill_tokens=16384", "past the 8192", "--max-num-tokens")),
    ],
    ids=["batch", "kv_blocks", "prefill_tokens"],
)
def test_a_decision_past_the_profile_warns_once_with_what_to_do(model_dir, caplog, ask, expected):
    time_model = build(model_dir, max_batch=512, kv_blocks=10_000, max_num_tokens=16_384)
    with caplog.at_level(logging.WARNING):
        ask(time_model)
        ask(time_model)
    (message,) = range_warnings(caplog)
    assert all(part in message for part in expected), message
    assert str(model_dir) in message and "train again" in message


def test_a_decode_lookup_is_judged_by_what_the_table_answers(model_dir, caplog):
    """The table clamps to its grid: asking past it is asking for its top, which the profile covers."""
    time_model = build(model_dir, max_batch=256, kv_blocks=7240, max_num_tokens=8192)
    with caplog.at_level(logging.WARNING):
        time_model.decode_s(np.arange(1), np.array([400]), np.array([9000.0]))
    assert range_warnings(caplog) == []


def test_once_per_feature_in_the_process_even_when_the_policy_is_rebuilt(model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # e.g. POST /admin/policy builds the time model again
            time_model = build(model_dir, max_batch=512, kv_blocks=10_000, max_num_tokens=8192)
            time_model.decode_s(np.arange(1), np.array([400]), np.array([9000.0]))
    messages = range_warnings(caplog)
    assert len(messages) == 2
    assert any("batch=400" in m for m in messages) and any("kv_blocks=9000" in m for m in messages)
