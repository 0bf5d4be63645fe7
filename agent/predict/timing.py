"""Iteration-time models the clock search uses, built from an exported IPS model.

Decode-only iterations — nearly every projected iteration — come from a precomputed `IpsTable`
(a gather), and so do the fixed-size prefill probes every decision makes (on a coarser batch
grid, rounded up: a prefill's cost is dominated by its tokens). Any other prefill asks the ONNX
model directly, one row per candidate clock.

Every query is what a decision asks, so this is where a question past the model's profiled range
is noticed (`IpsModel.asked`); building the tables is not a question and is not checked.
"""

from __future__ import annotations

import numpy as np

from agent.domain import IPS_FEATURES
from agent.predict.ips import BATCH, CLOCK, KV, PREFILL, TP, IpsModel, IpsTable

PREFILL_BATCH_STEP = 8  # prefill tables: batch grid step (lookups round up)
PREFILL_KV_POINTS = 32  # prefill tables: KV levels


def grid_tops(table: IpsTable) -> dict[int, float]:
    """The largest batch and KV a lookup in `table` can answer for: it clamps queries to its grid."""
    _, batches, kvs = table.ips.shape
    return {BATCH: float((batches - 1) * table.batch_step), KV: table.kv_step * (kvs - 1)}


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
        self._decode_tops = grid_tops(table)
        self._prefill_tops = {tokens: grid_tops(t) for tokens, t in self.prefill_tables.items()}
        self._unreported = {BATCH, KV, PREFILL}  # features not yet reported as asked past the profile
        # A decode lookup can ask past the profile only where the grid (the engine's limits) does, so
        # an engine within the profiled limits pays nothing per lookup.
        self._decode_checks = [f for f, top in self._decode_tops.items() if top > model.covered_high[f]]

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
        if self._decode_checks:
            asked = {BATCH: batch, KV: kv_blocks}
            for feature in tuple(self._decode_checks):
                self._note(feature, min(float(np.max(asked[feature])), self._decode_tops[feature]))
        return 1.0 / np.maximum(self.table.lookup(clock_index, batch, kv_blocks), 1e-9)

    def prefill_s(self, batch: int, kv_blocks: float, prefill_tokens: int) -> np.ndarray:
        """Time of an iteration with a prefill, at every candidate clock (a table or one ONNX call)."""
        table = self.prefill_tables.get(prefill_tokens)
        if self._unreported:
            tops = self._prefill_tops.get(prefill_tokens, {BATCH: np.inf, KV: np.inf})
            asked = {BATCH: min(batch, tops[BATCH]), KV: min(kv_blocks, tops[KV]), PREFILL: prefill_tokens}
            for feature in tuple(self._unreported):
                self._note(feature, float(asked[feature]))
        if table is not None:
            return 1.0 / np.maximum(table.at_every_clock(batch, kv_blocks), 1e-9)
        rows = self._prefill_rows.copy()
        rows[:, BATCH], rows[:, KV], rows[:, PREFILL] = max(batch, 1), kv_blocks, prefill_tokens
        return self.model.iteration_s(rows)

    def _note(self, feature: int, highest: float) -> None:
        """Hand a decision's query to the model's range check; stop checking a feature once reported."""
        if not self.model.asked(feature, highest):
            self._unreported.discard(feature)
            if feature in self._decode_checks:
                self._decode_checks.remove(feature)
