"""A lower bound on the energy any schedule of a replay's requests can take on one twin engine.

What a clock policy saves is measured against `max`; this says how much any policy could save at
most, on the same noiseless twin and the same requests, each request held to a deadline.

Theorem. An engine of `count` GPUs serves requests r with arrival ``a_r >= 0``, prompt ``p_r``,
``n_r >= 1`` output tokens and deadline ``D_r >= a_r``. Take any schedule: iterations one after
another over ``[0, T]``, each a batch within the engine's limits (at most ``max_batch_size``
sequences and ``M = max_num_tokens`` tokens) run at a clock of F (the supported clocks at or above
`min_clock_mhz`), costed by `LatencyModel.iteration` and `PowerModel.busy_w` without jitter, the
GPUs idle (locked or not) in between, such that

- (A1) every request is prefilled once, never paused and recomputed: its first token comes from the
  iteration that completes its prompt, each of its ``n_r - 1`` later tokens from an iteration in
  which it is one of the decoding sequences, the j-th of them reading its ``p_r + j`` cached tokens;
- (A2) every request finishes by its deadline ``D_r``.

Write ``c = count * gpu.idle_w``; for an iteration, ``A = count * (P_busy - idle_w) * t`` is its
*above-idle* energy and t its time. Let ``D(f, d), tau(f, d)`` be A and t of a decode-only
iteration of d sequences reading no KV cache, ``Phi(f, n), tau0(f, n)`` those of
`LatencyModel.token_floor` (the work every n-token iteration does), ``beta(f)`` the busy time one
cached token adds to a decode iteration, k and a the activities of `power.ACTIVITY`, ``h = 1`` if
the host loop never hides the GPU (``host_ms_per_layer == 0``, every runtime but vLLM-2023) else 0:

    B_r       = min(max_batch_size, M, max over t in [a_r, D_r] of #{j : a_j <= t <= D_j})
    eps_l(B)  = min over f in F, 1 <= d <= B of (D(f, d) + (1 - l) c tau(f, d)) / d
    phi_l     = min over f in F, 1 <= n <= M of (Phi(f, n) + (1 - l) c tau0(f, n)) / n
    kappa_l   = min over f in F of beta(f) * (count (P_compute(f) - floor(f)) (k + (1 - k) min(1, a))
                                              + h (count (floor(f) - idle_w) + (1 - l) c))

Then for every l in [0, 1] the schedule's energy is at least

    l c max_r a_r + max( sum_r (n_r - 1) eps_l(B_r),  phi_l sum_r (p_r + n_r - 1) )
                  + kappa_l sum_r (n_r - 1) (p_r + n_r / 2).

Proof. (1) Every power the twin draws is at least idle_w per GPU: busy power is
``floor(f) + (P_compute(f) - floor(f)) * busy * activity`` with ``P_compute >= floor >= idle_w``
and busy, activity >= 0; idle power is idle_w unlocked and ``floor(f)`` locked (`PowerModel`).
So ``E >= c T + sum_i A_i``; and ``T >= max_r a_r`` (a request is prefilled after it arrives) and
``T >= sum_i t_i`` (iterations do not overlap), so ``E >= l c max_r a_r + sum_i e_i`` with
``e_i = A_i + (1 - l) c t_i``.
(2) With b the busy time, x the compute-bound time and y the decode-attention time of an
iteration (its `IterationCost` shares times t), 0 <= k <= 1 and a >= 0,

    A / count = (floor(f) - idle_w) t + (P_compute(f) - floor(f)) (k b + (1 - k) min(b, x + a y)),

non-decreasing in t, b and x + a y. Each of those grows with everything a batch adds to the bare
work of its tokens: the per-token tables (GEMM memory and compute, elementwise, all-reduce) are
non-decreasing (`profiles.non_decreasing`) and hypot grows in each argument; a GEMM's compute-bound
part ``u^2 / hypot(v, u)`` (v memory, u compute) grows too, since `profiles.linear_cost` keeps u
at 0 while the table is below the weight-streaming time and v that constant above it; more logits
grow the LM head and its compute part; decode attention (>= 0) adds to b and y, prefill attention
(>= 0) to b and x, prefill host time (>= 0) to t. Reading C cached tokens adds exactly
``beta(f) C`` to b and to y (decode attention is affine in the context and memory-bound) and, when
h = 1, to t; as ``min(u + p, v + q) >= min(u, v) + min(p, q)``, it adds at least ``kappa_l C`` to
e_i. Hence an iteration of n tokens reading C cached tokens at f has
``e_i >= phi_l n + kappa_l C``, and one with d >= 1 decoding sequences also
``e_i >= D(f, d) + (1 - l) c tau(f, d) + kappa_l C``.
(3) The d decoding sequences j of an iteration starting at s have ``a_j <= s < D_j`` (A2): all
are alive at s, which lies in each one's window, so ``d <= B_j`` and
``D(f, d) + (1 - l) c tau(f, d) >= sum_j eps_l(B_j)``. Summed over iterations (A1), request r
decodes in exactly ``n_r - 1`` of them, reading ``sum_(j < n_r) (p_r + j)`` cached tokens, and the
iterations hold ``sum_r (p_r + n_r - 1)`` tokens; either token sum bounds ``sum_i e_i`` together
with the cached-token term. ∎

An iteration during which a clock change takes effect (the twin applies it from that moment on)
runs a share of its work at each clock; its time and energy are that mix of the two clocks', so
step (2) holds for it too. The bound reports the best l of a grid. It needs ``setup.noise == 0``
(jitter can shorten an iteration). The twin's guaranteed_no_evict scheduler (the default) never
pauses a request, so its runs satisfy A1 (under max_utilization a run with preemptions lies
outside the theorem), and a power limit that takes an iteration below `min_clock_mhz` puts a run
outside F.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.domain import Request, Slo
from agent.slo_presets import SloPreset, e2e_budget_s
from agent.twin.engine import served_tokens
from agent.twin.latency import IterationCost, LatencyModel
from agent.twin.power import PowerModel
from agent.twin.setup import TwinSetup

EXACT_TOKEN_COUNTS = 64  # token floors tabulated at every count up to this...
TOKEN_GRID_RATIO = 1.02  # ...then at counts this far apart: phi is then at most 2% low
IDLE_SHARES = np.linspace(0.0, 1.0, 21)  # the grid of l the bound takes the best of
KV_PROBE_TOKENS = 1 << 20  # cached tokens a probe reads to measure beta(f)


def kv_read_s_per_token(latency: LatencyModel, clock_mhz: int) -> float:
    """beta(f): the busy time one more cached token adds to a decode iteration at `clock_mhz`.

    Decode attention is affine in the tokens it reads, so two iterations measure it exactly.
    """
    empty = latency.iteration(clock_mhz, 1, 0)
    probe = latency.iteration(clock_mhz, 1, KV_PROBE_TOKENS)
    busy = probe.busy_fraction * probe.time_s - empty.busy_fraction * empty.time_s
    return busy / KV_PROBE_TOKENS


def power_levels_w(power: PowerModel, clock_mhz: int) -> tuple[float, float]:
    """(floor - idle_w, P_compute - floor) of one GPU held at `clock_mhz`, as `PowerModel` answers.

    The floor is its locked idle power; a fully busy, fully compute-bound iteration draws P_compute.
    """
    floor = power.idle_w(clock_mhz)
    compute = power.busy_w(clock_mhz, IterationCost(time_s=1.0, busy_fraction=1.0, compute_share=1.0))
    return floor - power.gpu.idle_w, compute - floor


@dataclass(frozen=True, slots=True, eq=False)
class WorkFloor:
    """What iterations cost at least on one setup, per clock of F: the tables the bound charges."""

    clocks_mhz: np.ndarray  # F, descending (MHz)
    decode_above_idle_j: np.ndarray  # [clock, d - 1]: D(f, d), the engine's above-idle energy (J)
    decode_time_s: np.ndarray  # [clock, d - 1]: tau(f, d)
    token_counts: np.ndarray  # n_k, ascending, from 1 to max_num_tokens
    token_above_idle_j: np.ndarray  # [clock, k]: Phi(f, n_k) (J)
    token_time_s: np.ndarray  # [clock, k]: tau0(f, n_k)
    kv_above_idle_j: np.ndarray  # [clock]: least above-idle energy one cached token read adds (J)
    kv_time_s: np.ndarray  # [clock]: time it adds for sure: beta(f) if h = 1, else 0

    def per_decode_token_j(self, time_price_w: float) -> np.ndarray:
        """eps(B) for B = 1.. (index B - 1): the least (A + price * t) per decoding sequence."""
        cost = self.decode_above_idle_j + time_price_w * self.decode_time_s
        per_sequence = cost / np.arange(1, cost.shape[1] + 1)
        return np.minimum.accumulate(per_sequence.min(axis=0))

    def per_token_j(self, time_price_w: float) -> float:
        """phi: the least (A + price * t) per token of any iteration.

        Between tabulated counts n_k <= n < n_(k+1) the floor is at least its value at n_k (it
        never falls with tokens) over n_(k+1) - 1 tokens.
        """
        cost = self.token_above_idle_j + time_price_w * self.token_time_s
        most_tokens = np.append(self.token_counts[1:] - 1, self.token_counts[-1])
        return float((cost / most_tokens).min())

    def per_cached_token_j(self, time_price_w: float) -> float:
        """kappa: the least (A + price * t) one cached token read adds to an iteration."""
        return float((self.kv_above_idle_j + time_price_w * self.kv_time_s).min())


@dataclass(frozen=True, slots=True, eq=False)
class EnergyBound:
    """The theorem's bound for one replay at its best idle share l, with its terms."""

    total_j: float  # idle_j + max(decode_j, token_j) + kv_j: no schedule meeting the deadlines uses less
    idle_j: float  # l * c * last arrival
    decode_j: float  # sum over requests of (n_r - 1) * eps_l(B_r)
    token_j: float  # phi_l * sum over requests of (p_r + n_r - 1)
    kv_j: float  # kappa_l * cached tokens read
    idle_share: float  # l: the share of the idle floor charged to the time before the last arrival
    idle_power_w: float  # c = count * idle_w, the engine's least power
    last_arrival_s: float
    decode_tokens: int  # sum over requests of (n_r - 1)
    tokens: int  # sum over requests of (p_r + n_r - 1): what the iterations process
    cached_tokens_read: int  # sum over requests of (n_r - 1) * (p_r + n_r / 2)
    batch_caps: np.ndarray  # per request: B_r, the most sequences it can decode beside
    per_decode_token_j: np.ndarray  # eps_l(B) for B = 1.. (index B - 1)
    per_token_j: float  # phi_l
    per_cached_token_j: float  # kappa_l


def candidate_clocks_mhz(setup: TwinSetup, min_clock_mhz: int) -> tuple[int, ...]:
    """F: the supported clocks a schedule may run at (>= min_clock_mhz), highest first."""
    clocks = tuple(c for c in setup.gpu.sm_clocks_mhz if c >= min_clock_mhz)
    if not clocks:
        raise ValueError(
            f"no supported clock of {setup.gpu.name} at or above {min_clock_mhz} MHz "
            f"(max {setup.gpu.max_clock_mhz} MHz)"
        )
    return clocks


def max_decode_batch(setup: TwinSetup) -> int:
    """The most sequences one iteration can decode: the engine's batch and token limits."""
    return min(setup.engine.max_batch_size, setup.engine.max_num_tokens)


def token_counts(max_num_tokens: int) -> np.ndarray:
    """Where token floors are tabulated: every count up to EXACT_TOKEN_COUNTS, then geometric."""
    exact = np.arange(1, min(EXACT_TOKEN_COUNTS, max_num_tokens) + 1)
    steps = np.log(max_num_tokens / EXACT_TOKEN_COUNTS) / np.log(TOKEN_GRID_RATIO)
    spread = np.ceil(EXACT_TOKEN_COUNTS * TOKEN_GRID_RATIO ** np.arange(1, max(steps, 0.0) + 1))
    inside = spread[spread < max_num_tokens].astype(np.int64)
    return np.unique(np.concatenate([exact, inside, [max_num_tokens]]))


@functools.lru_cache(maxsize=16)
def work_floor(setup: TwinSetup, min_clock_mhz: int) -> WorkFloor:
    """The tables of `setup` on F, from the twin's own `iteration`, `token_floor` and `busy_w`.

    Cached per setup (about 0.3-0.5 s each): one `iteration` call per clock and decode batch, one
    `token_floor` call per clock and tabulated token count.
    """
    clocks = candidate_clocks_mhz(setup, min_clock_mhz)
    latency, power = setup.latency_model(), PowerModel(setup.gpu)
    idle_w, count = setup.gpu.idle_w, setup.tp
    batches = range(1, max_decode_batch(setup) + 1)
    counts = token_counts(setup.engine.max_num_tokens)
    host_never_hides_gpu = latency.runtime.host_ms_per_layer == 0
    k, a = power.activity.memory_bound, power.activity.attention
    kv_activity = k + (1 - k) * min(1.0, a)  # the least share of dynamic power a KV read draws
    decode: list[tuple[float, float]] = []  # (A, t) per clock, then batch
    token: list[tuple[float, float]] = []  # (A, t) per clock, then token count
    kv: list[tuple[float, float]] = []  # (A, t) per clock
    for clock in clocks:
        for batch in batches:
            cost = latency.iteration(clock, batch, 0)
            decode.append((count * (power.busy_w(clock, cost) - idle_w) * cost.time_s, cost.time_s))
        for tokens in counts.tolist():
            cost = latency.token_floor(clock, tokens)
            token.append((count * (power.busy_w(clock, cost) - idle_w) * cost.time_s, cost.time_s))
        beta = kv_read_s_per_token(latency, clock)
        floor_above_idle, dynamic = power_levels_w(power, clock)
        timed = beta if host_never_hides_gpu else 0.0
        kv.append((count * (beta * dynamic * kv_activity + timed * floor_above_idle), timed))
    decode_table = np.array(decode).reshape(len(clocks), len(batches), 2)
    token_table = np.array(token).reshape(len(clocks), len(counts), 2)
    kv_table = np.array(kv)
    floor = WorkFloor(
        clocks_mhz=np.array(clocks),
        decode_above_idle_j=decode_table[..., 0],
        decode_time_s=decode_table[..., 1],
        token_counts=counts,
        token_above_idle_j=token_table[..., 0],
        token_time_s=token_table[..., 1],
        kv_above_idle_j=kv_table[:, 0],
        kv_time_s=kv_table[:, 1],
    )
    for name in WorkFloor.__slots__:
        getattr(floor, name).flags.writeable = False  # shared by every caller of the cache
    return floor


def _range_max(values: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """max(values[left:right]) per pair (right > left), from a sparse table of powers of two."""
    levels = [values]
    while 2 ** len(levels) <= len(values):
        previous, width = levels[-1], 2 ** (len(levels) - 1)
        levels.append(np.maximum(previous[:-width], previous[width:]))
    level = np.floor(np.log2(right - left)).astype(np.intp)
    out = np.empty(len(left), dtype=values.dtype)
    for k in np.unique(level).tolist():
        rows = level == k
        out[rows] = np.maximum(levels[k][left[rows]], levels[k][right[rows] - 2**k])
    return out


def batch_caps(arrival_s: np.ndarray, deadlines_s: np.ndarray, cap: int) -> np.ndarray:
    """B_r: the most requests alive at one moment of r's window [a_r, D_r], at most `cap`.

    The count alive rises only at arrivals, so its maximum over a window is reached at an arrival
    inside it (r's own at least).
    """
    arrival = np.asarray(arrival_s, dtype=float)
    deadline = np.asarray(deadlines_s, dtype=float)
    if len(arrival) == 0:
        return np.zeros(0, dtype=np.int64)
    by_arrival = np.sort(arrival)
    alive_at_arrival = np.searchsorted(by_arrival, by_arrival, side="right") - np.searchsorted(
        np.sort(deadline), by_arrival, side="left"
    )
    left = np.searchsorted(by_arrival, arrival, side="left")
    right = np.searchsorted(by_arrival, deadline, side="right")
    return np.minimum(_range_max(alive_at_arrival, left, right), cap)


def served_output_tokens(requests: Sequence[Request]) -> np.ndarray:
    """Tokens each request generates on the twin (`Engine`'s own rule)."""
    return np.array([served_tokens(r) for r in requests], dtype=np.int64)


def slo_deadlines_s(
    requests: Sequence[Request], output_tokens: Sequence[int], target: SloPreset | Slo
) -> np.ndarray:
    """Latest finish per request under `target`: arrival + its E2E budget (inf: no E2E target)."""
    arrival = np.array([r.arrival_s for r in requests], dtype=float)
    return arrival + e2e_budget_s(target, np.asarray(output_tokens))


def energy_lower_bound(
    setup: TwinSetup,
    requests: Sequence[Request],
    output_tokens: Sequence[int],
    deadlines_s: Sequence[float],
    min_clock_mhz: int,
) -> EnergyBound:
    """The theorem's bound (module docstring) for `requests`, already fitted to the engine."""
    if setup.noise != 0:
        raise ValueError("the bound holds for the noiseless twin only (setup.noise must be 0)")
    arrival = np.array([r.arrival_s for r in requests], dtype=float)
    prompt = np.array([r.prompt_tokens for r in requests], dtype=np.int64)
    outputs = np.asarray(output_tokens, dtype=np.int64)
    deadline = np.asarray(deadlines_s, dtype=float)
    if not len(arrival) == len(outputs) == len(deadline):
        raise ValueError(
            f"one output length and one deadline per request: got {len(arrival)} requests, "
            f"{len(outputs)} lengths, {len(deadline)} deadlines"
        )
    if np.any(outputs < 1) or np.any(prompt < 1):
        raise ValueError("every request has at least one prompt token and generates at least one token")
    if np.any(arrival < 0) or np.any(np.isnan(deadline)) or np.any(deadline < arrival):
        raise ValueError("arrivals must be >= 0 and every deadline at or after its request's arrival")
    floor = work_floor(setup, min_clock_mhz)
    caps = batch_caps(arrival, deadline, max_decode_batch(setup))
    bounds = (
        _bound_at(share, floor, setup.tp * setup.gpu.idle_w, arrival, prompt, outputs, caps)
        for share in IDLE_SHARES.tolist()
    )
    return max(bounds, key=lambda bound: bound.total_j)


def _bound_at(
    idle_share: float,
    floor: WorkFloor,
    idle_power_w: float,
    arrival_s: np.ndarray,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    caps: np.ndarray,
) -> EnergyBound:
    """The theorem's bound at one l (`idle_share`)."""
    price_w = (1.0 - idle_share) * idle_power_w
    per_decode_token = floor.per_decode_token_j(price_w)
    per_token = floor.per_token_j(price_w)
    per_cached_token = floor.per_cached_token_j(price_w)
    decode_tokens = output_tokens - 1
    tokens = int(np.sum(prompt_tokens + decode_tokens))
    cached_tokens_read = int(np.sum(decode_tokens * prompt_tokens + decode_tokens * output_tokens // 2))
    decode_j = float(np.sum(decode_tokens * per_decode_token[caps - 1]))
    token_j = per_token * tokens
    kv_j = per_cached_token * cached_tokens_read
    last_arrival_s = float(arrival_s.max()) if len(arrival_s) else 0.0
    idle_j = idle_share * idle_power_w * last_arrival_s
    return EnergyBound(
        total_j=idle_j + max(decode_j, token_j) + kv_j,
        idle_j=idle_j,
        decode_j=decode_j,
        token_j=token_j,
        kv_j=kv_j,
        idle_share=idle_share,
        idle_power_w=idle_power_w,
        last_arrival_s=last_arrival_s,
        decode_tokens=int(decode_tokens.sum()),
        tokens=tokens,
        cached_tokens_read=cached_tokens_read,
        batch_caps=caps,
        per_decode_token_j=per_decode_token,
        per_token_j=per_token,
        per_cached_token_j=per_cached_token,
    )
