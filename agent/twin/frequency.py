"""How compute-bound GPU work slows down and how its power falls as the SM clock is lowered.

Source: Perseus (SOSP 2024) A100-SXM4 stage profiles, GPT-3 175B and BLOOM 176B forward passes
(bf16, dense GEMMs), 855..1410 MHz in 15 MHz steps (`data/stage_profile__*_a100_sxm_bf16.csv`,
Apache-2.0, ml-energy/zeus@38cb3f9). For each stage, time and power (energy / time) are taken
relative to 1410 MHz, then averaged over the 16 stage curves.

Below 855 MHz there is no measurement: time is extrapolated with a least-squares fit of
t_rel = a + b * (f_max / f) and power with a straight line through the points below the
voltage knee (<= 1080 MHz). Other GPUs reuse the A100 curve on the normalised clock f / f_max.
The curves are made monotone (a higher clock is never slower, never draws less power) so that
measurement jitter in the source cannot make the twin reward a lower clock with more speed.

Memory-bound work (streaming weights and the KV cache) barely notices the SM clock until the SMs
can no longer issue loads fast enough to keep HBM busy; below that knee it slows like the clock:

    m(f) = (1 + (k f_max / f)^p)^(1/p) / (1 + k^p)^(1/p)

No A100 or H100 decode sweep below 1005 MHz is public. The one public sweep of LLM decode at
locked clocks across the knee is on a V100 (Slowist-Lee/log_vllm@91b6998,
`log/log_freq/workload_tpj_freq_summary.csv`: vLLM 0.17.1, Mistral-7B, 64-token prompt, one
request, 750..1300 MHz; no licence stated, so only these figures are quoted). The knee `k`
(a fraction of the max clock) and its sharpness `p` are fitted to it, and carried to A100 and
H100 on the normalised clock f / f_max like the compute curve (`MEMORY_KNEE` says how).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np

PERSEUS_FILES = ("stage_profile__gpt3-175b_a100_sxm_bf16.csv", "stage_profile__bloom_a100_sxm_bf16.csv")
PERSEUS_MAX_MHZ = 1410
POWER_FIT_BELOW_MHZ = 1080  # below the knee where voltage stops scaling with the clock
# V100 batch-1 decode time relative to 1300 MHz (the highest clock that sweep ran; V100 max 1530).
V100_MAX_MHZ = 1530
V100_REFERENCE_MHZ = 1300
V100_DECODE_SLOWDOWN = {1000: 1.0217, 950: 1.039, 900: 1.0676, 850: 1.14, 800: 1.1906, 750: 1.3449}
# Fitted (least squares on log time) so that the twin's batch-1 decode of Llama-2-7B on an
# A100-SXM4-80GB, on the normalised clock, slows as the V100 sweep does.
MEMORY_KNEE = 0.594
MEMORY_KNEE_SHARPNESS = 16.0


@dataclass(frozen=True, slots=True)
class PerseusCurve:
    """Mean forward-pass time and power relative to 1410 MHz, per measured clock."""

    clock_mhz: np.ndarray  # ascending
    time_rel: np.ndarray  # time(f) / time(1410)
    power_rel: np.ndarray  # power(f) / power(1410)


def _read_stage_profiles() -> dict[tuple[str, str], dict[int, tuple[float, float]]]:
    """(file, stage) -> clock -> (time_s, power_w) for forward passes."""
    curves: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for name in PERSEUS_FILES:
        text = resources.files("agent.twin").joinpath("data", name).read_text()
        for row in csv.DictReader(text.splitlines()):
            if row["instruction"] != "forward":
                continue
            time_s = float(row["time"])
            curves.setdefault((name, row["stage"]), {})[int(row["frequency"])] = (
                time_s,
                float(row["energy"]) / time_s,
            )
    return curves


@functools.cache
def perseus_curve() -> PerseusCurve:
    """The averaged A100 compute-bound curve, exactly as measured (no extrapolation)."""
    curves = _read_stage_profiles()
    clocks = sorted(set.intersection(*(set(c) for c in curves.values())))
    time_rel = np.mean([[c[f][0] / c[PERSEUS_MAX_MHZ][0] for f in clocks] for c in curves.values()], axis=0)
    power_rel = np.mean([[c[f][1] / c[PERSEUS_MAX_MHZ][1] for f in clocks] for c in curves.values()], axis=0)
    return PerseusCurve(np.array(clocks, dtype=float), time_rel, power_rel)


@dataclass(frozen=True, slots=True)
class FrequencyResponse:
    """Compute-bound slowdown and power ratio for one GPU, on every clock it supports."""

    max_clock_mhz: int
    clock_mhz: np.ndarray  # ascending grid on which the curves are tabulated (MHz, 1 MHz step)
    slowdown: np.ndarray  # compute-bound time multiplier vs max clock (>= 1)
    power_rel: np.ndarray  # compute-bound power vs max clock (<= 1)
    memory_slowdown: np.ndarray  # memory-bound time multiplier vs max clock (>= 1)

    def slowdown_at(self, clock_mhz: float) -> float:
        """Compute-bound time multiplier at `clock_mhz`."""
        return float(np.interp(clock_mhz, self.clock_mhz, self.slowdown))

    def memory_slowdown_at(self, clock_mhz: float) -> float:
        """Memory-bound time multiplier at `clock_mhz`."""
        return float(np.interp(clock_mhz, self.clock_mhz, self.memory_slowdown))

    def power_rel_at(self, clock_mhz: float) -> float:
        """Compute-bound power at `clock_mhz` relative to max clock."""
        return float(np.interp(clock_mhz, self.clock_mhz, self.power_rel))


def memory_slowdown(clock_mhz: np.ndarray, max_clock_mhz: float, knee: float, sharpness: float) -> np.ndarray:
    """m(f): memory-bound time at `clock_mhz` relative to max clock (see the module docstring)."""
    p = sharpness
    return ((1.0 + (knee * max_clock_mhz / clock_mhz) ** p) / (1.0 + knee**p)) ** (1.0 / p)


@functools.cache
def frequency_response(max_clock_mhz: int, min_clock_mhz: int) -> FrequencyResponse:
    """The A100-calibrated response mapped onto a GPU whose clocks span [min, max] MHz."""
    curve = perseus_curve()
    inv = PERSEUS_MAX_MHZ / curve.clock_mhz
    a, b = np.linalg.lstsq(np.column_stack([np.ones_like(inv), inv]), curve.time_rel, rcond=None)[0]
    knee = curve.clock_mhz <= POWER_FIT_BELOW_MHZ
    slope, intercept = np.polyfit(curve.clock_mhz[knee], curve.power_rel[knee], 1)

    grid = np.arange(min_clock_mhz, max_clock_mhz + 1, dtype=float)
    as_a100 = grid * PERSEUS_MAX_MHZ / max_clock_mhz  # normalised clock on the A100 axis
    measured = as_a100 >= curve.clock_mhz[0]
    slowdown = np.where(
        measured,
        np.interp(as_a100, curve.clock_mhz, curve.time_rel),
        a + b * PERSEUS_MAX_MHZ / as_a100,
    )
    power = np.where(
        measured, np.interp(as_a100, curve.clock_mhz, curve.power_rel), intercept + slope * as_a100
    )
    # Monotone: slowdown never rises with the clock, power never falls; 1.0 exactly at max.
    slowdown = np.maximum(np.minimum.accumulate(slowdown / slowdown[-1]), 1.0)
    power = np.minimum(np.maximum.accumulate(power / power[-1]), 1.0)
    memory = memory_slowdown(grid, max_clock_mhz, MEMORY_KNEE, MEMORY_KNEE_SHARPNESS)
    return FrequencyResponse(max_clock_mhz, grid, slowdown, power, memory)
