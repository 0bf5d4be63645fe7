"""Build a clock policy from its spec for one engine on one GPU, without the twin.

The sidecar and the benchmarks share this: `max` and `static:<MHz>` need nothing; `reactive`
needs the SLO targets; `throttllem` needs the shipped IPS model of the engine, the engine's
limits (KV capacity sizes the model's lookup tables) and a length predictor. The `oracle`, which
decides with the twin's own latency model, is built in `agent.sim.policies`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.catalog import DEFAULT_MIN_CLOCK_MHZ
from agent.control.admission import EngineLimits
from agent.control.frequency import PROBE_SMALL_TOKENS, IterationTimeModel
from agent.control.policies import Policy, ReactivePolicy, ThrottllemPolicy, parse_policy
from agent.control.slo import SloTargets
from agent.domain import GpuSpec
from agent.predict.ips import IpsModel
from agent.predict.lengths import LengthPredictor, parse_length_predictor
from agent.predict.timing import LearnedTimeModel

LIVE_POLICY_NAMES = ("max", "static", "reactive", "throttllem")
LIVE_POLICY_SPECS = "max | static:<MHz> | reactive | throttllem[:<length predictor>]"
# Live requests have no true output length: only these length predictors work on them.
LIVE_LENGTH_SPECS = ("learned", "max_tokens")
IPS_CARD = "card.json"


class OptimisticTimeModel:
    """A time model that believes the engine runs `factor` times faster than `model` says.

    The guard experiment: a deliberately optimistic IPS model, to show that the guard's online
    correction and boost keep the SLOs when the model is wrong in the dangerous direction.
    """

    def __init__(self, model: IterationTimeModel, factor: float) -> None:
        self.model = model
        self.factor = factor

    @property
    def clocks_mhz(self) -> np.ndarray:
        """The wrapped model's candidate clocks."""
        return self.model.clocks_mhz

    def decode_s(self, clock_index: np.ndarray, batch: np.ndarray, kv_blocks: np.ndarray) -> np.ndarray:
        """Decode time, too short by `factor`."""
        return self.model.decode_s(clock_index, batch, kv_blocks) / self.factor

    def prefill_s(self, batch: int, kv_blocks: float, prefill_tokens: int) -> np.ndarray:
        """Prefill time, too short by `factor`."""
        return self.model.prefill_s(batch, kv_blocks, prefill_tokens) / self.factor


@dataclass(frozen=True, slots=True)
class BuiltPolicy:
    """A policy and the length predictor its scoreboard needs (None: it does not gate)."""

    policy: Policy
    lengths: LengthPredictor | None


def ips_model_dir(models_dir: Path, gpu: str, model: str, tp: int) -> Path:
    """Where the IPS model of one engine configuration lives."""
    return models_dir / gpu / f"{model}-tp{tp}"


def profiled_clocks(gpu: GpuSpec) -> tuple[int, ...]:
    """The GPU's clocks a policy may choose: the range the IPS models are profiled on."""
    return tuple(c for c in gpu.sm_clocks_mhz if c >= DEFAULT_MIN_CLOCK_MHZ)


def check_optimism(ips_optimism_pct: float) -> None:
    """Refuse an IPS optimism that is not a percentage >= 0."""
    if not (math.isfinite(ips_optimism_pct) and ips_optimism_pct >= 0):
        raise ValueError(f"IPS optimism must be a percentage >= 0, got {ips_optimism_pct}")


def needs_limits(spec: str) -> bool:
    """Whether building `spec` needs the engine's limits (known only once it reports them)."""
    return spec.partition(":")[0] == "throttllem"


def check_live_spec(spec: str, gpu: GpuSpec, models_dir: Path, model: str, tp: int) -> None:
    """Refuse a spec the live sidecar cannot run, saying why; cheap (no model is loaded)."""
    name, _, arg = spec.partition(":")
    if name in ("max", "static"):
        parse_policy(spec, gpu)
        return
    if name == "reactive" and not arg:
        return
    if name == "throttllem":
        lengths = arg or "learned"
        if lengths.partition(":")[0] not in LIVE_LENGTH_SPECS:
            raise ValueError(
                f"policy {spec!r}: live requests have no true output length; use a length predictor "
                f"of {', '.join(LIVE_LENGTH_SPECS)} (e.g. throttllem:learned:conv)"
            )
        card = ips_model_dir(models_dir, gpu.name, model, tp) / IPS_CARD
        if not card.is_file():
            raise ValueError(
                f"policy {spec!r} needs the IPS model of {gpu.name} / {model} tp{tp}, but {card} does "
                "not exist: train one (throttllem profile, throttllem train) or choose another policy"
            )
        return
    if name == "oracle":
        raise ValueError("policy 'oracle' needs true output lengths: it runs only in simulate and replay")
    raise ValueError(f"unknown policy {spec!r}; known: {LIVE_POLICY_SPECS}")


def build_policy(
    spec: str,
    gpu: GpuSpec,
    model: str,
    tp: int,
    limits: EngineLimits | None,
    targets: SloTargets,
    models_dir: Path,
    seed: int = 0,
    ips_optimism_pct: float = 0.0,
) -> BuiltPolicy:
    """The policy `spec` names for `model` at `tp` on `gpu` (errors list the known names).

    `limits` is required for throttllem (see `needs_limits`). `ips_optimism_pct` > 0 makes
    throttllem's IPS model that much too optimistic (the guard experiment); the label says so.
    """
    check_optimism(ips_optimism_pct)
    name, _, arg = spec.partition(":")
    if name in ("max", "static"):
        return BuiltPolicy(parse_policy(spec, gpu), None)
    if name == "reactive" and not arg:
        return BuiltPolicy(ReactivePolicy(targets, profiled_clocks(gpu)), None)
    if name == "throttllem":
        if limits is None:
            raise ValueError(f"policy {spec!r} needs the engine's limits (KV capacity, batch, tokens)")
        time_model: IterationTimeModel = learned_time_model(gpu, model, tp, limits, models_dir)
        lengths = parse_length_predictor(arg or "learned", models_dir, seed=seed)
        label = "throttllem" if not arg else f"throttllem:{arg}"
        if ips_optimism_pct:
            time_model = OptimisticTimeModel(time_model, 1.0 + ips_optimism_pct / 100.0)
            label = f"{label} (IPS +{ips_optimism_pct:g}%)"
        return BuiltPolicy(ThrottllemPolicy(time_model, targets, gpu.max_clock_mhz, name=label), lengths)
    raise ValueError(f"unknown policy {spec!r}; known: {LIVE_POLICY_SPECS}")


def learned_time_model(
    gpu: GpuSpec, model: str, tp: int, limits: EngineLimits, models_dir: Path
) -> LearnedTimeModel:
    """The shipped IPS model of this engine, tabulated for its limits on the clocks it was trained on."""
    ips = IpsModel(ips_model_dir(models_dir, gpu.name, model, tp))
    trained_from = ips.card["features"]["clock_mhz"]["min"]
    clocks = tuple(c for c in profiled_clocks(gpu) if c >= trained_from)
    probes = (min(PROBE_SMALL_TOKENS, limits.max_num_tokens), limits.max_num_tokens)
    return LearnedTimeModel.build(
        ips, tp, clocks, limits.max_batch_size, limits.kv_blocks, prefill_tokens=probes
    )
