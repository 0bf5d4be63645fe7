"""The "perfect model" `throttllem-exact` decides with: the twin's own latency model.

It answers the same questions as a learned IPS model, from the equations that generate the
twin's iteration times (without their jitter), so `throttllem-exact` measures what throttllem
could reach with a flawless performance model and true output lengths.
"""

from __future__ import annotations

import numpy as np

from agent.predict.ips import BATCH, CLOCK, KV, IpsTable
from agent.twin.latency import LatencyModel
from agent.twin.power import PowerModel


class TwinTimeModel:
    """Exact decode and prefill iteration times from a LatencyModel."""

    def __init__(
        self,
        latency: LatencyModel,
        clocks_mhz: tuple[int, ...],
        max_batch: int,
        kv_blocks: int,
        tokens_per_block: int,
    ) -> None:
        self.latency = latency
        self.tokens_per_block = tokens_per_block

        def ips(rows: np.ndarray) -> np.ndarray:
            context = rows[:, KV].astype(np.float64) * tokens_per_block
            batch = np.maximum(rows[:, BATCH], 1)
            return 1.0 / latency.decode_time_s(rows[:, CLOCK], batch, context)

        self.table = IpsTable.from_ips(ips, latency.tp, clocks_mhz, max_batch, kv_blocks)

    @property
    def clocks_mhz(self) -> np.ndarray:
        """Candidate clocks, ascending."""
        return self.table.clocks_mhz

    def decode_s(self, clock_index: np.ndarray, batch: np.ndarray, kv_blocks: np.ndarray) -> np.ndarray:
        """Decode-only iteration time (exact on the table's grid, linear in KV between points)."""
        return 1.0 / self.table.lookup(clock_index, batch, kv_blocks)

    def prefill_s(self, batch: int, kv_blocks: float, prefill_tokens: int) -> np.ndarray:
        """One prefill iteration with `batch - 1` decodes alongside, at every candidate clock."""
        decodes = min(max(batch - 1, 0), self.latency.max_num_tokens - 1)
        chunk = min(prefill_tokens, self.latency.max_num_tokens - decodes)
        context = int(kv_blocks * self.tokens_per_block)
        return np.array(
            [
                self.latency.iteration(int(c), decodes, context, [(chunk, 0)]).time_s
                for c in self.table.clocks_mhz
            ]
        )


class TwinDecodePower:
    """The energy profile a DynamoLLM deployment measures offline, taken from the twin itself.

    Busy power of all the engine's GPUs during a decode iteration of `batch` requests reading
    `kv_blocks` of cache, at each candidate clock, without the twin's jitter.
    """

    def __init__(
        self,
        latency: LatencyModel,
        power: PowerModel,
        gpus: int,
        clocks_mhz: tuple[int, ...],
        tokens_per_block: int,
    ) -> None:
        self.latency = latency
        self.power = power
        self.gpus = gpus
        self.clocks_mhz = tuple(sorted(clocks_mhz))
        self.tokens_per_block = tokens_per_block

    def decode_power_w(self, clock_index: np.ndarray, batch: int, kv_blocks: float) -> np.ndarray:
        """Power at each of the clock indices (into the ascending candidate clocks)."""
        seqs = int(min(max(batch, 1), self.latency.max_num_tokens))
        context = int(kv_blocks * self.tokens_per_block)
        clocks = [self.clocks_mhz[int(i)] for i in np.atleast_1d(clock_index)]
        return np.array(
            [self.gpus * self.power.busy_w(c, self.latency.iteration(c, seqs, context)) for c in clocks]
        )
