"""Iterations-per-second predictions from an exported IPS model (ONNX + card.json).

`IpsModel` answers whole batches of (tp, batch, kv_blocks, clock_mhz, prefill_tokens) rows in one
onnxruntime call on one thread: the decision core asks for every candidate clock at several future
iterations at once. `IpsTable` goes further for the common cases, decode-only iterations and
the decision's prefill probes: it evaluates the model once over a (clock × batch × KV) grid at
load time, after which a query is a numpy gather (trees are piecewise constant, so a fine grid
loses little; the bench measures it).

Tables span the serving engine's limits on purpose, so building one says nothing about the
model's fit; a decision that asks past what the model was profiled on does, and `IpsModel.asked`
logs that once per model and feature.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.domain import IPS_FEATURES

log = logging.getLogger(__name__)
TP, BATCH, KV, CLOCK, PREFILL = range(len(IPS_FEATURES))
# The engine limit a profile sweep spans each of these features up to (the card's setup records the
# profiled engine's): the sweep reaches 95% of the KV cache and rarely the largest batch or chunk
# exactly, so the observed maxima fall short of what the model was built to cover.
PROFILED_LIMITS = {BATCH: "max_batch_size", KV: "kv_blocks", PREFILL: "max_num_tokens"}
# What to do when a decision asks past the profiled range, per feature.
WIDEN_RANGE = {
    BATCH: "profile with the engine's --max-batch-size and train again",
    KV: "profile this engine, whose KV cache is larger, and train again",
    PREFILL: "profile with the engine's --max-num-tokens and train again",
}
_reported: set[tuple[Path, int]] = set()  # (model directory, feature) already warned about, this process


class ModelLoadError(ValueError):
    """A model directory without a usable ips.onnx / card.json."""


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the sidecar must not steal cores from the inference server
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class IpsModel:
    """An exported IPS model: batch predictions, and the range of engine states it was profiled on."""

    def __init__(self, model_dir: Path | str) -> None:
        model_dir = Path(model_dir)
        try:
            self.card: dict[str, Any] = json.loads((model_dir / "card.json").read_text())
            self._session = _session(model_dir / self.card["file"])
        except (OSError, KeyError, json.JSONDecodeError, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            raise ModelLoadError(f"cannot load the IPS model in {model_dir}: {exc}") from exc
        columns = self.card["input"]["columns"]
        if tuple(columns) != IPS_FEATURES:
            raise ModelLoadError(f"{model_dir}: model inputs {columns} are not {list(IPS_FEATURES)}")
        self.model_dir = model_dir
        self.high = np.array([self.card["features"][f]["max"] for f in IPS_FEATURES], dtype=np.float32)
        engines = [entry.get("setup", {}).get("engine", {}) for entry in self.card.get("data", [])]
        # Per feature, the most the model was profiled to cover: its profiled engines' limit, or, for
        # data that does not say, the most its rows hold.
        self.covered_high = {
            feature: max(
                [float(self.high[feature])]
                + [float(engine[key]) for engine in engines if isinstance(engine.get(key), int | float)]
            )
            for feature, key in PROFILED_LIMITS.items()
        }

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """IPS for each row of `rows` (columns as IPS_FEATURES)."""
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(IPS_FEATURES):
            raise ValueError(f"rows must have shape (n, {len(IPS_FEATURES)})")
        return self._session.run(None, {"input": x})[0].ravel().astype(np.float64)

    def iteration_s(self, rows: np.ndarray) -> np.ndarray:
        """Predicted seconds per iteration for each row."""
        return 1.0 / np.maximum(self.predict(rows), 1e-9)

    def asked(self, feature: int, highest: float) -> bool:
        """Note that a decision asked for `feature` up to `highest`; False once that is reported.

        Past what the model was profiled on its predictions extrapolate: the first such query of a
        feature logs a warning, once per model in this process, naming what to profile. `feature`
        is BATCH, KV or PREFILL (the others are fixed per engine).
        """
        key = (self.model_dir, feature)
        if key in _reported:
            return False
        if highest <= self.covered_high[feature]:
            return True
        _reported.add(key)
        log.warning(
            "IPS model %s was asked for %s=%g, past the %g it was profiled on: predictions there "
            "extrapolate; %s",
            self.model_dir,
            IPS_FEATURES[feature],
            highest,
            self.covered_high[feature],
            WIDEN_RANGE[feature],
        )
        return False


@dataclass(frozen=True, slots=True)
class IpsTable:
    """IPS at one prefill size (0: decode-only), precomputed on a (clock, batch, KV) grid.

    Batch sizes between grid points round up to the next one and KV is linear between points:
    with a batch step of 1 (decode tables) lookups are exact in the batch.
    """

    clocks_mhz: np.ndarray  # ascending candidate clocks
    batch_step: int  # batch sizes between grid points
    kv_step: float  # KV blocks between grid points
    ips: np.ndarray  # [clock index, batch grid index, KV grid index]

    @classmethod
    def build(
        cls,
        model: IpsModel,
        tp: int,
        clocks_mhz: tuple[int, ...],
        max_batch: int,
        kv_blocks: int,
        kv_points: int = 128,
        prefill_tokens: int = 0,
        batch_step: int = 1,
    ) -> IpsTable:
        """Evaluate `model` on the grid (batch 0..max_batch, kv_points KV levels, every clock)."""
        return cls.from_ips(
            model.predict, tp, clocks_mhz, max_batch, kv_blocks, kv_points, prefill_tokens, batch_step
        )

    @classmethod
    def from_ips(
        cls,
        ips: Callable[[np.ndarray], np.ndarray],
        tp: int,
        clocks_mhz: tuple[int, ...],
        max_batch: int,
        kv_blocks: int,
        kv_points: int = 128,
        prefill_tokens: int = 0,
        batch_step: int = 1,
    ) -> IpsTable:
        """Tabulate any IPS function of IPS_FEATURES rows on the grid."""
        clocks = np.array(sorted(clocks_mhz), dtype=np.float32)
        kv_grid = np.linspace(0.0, kv_blocks, kv_points, dtype=np.float32)
        batches = np.arange(0, max_batch + batch_step, batch_step, dtype=np.float32)
        c, b, k = np.meshgrid(clocks, batches, kv_grid, indexing="ij")
        rows = np.zeros((c.size, len(IPS_FEATURES)), dtype=np.float32)
        rows[:, TP], rows[:, BATCH], rows[:, KV], rows[:, CLOCK] = tp, b.ravel(), k.ravel(), c.ravel()
        rows[:, PREFILL] = prefill_tokens
        return cls(clocks, batch_step, float(kv_blocks) / (kv_points - 1), ips(rows).reshape(c.shape))

    def at_every_clock(self, batch: float, kv_blocks: float) -> np.ndarray:
        """IPS at every clock for one (batch, KV) point: `lookup` for scalars, without the gathers."""
        _, batches, kvs = self.ips.shape
        pos = min(max(kv_blocks / self.kv_step, 0.0), kvs - 1)
        lo = min(int(pos), kvs - 2)
        frac = pos - lo
        b = math.ceil(batch / self.batch_step) if self.batch_step > 1 else int(batch)
        b = min(max(b, 0), batches - 1)
        below = self.ips[:, b, lo]
        return below + (self.ips[:, b, lo + 1] - below) * frac

    def lookup(self, clock_index: np.ndarray | int, batch: np.ndarray, kv_blocks: np.ndarray) -> np.ndarray:
        """IPS at the given clock index(es), batch sizes and KV blocks."""
        _, batches, kvs = self.ips.shape
        # np.minimum/np.maximum rather than np.clip: the same values, a fraction of the call overhead.
        pos = np.minimum(np.maximum(np.asarray(kv_blocks, dtype=np.float64) / self.kv_step, 0.0), kvs - 1)
        lo = np.minimum(pos.astype(np.intp), kvs - 2)
        frac = pos - lo
        b = np.asarray(batch, dtype=np.float64)
        if self.batch_step > 1:
            b = np.ceil(b / self.batch_step)
        b = np.minimum(np.maximum(b.astype(np.intp), 0), batches - 1)
        flat = (np.asarray(clock_index, dtype=np.intp) * batches + b) * kvs + lo
        table = self.ips.reshape(-1)
        below = table.take(flat)
        return below + (table.take(flat + 1) - below) * frac
