"""Iteration-time models the clock search uses, built from an exported IPS model.

Decode-only iterations — nearly every projected iteration — come from a precomputed `IpsTable`
(a gather), and so do the fixed-size prefill probes every decision makes (on a coarser batch
grid, rounded up: a prefill's cost is dominated by its tokens). Any other prefill asks the ONNX
model directly, one row per candidate clock.
"""

from __future__ import annotations

import numpy as np

from agent.domain import IPS_FEATURES
from agent.predict.ips import BATCH, CLOCK, KV, PREFILL, TP, IpsModel, IpsTable

PREFILL_BATCH_STEP = 8  # prefill tables: batch grid step (lookups round up)
PREFILL_KV_POINTS = 32  # prefill tables: KV levels


class LearnedTimeModel:
    """Predicted seconds per iteration from a trained IPS model."""

    def __init__(
        self, model: IpsModel, table: IpsTable, tp: int, prefill_tables: dict[int, IpsTable] | None = None
    ) -> None:
        self.model = model
        self.table = table
        self.prefill_tables = prefill_tables or {}
        self._prefill_rows = np.zeros((len(table.clocks_mhz), len(IPS_FEATURES)), dtype=np.float32)
        self._prefill_rows[:, TP] = tp
        self._prefill_rows[:, CLOCK] = table.clocks_mhz

    @classmethod
    def build(
        cls,
        model: IpsModel,
        tp: int,
        clocks_mhz: tuple[int, ...],
        max_batch: int,
        kv_blocks: int,
        prefill_tokens: tuple[int, ...] = (),
    ) -> LearnedTimeModel:
        """Tabulate decode IPS, and prefill IPS at each of `prefill_tokens`, for the engine's limits."""
        prefill = {
            tokens: IpsTable.build(
                model,
                tp,
                clocks_mhz,
                max_batch,
                kv_blocks,
                PREFILL_KV_POINTS,
                prefill_tokens=tokens,
                batch_step=PREFILL_BATCH_STEP,
            )
            for tokens in prefill_tokens
        }
        return cls(model, IpsTable.build(model, tp, clocks_mhz, max_batch, kv_blocks), tp, prefill)

    @property
    def clocks_mhz(self) -> np.ndarray:
        """Candidate clocks, ascending."""
        return self.table.clocks_mhz

    def decode_s(self, clock_index: np.ndarray, batch: np.ndarray, kv_blocks: np.ndarray) -> np.ndarray:
        """Decode-only iteration time from the table."""
        return 1.0 / np.maximum(self.table.lookup(clock_index, batch, kv_blocks), 1e-9)

    def prefill_s(self, batch: int, kv_blocks: float, prefill_tokens: int) -> np.ndarray:
        """Time of an iteration with a prefill, at every candidate clock (a table or one ONNX call)."""
        table = self.prefill_tables.get(prefill_tokens)
        if table is not None:
            return 1.0 / np.maximum(table.at_every_clock(batch, kv_blocks), 1e-9)
        rows = self._prefill_rows.copy()
        rows[:, BATCH], rows[:, KV], rows[:, PREFILL] = max(batch, 1), kv_blocks, prefill_tokens
        return self.model.iteration_s(rows)
