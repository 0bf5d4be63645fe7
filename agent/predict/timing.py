"""Iteration-time models the clock search uses, built from an exported IPS model.

Decode-only iterations — nearly every projected iteration — come from the precomputed
`DecodeIpsTable` (a gather); iterations that carry a prefill ask the ONNX model directly, one
row per candidate clock.
"""

from __future__ import annotations

import numpy as np

from agent.domain import IPS_FEATURES
from agent.predict.ips import BATCH, CLOCK, KV, PREFILL, TP, DecodeIpsTable, IpsModel


class LearnedTimeModel:
    """Predicted seconds per iteration from a trained IPS model."""

    def __init__(self, model: IpsModel, table: DecodeIpsTable, tp: int) -> None:
        self.model = model
        self.table = table
        self._prefill_rows = np.zeros((len(table.clocks_mhz), len(IPS_FEATURES)), dtype=np.float32)
        self._prefill_rows[:, TP] = tp
        self._prefill_rows[:, CLOCK] = table.clocks_mhz

    @classmethod
    def build(
        cls, model: IpsModel, tp: int, clocks_mhz: tuple[int, ...], max_batch: int, kv_blocks: int
    ) -> LearnedTimeModel:
        """Tabulate decode IPS for the engine's limits at the candidate clocks."""
        return cls(model, DecodeIpsTable.build(model, tp, clocks_mhz, max_batch, kv_blocks), tp)

    @property
    def clocks_mhz(self) -> np.ndarray:
        """Candidate clocks, ascending."""
        return self.table.clocks_mhz

    def decode_s(self, clock_index: np.ndarray, batch: np.ndarray, kv_blocks: np.ndarray) -> np.ndarray:
        """Decode-only iteration time from the table."""
        return 1.0 / np.maximum(self.table.lookup(clock_index, batch, kv_blocks), 1e-9)

    def prefill_s(self, batch: int, kv_blocks: float, prefill_tokens: int) -> np.ndarray:
        """Time of an iteration with a prefill, at every candidate clock (one ONNX call)."""
        rows = self._prefill_rows.copy()
        rows[:, BATCH], rows[:, KV], rows[:, PREFILL] = max(batch, 1), kv_blocks, prefill_tokens
        return self.model.iteration_s(rows)
