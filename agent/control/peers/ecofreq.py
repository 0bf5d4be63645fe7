"""VoltanaLLM's EcoFreq: the lowest listed clock whose table-predicted latency meets the SLO.

Source: github.com/Supercomputing-System-AI-Lab/VoltanaLLM at commit
f7789acfa63ad0b1ec772724fbfbf7adac6a2142 — the control law in
`python/sglang/srt/managers/freq_manager.py` (`FreqManager.get_f_target`, `event_loop`), the
latency tables in `python/sglang/srt/managers/lookup_table.py`; how the tables are fitted in
`voltana-llm-scripts/predictions/{decode,prefill}/draw.ipynb`, the settings it is launched with in
`voltana-llm-scripts/demo/{d,p}_server.sh`. Paper: Yu, Taneja, Lin, Zhang, "VoltanaLLM:
Feedback-Driven Frequency Control and State-Space Routing for Energy-Efficient LLM Serving",
arXiv:2509.04827.

The law, as that commit runs it on a prefill/decode-disaggregated SGLang (one EcoFreq per instance):

- A sorted frequency list; its last entry is "max" and is never looked up.
- Max frequency whenever the scheduler's waiting queue is non-empty.
- Decode instance: predict the iteration latency at each lower frequency from a per-frequency
  linear table, latency = a·batch + b·tokens + c, where batch is the running batch and tokens the
  context tokens it holds; the table is piecewise in batch size (segments ending at 4, 8, 16, …,
  128, 256, 384, …, 2048) and fitted on a profile by least squares with non-negative slopes
  (scikit-learn's `positive=True`, inside RANSAC). A batch no segment holds has no prediction, and
  its frequency is skipped. A batch of 0 predicts 0.
- Prefill instance: a tokens-only table, latency = b·prompt tokens + c, for the batch just run.
- Pick the lowest frequency whose prediction is ≤ SLO × (1 + margin) − offset, where the offset
  (prefill only) is the longest queueing time of the batch's requests; if none, max frequency.
  Both launch scripts use margin 0.35 and the list 1005, 1410 MHz (A100 SXM4).
- Start at the lowest frequency; with no metrics keep the current one, and after 5 s without
  metrics go back to the lowest.

Adapted to throttllem (each is marked "adapted" or "reconstructed" where it is applied):

- The profile is our IterationTimeModel: the tables are fitted on a grid sampled from it.
- Our engines are co-located (in-flight batching mixes prefill and decode), which EcoFreq refuses
  to run on. The decode law is applied to every iteration's decoding requests; when the TTFT is
  a target and the iteration carried prompt tokens, the prefill law is applied too and the higher
  of the two clocks wins, since one clock must serve both phases. Its ITL SLO is our TPOT
  target; its token count is the KV blocks in use × tokens per block. Consequence, as on
  VoltanaLLM's decode instances: the decode law does not price the prefills that stall decoding
  here, and the prefill law sees prompt tokens only in the snapshot after they ran.
- The list is mapped onto this GPU: its top entry becomes this GPU's max clock, the others keep
  their share of the A100's 1410 MHz and snap to the nearest clock the model knows. `full` looks
  up every clock the model knows instead.
- Not carried over: the optional arrival-rate overrides (max frequency above a request or token
  rate; off by default and set out of reach in the launch scripts), since a non-gating policy's
  view carries no arrival stream; the `use_bs_total` option (off by default); the median over the
  metrics received since the last poll, as one snapshot arrives per decision here; RANSAC, as the
  model is noise-free; and the 20 ms stand-in for a non-positive prediction (it passes the SLO as
  the prediction itself would).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import numpy as np

from agent.control.admission import EngineLimits
from agent.control.frequency import IterationTimeModel
from agent.control.policies import ControlView
from agent.control.slo import SloTargets
from agent.domain import Decision, EngineStats

CandidateList = Literal["voltana", "full"]
VOLTANA_LIST_MHZ = (1005, 1410)  # d_server.sh, p_server.sh: --freq-manager-f-list 1005 1410
VOLTANA_MAX_MHZ = 1410  # the A100 SXM4's max clock: what the list's top entry means
SLO_MARGIN = 0.35  # d_server.sh, p_server.sh: the SLO is loosened by 35 %
IDLE_RESET_S = 5.0  # freq_manager.py: this long without metrics → the lowest frequency
# draw.ipynb (decode): the tables' batch-size segments end at these sizes, the first starts at 1.
DECODE_SEGMENT_ENDS = (4, *range(8, 129, 8), *range(256, 2049, 128))
GRID_POINTS = 16  # ours: batch sizes per segment, KV levels per batch, prompt sizes sampled from the model


@dataclass(frozen=True, slots=True)
class LatencyTables:
    """EcoFreq's linear latency predictors for each looked-up clock, in seconds."""

    segment_first: np.ndarray  # first batch size of each decode segment
    segment_last: np.ndarray  # last batch size of each decode segment
    decode: np.ndarray  # (clocks, segments, 3): s per decoding request, s per context token, intercept s
    prefill: np.ndarray  # (clocks, 2): s per prompt token, intercept s

    def decode_s(self, batch: int, context_tokens: int) -> np.ndarray | None:
        """Per clock, a decode iteration of `batch` requests; None when no segment holds `batch`."""
        if batch <= 0:
            return np.zeros(len(self.decode))
        held = np.flatnonzero((self.segment_first <= batch) & (batch <= self.segment_last))
        if len(held) == 0:
            return None
        coef = self.decode[:, held[0]]
        predicted_s: np.ndarray = coef[:, 0] * batch + coef[:, 1] * context_tokens + coef[:, 2]
        return predicted_s

    def prefill_s(self, prompt_tokens: int) -> np.ndarray:
        """Per clock, an iteration prefilling `prompt_tokens`."""
        predicted_s: np.ndarray = self.prefill[:, 0] * prompt_tokens + self.prefill[:, 1]
        return predicted_s


def fit_nonnegative_slopes(features: np.ndarray, latency_s: np.ndarray) -> np.ndarray:
    """Least squares latency ≈ features · slopes + intercept with slopes ≥ 0, for each column of latency.

    As draw.ipynb fits (scikit-learn's `positive=True` bounds the slopes, not the intercept). With
    few slopes the constrained optimum is exact by enumeration: its positive slopes solve the
    unconstrained fit on their subset, so it is the best fit, over all subsets, whose slopes come
    out non-negative. Returns (columns, slopes + 1), the intercept last.
    """
    rows, slopes = features.shape
    columns = latency_s.shape[1]
    best = np.zeros((columns, slopes + 1))
    best_sse = np.full(columns, np.inf)
    for size in range(slopes + 1):  # smaller subsets first: a tie keeps the simpler fit
        for subset in itertools.combinations(range(slopes), size):
            design = np.column_stack([features[:, list(subset)], np.ones(rows)])
            coef, *_ = np.linalg.lstsq(design, latency_s, rcond=None)
            sse = ((design @ coef - latency_s) ** 2).sum(axis=0)
            better = (coef[:-1] >= 0).all(axis=0) & (sse < best_sse)
            full = np.zeros((slopes + 1, columns))
            full[list(subset)] = coef[:-1]
            full[-1] = coef[-1]
            best[better] = full.T[better]
            best_sse[better] = sse[better]
    return best


def decode_segments(max_batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """EcoFreq's batch-size segments, cut at the engine's largest batch: (first sizes, last sizes)."""
    ends = np.array(DECODE_SEGMENT_ENDS)
    firsts = np.concatenate([[1], ends[:-1] + 1])
    keep = firsts <= max_batch_size
    return firsts[keep], np.minimum(ends[keep], max_batch_size)


def fit_tables(model: IterationTimeModel, clock_indices: np.ndarray, limits: EngineLimits) -> LatencyTables:
    """Tabulate the model the way EcoFreq tabulates its profile, at the model's `clock_indices`.

    Adapted: EcoFreq profiles decode batches of 1-token prompts that grow to fill the KV cache, and
    ShareGPT prefills. Here each decode segment is sampled at up to GRID_POINTS batch sizes, each
    from one KV block per request to the whole cache; prefills of one request at GRID_POINTS
    sizes up to the engine's largest chunk, with their own KV.
    """
    tpb = limits.tokens_per_block
    firsts, lasts = decode_segments(limits.max_batch_size)
    clocks = clock_indices[:, None, None]
    decode = []
    for first, last in zip(firsts, lasts, strict=True):
        batch = np.unique(np.linspace(first, last, GRID_POINTS).round().astype(int))
        kv = np.linspace(batch, max(limits.kv_blocks, int(batch[-1])), GRID_POINTS, axis=1)
        batches = np.broadcast_to(batch[:, None], kv.shape)
        latency = model.decode_s(clocks, batches[None], kv[None])  # (clocks, batches, KV levels)
        features = np.column_stack([batches.ravel(), kv.ravel() * tpb])
        decode.append(fit_nonnegative_slopes(features, latency.reshape(len(clock_indices), -1).T))
    largest = limits.max_num_tokens
    tokens = np.unique(np.linspace(largest / GRID_POINTS, largest, GRID_POINTS).round().astype(int))
    prefill = np.stack([model.prefill_s(1, math.ceil(t / tpb), int(t))[clock_indices] for t in tokens])
    return LatencyTables(
        segment_first=firsts,
        segment_last=lasts,
        decode=np.stack(decode, axis=1),
        prefill=fit_nonnegative_slopes(tokens[:, None].astype(float), prefill),
    )


def candidate_clocks(
    model_clocks_mhz: np.ndarray, clocks_mhz: tuple[int, ...], candidates: CandidateList
) -> tuple[int, ...]:
    """EcoFreq's frequency list on this GPU, ascending; the last entry is its max clock.

    Adapted: the lower entries of VOLTANA_LIST_MHZ keep their share of the A100's max clock and
    snap to the nearest allowed clock the model knows (ties to the lower one).
    """
    top = max(clocks_mhz)
    allowed = set(clocks_mhz)
    below = sorted(int(c) for c in model_clocks_mhz if int(c) in allowed and c < top)
    if not below:
        raise ValueError(f"EcoFreq needs a modelled clock below the max ({top} MHz) to choose from")
    if candidates == "full":
        return (*below, top)
    scale = top / VOLTANA_MAX_MHZ
    lows = {_nearest(below, f * scale) for f in VOLTANA_LIST_MHZ[:-1]}
    return (*sorted(lows), top)


def _nearest(clocks_mhz: list[int], target_mhz: float) -> int:
    """The clock closest to `target_mhz`; the lower one on a tie."""
    return min(clocks_mhz, key=lambda c: (abs(c - target_mhz), c))


def queueing_offset_s(view: ControlView) -> float:
    """How long the requests still waiting for their first token have waited: EcoFreq's TTFT offset.

    Reconstructed: EcoFreq subtracts the longest queueing time of the batch it just prefilled. Only
    a scoreboard knows arrivals; without one (a non-gating policy in the simulator) it is 0.
    """
    board = view.scoreboard
    if board is None:
        return 0.0
    waiting = np.isnan(board.run_first_token_s)
    if not waiting.any():
        return 0.0
    return float(view.now_s - board.run_arrival_s[waiting].min())


def _lowest_within(predicted_s: np.ndarray | None, budget_s: float, top: int) -> int:
    """Index of the first clock predicted within budget; `top` (max clock) when there is none."""
    if predicted_s is None:
        return top
    within = np.flatnonzero(predicted_s <= budget_s)
    return int(within[0]) if len(within) else top


class EcoFreqPolicy:
    """EcoFreq on a co-located engine: lowest listed clock the latency tables say meets the SLO."""

    gates_admission: ClassVar[bool] = False

    def __init__(
        self,
        model: IterationTimeModel,
        targets: SloTargets,
        clocks_mhz: tuple[int, ...],
        *,
        limits: EngineLimits,
        candidates: CandidateList = "voltana",
        slo_margin: float = SLO_MARGIN,
        idle_reset_s: float = IDLE_RESET_S,
    ) -> None:
        if candidates not in get_args(CandidateList):
            raise ValueError(f"unknown EcoFreq candidate list {candidates!r}; known: voltana, full")
        self.name = "ecofreq" if candidates == "voltana" else f"ecofreq:{candidates}"
        self.candidates_mhz = candidate_clocks(model.clocks_mhz, clocks_mhz, candidates)
        model_clocks = [int(c) for c in model.clocks_mhz]
        looked_up = np.array([model_clocks.index(c) for c in self.candidates_mhz[:-1]])
        self.tables = fit_tables(model, looked_up, limits)
        self.tokens_per_block = limits.tokens_per_block
        self.decode_budget_s = targets.tpot_s * (1 + slo_margin)  # EcoFreq's ITL SLO is our TPOT target
        self.prefill_budget_s = None if targets.ttft_s is None else targets.ttft_s * (1 + slo_margin)
        self.idle_reset_s = idle_reset_s
        self._index = 0  # EcoFreq starts at its lowest frequency
        self._stats_seen_s = -math.inf

    def decide(self, view: ControlView) -> Decision:
        """The clock the latest engine snapshot calls for; without one, hold (then idle low)."""
        if view.stats is None:
            if view.now_s - self._stats_seen_s > self.idle_reset_s:
                self._index = 0
        else:
            self._stats_seen_s = view.now_s
            self._index = self._target_index(view.stats, view)
        top = len(self.candidates_mhz) - 1
        return Decision(sm_clock_mhz=None if self._index == top else self.candidates_mhz[self._index])

    def _target_index(self, stats: EngineStats, view: ControlView) -> int:
        top = len(self.candidates_mhz) - 1
        waiting = (stats.queued_requests or 0) + stats.active_requests - stats.scheduled_requests
        if waiting > 0:
            return top
        context_tokens = stats.kv_blocks_used * self.tokens_per_block  # adapted: SGLang counts tokens
        index = _lowest_within(
            self.tables.decode_s(stats.generation_requests, context_tokens), self.decode_budget_s, top
        )
        if stats.context_tokens and self.prefill_budget_s is not None:  # adapted: co-located prefill
            budget_s = self.prefill_budget_s - queueing_offset_s(view)
            index = max(index, _lowest_within(self.tables.prefill_s(stats.context_tokens), budget_s, top))
        return index
