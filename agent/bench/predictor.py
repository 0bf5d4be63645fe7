"""How accurate and how fast the shipped IPS model is.

Accuracy is measured on rows the model has never seen: a fresh twin profile of the same engine
with other seeds. Latency is onnxruntime on one thread, as the sidecar runs it, for the row
counts the decision core asks for; the decode table is measured the same way.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.modeling.dataset import DatasetWriter, read_dataset
from agent.modeling.profile import SweepConfig, TwinProfileTarget, run_sweep, sweep_meta
from agent.modeling.train import regression_metrics
from agent.predict.ips import BATCH, CLOCK, KV, IpsModel, IpsTable
from agent.twin.setup import TwinSetup

FRESH_SEED_OFFSET = 1000  # sweep and jitter seeds of the evaluation profile: never the training ones
LATENCY_ROWS = (1, 64, 1024)
TABLE_KV_POINTS = 128


def _timings_us(call: Callable[[], object], repeats: int) -> dict[str, float]:
    call()  # warm-up
    samples = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        call()
        samples[i] = time.perf_counter() - start
    return {
        "p50_us": float(np.percentile(samples, 50) * 1e6),
        "p99_us": float(np.percentile(samples, 99) * 1e6),
    }


def fresh_rows(setup: TwinSetup, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and IPS of a new twin profile (`rows` iterations) with seeds unseen in training."""
    target = TwinProfileTarget(setup)
    config = SweepConfig(seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fresh.csv"
        with DatasetWriter(path, sweep_meta(target, config)) as writer:
            run_sweep(target, writer, config, rows=rows)
        data = read_dataset(path)
        return data.features(), data["ips"]


def benchmark_predictor(model_dir: Path, setup: TwinSetup, rows: int, seed: int) -> dict[str, Any]:
    """Held-out accuracy, prediction latency and decode-table figures of one IPS model."""
    model = IpsModel(model_dir)
    x, y = fresh_rows(setup, rows, seed)
    predicted = model.predict(x)
    decode = x[:, 4] == 0
    figures: dict[str, Any] = {
        "model_dir": str(model_dir),
        "trees": model.card["model"]["trees"],
        "held_out_rows": len(y),
        "held_out": regression_metrics(y, predicted),
        "held_out_decode_rows": regression_metrics(y[decode], predicted[decode]),
        "held_out_prefill_rows": regression_metrics(y[~decode], predicted[~decode]),
    }
    rng = np.random.default_rng(seed)
    for n in LATENCY_ROWS:
        batch = x[rng.integers(0, len(x), n)].astype(np.float32)
        figures[f"predict_{n}_rows"] = _timings_us(
            lambda b=batch: model.predict(b), 3000 if n < 1024 else 300
        )

    clocks = tuple(c for c in setup.gpu.sm_clocks_mhz if c >= model.card["features"]["clock_mhz"]["min"])
    start = time.perf_counter()
    table = IpsTable.build(
        model, setup.tp, clocks, setup.engine.max_batch_size, setup.kv_blocks(), TABLE_KV_POINTS
    )
    build_s = time.perf_counter() - start
    sample = x[decode][rng.integers(0, int(decode.sum()), 4096)]
    clock_index = np.searchsorted(table.clocks_mhz, sample[:, CLOCK])
    looked_up = table.lookup(clock_index, sample[:, BATCH], sample[:, KV])
    deviation = np.abs(looked_up / model.predict(sample) - 1)
    figures["decode_table"] = {
        "clocks": len(clocks),
        "kv_points": TABLE_KV_POINTS,
        "build_s": build_s,
        "megabytes": table.ips.nbytes / 1e6,
        "lookup_1024_rows": _timings_us(
            lambda: table.lookup(clock_index[:1024], sample[:1024, BATCH], sample[:1024, KV]), 3000
        ),
        "deviation_from_model_p50": float(np.percentile(deviation, 50)),
        "deviation_from_model_p99": float(np.percentile(deviation, 99)),
        "deviation_from_model_max": float(deviation.max()),
    }
    return figures
