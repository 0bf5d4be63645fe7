"""Engine capacity profiles: the rate an engine size serves within an SLO, kept beside its IPS model.

The sizing state machine (`agent.control.scaling`) compares the measured arrival rate with each
engine size's profiled capacity. The profile is measured here, on the twin, with the replay's
own capacity search (`agent.bench.replay.find_peak`): the highest rate at which `max` (stock
clocks) still meets the SLO preset. Arrivals are steady (Poisson, seeded) with the request mix
of a trace window, so the figure is the engine's sustained capacity for that mix and not an
artefact of one window's bursts; the saturated completion rate is kept beside it.

One `capacity.json` per engine directory (`models/<gpu>/<model>-tp<N>/`) holds a list of
entries, one per (trace, SLO preset, engine limits, client max_tokens); profiling again replaces
the matching entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench.replay import capacity_rate_scale, find_peak, replay_slo, versions
from agent.policy_registry import ips_model_dir
from agent.sim.capacity import PROFILE_DURATION_S, PROFILE_START_S
from agent.slo_presets import SloPreset
from agent.twin.setup import TwinSetup
from agent.workloads import Workload

CAPACITY_FILE = "capacity.json"


class CapacityProfileError(LookupError):
    """No capacity profile matches what a pool replay needs."""


@dataclass(frozen=True, slots=True)
class CapacityKey:
    """What a capacity figure depends on besides the engine's size."""

    trace: str
    slo: str  # SLO preset name
    max_num_tokens: int
    chunked_context: bool
    max_tokens: int  # client max_tokens of every request

    @classmethod
    def of(cls, setup: TwinSetup, trace: str, preset: SloPreset, max_tokens: int) -> CapacityKey:
        """The key of `setup` serving `trace` under `preset`."""
        return cls(trace, preset.name, setup.engine.max_num_tokens, setup.engine.chunked_context, max_tokens)

    def command(self, setup: TwinSetup) -> str:
        """The command that profiles this key for `setup`."""
        chunked = " --chunked-context" if self.chunked_context else ""
        return (
            f"throttllem capacity --gpu {setup.gpu.name} --model {setup.model.name} --tp {setup.tp} "
            f"--trace {self.trace} --slo {self.slo} --max-num-tokens {self.max_num_tokens}{chunked} "
            f"--max-tokens {self.max_tokens}"
        )


@dataclass(frozen=True, slots=True)
class CapacityProfile:
    """One engine size's capacity for one key."""

    key: CapacityKey
    slo_rps: float  # highest steady rate at which max meets the SLO
    saturated_rps: float  # completion rate with every request arriving at once
    requests: int  # requests in the profiled mix
    window_s: tuple[float, float]  # (start, duration) of the trace window whose mix was profiled
    probes: tuple[tuple[float, float], ...]  # (rate in req/s, SLO attainment) of every max run

    def record(self) -> dict[str, Any]:
        """The JSON entry."""
        return {
            **asdict(self),
            "key": asdict(self.key),
            "window_s": list(self.window_s),
            "probes": [list(p) for p in self.probes],
        }


def steady_mix(workload: Workload, seed: int) -> Workload:
    """The window's requests in order, arriving as a Poisson process of 1 req/s (seeded)."""
    gaps = np.random.default_rng(seed).exponential(1.0, len(workload))
    arrival = np.cumsum(gaps) - gaps[0]
    return Workload(
        f"{workload.name}:poisson",
        arrival,
        workload.prompt_tokens,
        workload.output_tokens,
        float(arrival[-1]) if len(arrival) else 0.0,
    )


def profile_capacity(
    setup: TwinSetup,
    trace: Workload,
    trace_name: str,
    preset: SloPreset,
    max_tokens: int,
    seed: int = 0,
    window: tuple[float, float] = (PROFILE_START_S, PROFILE_DURATION_S),
) -> CapacityProfile:
    """Measure the capacity of `setup` for the mix of `trace`'s `window` (start, duration) under `preset`."""
    mix = steady_mix(trace.window(*window), seed)
    if len(mix) < 2:
        raise ValueError(f"{trace_name} has fewer than two requests in its profiling window")
    slo = replay_slo(preset)
    start = capacity_rate_scale(setup, mix, max_tokens)
    peak = find_peak(setup, mix, slo, start, max_tokens)
    rate = mix.mean_rate_rps
    return CapacityProfile(
        key=CapacityKey.of(setup, trace_name, preset, max_tokens),
        slo_rps=peak.rate_scale * rate,
        saturated_rps=start * rate,
        requests=len(mix),
        window_s=window,
        probes=tuple((p.rate_scale * rate, p.attainment) for p in peak.probes),
    )


def capacity_path(models_dir: Path, setup: TwinSetup) -> Path:
    """Where `setup`'s capacity profiles live: beside its IPS model."""
    return ips_model_dir(models_dir, setup.gpu.name, setup.model.name, setup.tp) / CAPACITY_FILE


def save_capacity(models_dir: Path, setup: TwinSetup, profile: CapacityProfile) -> Path:
    """Add `profile` to the engine's capacity file, replacing an entry with the same key."""
    path = capacity_path(models_dir, setup)
    entries = [e for e in _entries(path) if e["key"] != asdict(profile.key)]
    entries.append({**profile.record(), "created": datetime.now(UTC).isoformat(timespec="seconds")})
    entries.sort(key=lambda e: json.dumps(e["key"], sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "engine": {"gpu": setup.gpu.name, "model": setup.model.name, "tp": setup.tp},
        "method": "max meets the SLO preset at this steady (Poisson) rate of the trace window's mix; "
        "see agent/bench/capacities.py",
        "versions": versions(),
        "profiles": entries,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def load_capacity(models_dir: Path, setup: TwinSetup, key: CapacityKey) -> CapacityProfile:
    """The stored profile of `setup` for `key`; CapacityProfileError says how to make it."""
    path = capacity_path(models_dir, setup)
    for entry in _entries(path):
        if entry["key"] == asdict(key):
            return CapacityProfile(
                key=key,
                slo_rps=float(entry["slo_rps"]),
                saturated_rps=float(entry["saturated_rps"]),
                requests=int(entry["requests"]),
                window_s=(float(entry["window_s"][0]), float(entry["window_s"][1])),
                probes=tuple((float(r), float(a)) for r, a in entry["probes"]),
            )
    raise CapacityProfileError(
        f"no capacity profile of tp{setup.tp} for {key} in {path}; run: {key.command(setup)}"
    )


def load_capacities(
    models_dir: Path, setups: Mapping[int, TwinSetup], trace: str, preset: SloPreset, max_tokens: int
) -> dict[int, CapacityProfile]:
    """Every size's stored profile for the same trace, SLO and client cap, smallest size first."""
    return {
        size: load_capacity(models_dir, setup, CapacityKey.of(setup, trace, preset, max_tokens))
        for size, setup in sorted(setups.items())
    }


def _entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["profiles"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CapacityProfileError(
            f"{path} is not a capacity file ({err}); delete it and profile again"
        ) from err
    if not isinstance(entries, list):
        raise CapacityProfileError(f"{path}: 'profiles' must be a list")
    return entries
