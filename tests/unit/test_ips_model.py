"""IPS model pipeline: training on twin-generated rows, ONNX export parity, runtime predictions."""

import json

import numpy as np
import pytest

from agent.catalog import gpu_spec, model_spec
from agent.domain import IPS_FEATURES
from agent.modeling.train import TrainConfig, train_ips_model
from agent.predict.ips import CLOCK, IpsModel, IpsTable, ModelLoadError
from agent.twin.latency import LatencyModel

GPU = gpu_spec("a100-sxm4-80gb")
CLOCKS = np.array([c for c in GPU.sm_clocks_mhz if c >= 600])


def twin_rows(n: int, seed: int, noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Random decode/prefill iterations timed by the twin's latency model."""
    latency = LatencyModel(GPU, model_spec("llama3-8b"), 1, 8192)
    rng = np.random.default_rng(seed)
    rows, ips = [], []
    for _ in range(n):
        batch = int(rng.integers(1, 128))
        kv = int(rng.integers(batch, 4000))
        clock = int(rng.choice(CLOCKS))
        prefill = int(rng.choice([0, 0, 0, rng.integers(64, 2048)]))
        decode = batch - (1 if prefill else 0)
        cost = latency.iteration(clock, decode, kv * 64, [(prefill, 0)] if prefill else [])
        rows.append((1, batch, kv, clock, prefill))
        ips.append(1.0 / (cost.time_s * np.exp(noise * rng.standard_normal())))
    return np.array(rows, dtype=float), np.array(ips)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ips")
    x, y = twin_rows(4000, seed=1)
    card = train_ips_model(x, y, out, data=[{"path": "generated", "rows": len(y)}], cfg=TrainConfig(folds=3))
    return out, card


def test_card_describes_the_model(trained):
    out, card = trained
    assert json.loads((out / "card.json").read_text()) == card
    assert card["input"]["columns"] == list(IPS_FEATURES)
    assert card["metrics"]["onnx_max_rel_error"] <= 1e-4
    for split in ("held_out_90_10", "held_out_10_90", "cross_validation"):
        assert card["metrics"][split].keys() == {"r2", "mae_ips", "mape_pct"}
    assert card["features"]["clock_mhz"]["min"] >= 600
    kept = card["metrics"]["monotone_constraints_held_out"]["kept"]
    assert kept in ("physical", "clock")
    assert card["features"]["clock_mhz"]["monotone"] == 1


def test_accuracy_near_the_noise_floor(trained):
    _, card = trained
    held = card["metrics"]["held_out_90_10"]
    assert held["r2"] >= 0.97
    assert held["mape_pct"] <= 5.0


def test_fresh_data_scored_by_the_runtime_model(trained):
    out, _ = trained
    model = IpsModel(out)
    x, y = twin_rows(500, seed=99, noise=0.0)
    mape = np.mean(np.abs(model.predict(x) / y - 1)) * 100
    assert mape < 5.0


def test_higher_clock_never_predicts_fewer_ips(trained):
    model = IpsModel(trained[0])
    rng = np.random.default_rng(3)
    for _ in range(20):
        base = np.array(
            [1, rng.integers(1, 128), rng.integers(100, 4000), 0, rng.choice([0, 512])], dtype=float
        )
        rows = np.repeat(base[None, :], len(CLOCKS), axis=0)
        rows[:, CLOCK] = np.sort(CLOCKS)
        assert np.all(np.diff(model.predict(rows)) >= -1e-6)


def test_decode_table_matches_the_model_on_its_grid(trained):
    model = IpsModel(trained[0])
    clocks = (900, 1050, 1410)
    table = IpsTable.build(model, tp=1, clocks_mhz=clocks, max_batch=64, kv_blocks=3000, kv_points=31)
    batch = np.array([1, 10, 64])
    kv = np.array([0.0, 1500.0, 3000.0])
    for i, clock in enumerate(clocks):
        rows = np.column_stack([np.ones(3), batch, kv, np.full(3, clock), np.zeros(3)])
        assert np.allclose(table.lookup(i, batch, kv), model.predict(rows), rtol=1e-6)


def test_rejects_a_directory_without_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load the IPS model"):
        IpsModel(tmp_path)


def test_training_needs_enough_rows(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        train_ips_model(np.ones((10, 5)), np.ones(10), tmp_path, data=[])


def test_a_point_at_every_clock_matches_the_gathered_lookup():
    rng = np.random.default_rng(0)
    for batch_step in (1, 8):
        table = IpsTable(np.arange(5.0), batch_step, 37.5, rng.random((5, 33, 16)))
        every = np.arange(5)
        for batch, kv in ((0, 0.0), (17, 101.3), (255, 562.5), (300, 9999.0), (3, -4.0)):
            gathered = table.lookup(every, np.full(5, batch), np.full(5, kv))
            assert np.allclose(table.at_every_clock(batch, kv), gathered), (batch_step, batch, kv)
