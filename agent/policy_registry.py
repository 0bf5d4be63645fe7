"""Every clock policy by name: one spec parser and one registry, for the live sidecar and the simulator.

A policy is written `name[:argument]` (`max`, `static:1050`, `throttllem:learned:conv`).
`PolicySpec.parse` is the only place that text is split, and says what is wrong with it. Each
entry of `POLICIES` says how its policy is written, whether the live sidecar can run it, whether
it is built from the engine's limits (live, known only once the engine reports them), whether it
gates admission (live, that needs the gateway), and how it is built from a `PolicyContext`.

`throttllem-exact` (throttllem with true output lengths and the twin's exact latency model, so
what throttllem's own decisions reach when its inputs are perfect; not an optimum: see
`agent.sim.hindsight`) needs that model, which the live sidecar must never import: only
`agent.sim` puts one in the context (`PolicyContext.exact_time_model`), so the sidecar refuses
it by its registry entry, without the twin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.catalog import DEFAULT_MIN_CLOCK_MHZ
from agent.control.admission import EngineLimits
from agent.control.frequency import PROBE_SMALL_TOKENS, IterationTimeModel
from agent.control.peers.dynamollm import DynamoLlmPolicy, PowerProfile
from agent.control.peers.ecofreq import CandidateList, EcoFreqPolicy
from agent.control.peers.greenllm import GreenLlmPolicy
from agent.control.peers.powercap import PowerCapPolicy
from agent.control.policies import MaxPolicy, Policy, ReactivePolicy, StaticPolicy, ThrottllemPolicy
from agent.control.slo import SloTargets
from agent.domain import GpuSpec
from agent.predict.ips import IpsModel
from agent.predict.lengths import LengthPredictor, OraclePredictor, parse_length_predictor
from agent.predict.timing import LearnedTimeModel

# Live requests have no true output length: only these length predictors work on them.
LIVE_LENGTH_SPECS = ("learned", "max_tokens")
IPS_CARD = "card.json"
# An exact time model for these candidate clocks and engine limits (the twin's, from agent.sim).
ExactTimeModel = Callable[[tuple[int, ...], EngineLimits], IterationTimeModel]
# An offline energy profile for these candidate clocks and engine limits (the twin's, from agent.sim).
PowerProfileSource = Callable[[tuple[int, ...], EngineLimits], PowerProfile]


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


@dataclass(frozen=True, slots=True)
class ServedEngine:
    """The engine a policy steers: its GPU, the model it serves at which TP, where trained models live."""

    gpu: GpuSpec
    model: str  # catalog name of the served model
    tp: int
    models_dir: Path  # trained models: <gpu>/<model>-tp<N>/ (IPS), lengths/

    def ips_card(self) -> Path:
        """The model card of this engine's shipped IPS model."""
        return ips_model_dir(self.models_dir, self.gpu.name, self.model, self.tp) / IPS_CARD


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """Everything a builder may use besides the spec; the shell that builds the policy fills it."""

    engine: ServedEngine
    targets: SloTargets
    limits: EngineLimits | None = None  # what the engine can hold; live: None until it reports them
    seed: int = 0  # seeds the length predictors that draw (noisy)
    ips_optimism_pct: float = 0.0  # throttllem's IPS model this much too optimistic (guard experiment)
    exact_time_model: ExactTimeModel | None = None  # the twin's: only agent.sim supplies one
    power_profile: PowerProfileSource | None = None  # the twin's: only agent.sim supplies one
    min_clock_mhz: int = DEFAULT_MIN_CLOCK_MHZ  # no policy locks below this (e.g. the sourced range)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ips_optimism_pct) and self.ips_optimism_pct >= 0):
            raise ValueError(f"IPS optimism must be a percentage >= 0, got {self.ips_optimism_pct}")

    def clocks_mhz(self) -> tuple[int, ...]:
        """The clocks a policy may choose here: profiled, and not below `min_clock_mhz`."""
        return tuple(c for c in profiled_clocks(self.engine.gpu) if c >= self.min_clock_mhz)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A policy as written, `name[:arg]`, checked against the registry when parsed."""

    name: str  # a key of POLICIES
    arg: str | None = None  # everything after the first ':'; None when there is none (or it is empty)

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        """The spec `text` writes; errors say what is wrong and list the known policies."""
        name, _, arg = text.partition(":")
        entry = POLICIES.get(name)
        if entry is None:
            raise ValueError(f"unknown policy {text!r}; known: {policy_syntax()}")
        if arg and entry.argument is None:
            raise ValueError(f"policy {text!r}: {name} takes no argument; known: {policy_syntax()}")
        if not arg and entry.argument is not None and not entry.argument_optional:
            raise ValueError(f"policy {text!r} lacks its argument: write {entry.syntax}")
        return cls(name, arg or None)

    @property
    def entry(self) -> PolicyEntry:
        """The registry's entry for this policy."""
        return POLICIES[self.name]

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg}"


def _nothing_to_check(spec: PolicySpec, engine: ServedEngine) -> None:
    """Live check of a policy that needs nothing beyond a well-formed spec."""


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """One policy of the registry: how it is written, what it needs, how it is built."""

    name: str
    build: Callable[[PolicySpec, PolicyContext], BuiltPolicy]
    argument: str | None = None  # what follows `name:`, as help shows it ("MHz"); None: nothing may
    argument_optional: bool = False
    needs_limits: bool = False  # built from the engine's limits (KV capacity sizes its model's tables)
    needs_trained_models: bool = False  # loads trained models (IPS, lengths) from the models directory
    gates_admission: bool = False  # its policy gates admission, known unbuilt: live, needs the gateway
    live_refusal: str | None = None  # why the live sidecar cannot run it; None: it can
    # Cheap checks before the live sidecar starts or switches to it: nothing is loaded.
    check_live: Callable[[PolicySpec, ServedEngine], None] = _nothing_to_check

    @property
    def syntax(self) -> str:
        """How the policy is written, for help and errors: `static:<MHz>`, `throttllem[:<...>]`."""
        if self.argument is None:
            return self.name
        if self.argument_optional:
            return f"{self.name}[:<{self.argument}>]"
        return f"{self.name}:<{self.argument}>"

    @property
    def runs_live(self) -> bool:
        """Whether the live sidecar can run it."""
        return self.live_refusal is None


def ips_model_dir(models_dir: Path, gpu: str, model: str, tp: int) -> Path:
    """Where the IPS model of one engine configuration lives."""
    return models_dir / gpu / f"{model}-tp{tp}"


def profiled_clocks(gpu: GpuSpec) -> tuple[int, ...]:
    """The GPU's clocks a policy may choose: the range the IPS models are profiled on."""
    return tuple(c for c in gpu.sm_clocks_mhz if c >= DEFAULT_MIN_CLOCK_MHZ)


def learned_time_model(
    engine: ServedEngine, limits: EngineLimits, clocks_mhz: tuple[int, ...]
) -> LearnedTimeModel:
    """The shipped IPS model of this engine, tabulated for its limits on those of `clocks_mhz` it knows."""
    ips = IpsModel(ips_model_dir(engine.models_dir, engine.gpu.name, engine.model, engine.tp))
    trained_from = ips.card["features"]["clock_mhz"]["min"]
    clocks = tuple(c for c in clocks_mhz if c >= trained_from)
    probes = (min(PROBE_SMALL_TOKENS, limits.max_num_tokens), limits.max_num_tokens)
    return LearnedTimeModel.build(
        ips, engine.tp, clocks, limits.max_batch_size, limits.kv_blocks, prefill_tokens=probes
    )


def _limits(spec: PolicySpec, context: PolicyContext) -> EngineLimits:
    if context.limits is None:
        raise ValueError(f"policy {str(spec)!r} needs the engine's limits (KV capacity, batch, tokens)")
    return context.limits


def _build_max(spec: PolicySpec, context: PolicyContext) -> BuiltPolicy:
    return BuiltPolicy(MaxPolicy(), None)


def _static_clock(spec: PolicySpec, gpu: GpuSpec) -> int:
    """The clock `static:<MHz>` locks, refused unless `gpu` supports it."""
    try:
        clock = int(spec.arg or "")  # no argument fails as any non-number does
    except ValueError:
        raise ValueError(f"policy {str(spec)!r}: static needs a clock in MHz, e.g. static:1050") from None
    if clock not in gpu.sm_clocks_mhz:
        raise ValueError(
            f"policy {str(spec)!r}: {clock} MHz is not a supported clock of {gpu.name} "
            f"({gpu.min_clock_mhz}..{gpu.max_clock_mhz} MHz in 15 MHz steps)"
        )
    return clock


def _check_static(spec: PolicySpec, engine: ServedEngine) -> None:
    _static_clock(spec, engine.gpu)


def _build_static(spec: PolicySpec, context: PolicyContext) -> BuiltPolicy:
    clock = _static_clock(spec, context.engine.gpu)
    if clock < context.min_clock_mhz:
        raise ValueError(
            f"policy {str(spec)!r}: {clock} MHz is below this run's lowest clock, {context.min_clock_mhz}"
        )
    return BuiltPolicy(StaticPolicy(clock), None)


def _build_reactive(spec: PolicySpec, context: PolicyContext) -> BuiltPolicy:
    return BuiltPolicy(ReactivePolicy(context.targets, context.clocks_mhz()), None)


def _check_throttllem(spec: PolicySpec, engine: ServedEngine) -> None:
    lengths = spec.arg or "learned"
    if lengths.partition(":")[0] not in LIVE_LENGTH_SPECS:
        raise ValueError(
            f"policy {str(spec)!r}: live requests have no true output length; use a length predictor "
            f"of {', '.join(LIVE_LENGTH_SPECS)} (e.g. throttllem:learned:conv)"
        )
    _check_ips_model(spec, engine)


def _check_ips_model(spec: PolicySpec, engine: ServedEngine) -> None:
    """Refuse a policy that decides with an IPS model this engine has none of."""
    card = engine.ips_card()
    if not card.is_file():
        raise ValueError(
            f"policy {str(spec)!r} needs the IPS model of {engine.gpu.name} / {engine.model} tp{engine.tp}, "
            f"but {card} does not exist: train one (throttllem profile, throttllem train) or choose another "
            "policy"
        )


def _build_throttllem(spec: PolicySpec, context: PolicyContext) -> BuiltPolicy:
    engine = context.engine
    time_model: IterationTimeModel = learned_time_model(engine, _limits(spec, context), context.clocks_mhz())
    lengths = parse_length_predictor(spec.arg or "learned", engine.models_dir, seed=context.seed)
    label = str(spec)
    if context.ips_optimism_pct:
        time_model = OptimisticTimeModel(time_model, 1.0 + context.ips_optimism_pct / 100.0)
        label = f"{label} (IPS +{context.ips_optimism_pct:g}%)"
    policy = ThrottllemPolicy(time_model, context.targets, engine.gpu.max_clock_mhz, name=label)
    return BuiltPolicy(policy, lengths)


THROTTLLEM_EXACT = "throttllem-exact"
EXACT_LIVE_REFUSAL = "needs true output lengths: it runs only in simulate and replay"


def _build_throttllem_exact(spec: PolicySpec, context: PolicyContext) -> BuiltPolicy:
    """The throttllem policy with an exact time model and true lengths: its inputs made perfect."""
    if context.exact_time_model is None:
        raise ValueError(f"policy {str(spec)!r} {EXACT_LIVE_REFUSAL}")
    gpu = context.engine.gpu
    model = context.exact_time_model(context.clocks_mhz(), _limits(spec, context))
    policy = ThrottllemPolicy(model, context.targets, gpu.max_clock_mhz, name=THROTTLLEM_EXACT, correct=False)
    return BuiltPolicy(policy, OraclePredictor())


def _ecofreq_candidates(spec: PolicySpec) -> CandidateList:
    """EcoFreq's own clock list (`voltana`, the default) or every clock (`full`)."""
    if spec.arg in (None, "voltana"):
        return "voltana"
    if spec.arg == "full":
        return "full"
    raise ValueError(f"policy {str(spec)!r}: EcoFreq's candidate clocks are voltana or full")


def _check_ecofreq(spec: PolicySpec, engine: ServedEngine) -> None:
    _ecofreq_candidates(spec)
    _check_ips_model(spec, engine)


def _build_ecofreq(spec: PolicySpec, context: PolicyContext) -> BuiltPolicy:
    """VoltanaLLM's EcoFreq, its latency tables fitted to the learned IPS model."""
    candidates = _ecofreq_candidates(spec)
    limits, clocks = _limits(spec, context), context.clocks_mhz()
    model = learned_time_model(context.engine, limits, clocks)
    policy = EcoFreqPolicy(model, context.targets, clocks, limits=limits, candidates=candidates)
    return BuiltPolicy(policy, None)


def _build_greenllm(spec: PolicySpec, context: PolicyContext) -> BuiltPolicy:
    return BuiltPolicy(GreenLlmPolicy(context.targets, context.clocks_mhz()), None)


def _power_limit_w(spec: PolicySpec, gpu: GpuSpec) -> float:
    """The watts `powercap:<W>` sets, refused outside what NVML lets `gpu` take."""
    try:
        watts = float(spec.arg or "")
    except ValueError:
        raise ValueError(f"policy {str(spec)!r}: powercap needs watts per GPU, e.g. powercap:250") from None
    if not (math.isfinite(watts) and gpu.min_power_limit_w <= watts <= gpu.tdp_w):
        raise ValueError(
            f"policy {str(spec)!r}: {spec.arg} W is outside {gpu.name}'s power limit range "
            f"{gpu.min_power_limit_w:g}..{gpu.tdp_w:g} W"
        )
    return watts


def _build_powercap(spec: PolicySpec, context: PolicyContext) -> BuiltPolicy:
    return BuiltPolicy(PowerCapPolicy(_power_limit_w(spec, context.engine.gpu)), None)


POWERCAP_LIVE_REFUSAL = (
    "sets a power limit, which the sidecar does not apply yet: it runs only in simulate and replay"
)
DYNAMOLLM_LIVE_REFUSAL = "needs an offline energy profile of the engine: it runs only in simulate and replay"


def _build_dynamollm(spec: PolicySpec, context: PolicyContext) -> BuiltPolicy:
    """DynamoLLM's instance-level rule, deciding with the learned IPS model and an energy profile."""
    if context.power_profile is None:
        raise ValueError(f"policy {str(spec)!r} {DYNAMOLLM_LIVE_REFUSAL}")
    engine, limits = context.engine, _limits(spec, context)
    time_model = learned_time_model(engine, limits, context.clocks_mhz())
    power = context.power_profile(tuple(int(c) for c in time_model.clocks_mhz), limits)
    lengths = parse_length_predictor(spec.arg or "learned", engine.models_dir, seed=context.seed)
    return BuiltPolicy(DynamoLlmPolicy(time_model, power, context.targets, engine.gpu.max_clock_mhz), lengths)


POLICIES: Mapping[str, PolicyEntry] = {
    entry.name: entry
    for entry in (
        PolicyEntry("max", _build_max),  # stock behaviour: the baseline
        PolicyEntry("static", _build_static, argument="MHz", check_live=_check_static),
        PolicyEntry("reactive", _build_reactive),  # feedback on measured TBT, no prediction
        PolicyEntry(
            "throttllem",
            _build_throttllem,
            argument="length predictor",
            argument_optional=True,
            needs_limits=True,
            needs_trained_models=True,
            gates_admission=True,
            check_live=_check_throttllem,
        ),
        PolicyEntry(
            THROTTLLEM_EXACT,
            _build_throttllem_exact,
            needs_limits=True,
            gates_admission=True,
            live_refusal=EXACT_LIVE_REFUSAL,
        ),
        PolicyEntry(
            "ecofreq",
            _build_ecofreq,
            argument="voltana|full",
            argument_optional=True,
            needs_limits=True,
            needs_trained_models=True,
            check_live=_check_ecofreq,
        ),
        PolicyEntry("greenllm", _build_greenllm),
        PolicyEntry("powercap", _build_powercap, argument="W", live_refusal=POWERCAP_LIVE_REFUSAL),
        PolicyEntry(
            "dynamollm",
            _build_dynamollm,
            argument="length predictor",
            argument_optional=True,
            needs_limits=True,
            needs_trained_models=True,
            gates_admission=True,
            live_refusal=DYNAMOLLM_LIVE_REFUSAL,
        ),
    )
}


def policy_syntax(live: bool = False) -> str:
    """How every policy is written, for help and errors; `live`: the sidecar's, the others named apart."""
    if not live:
        return " | ".join(entry.syntax for entry in POLICIES.values())
    runs = " | ".join(entry.syntax for entry in POLICIES.values() if entry.runs_live)
    others = ", ".join(entry.name for entry in POLICIES.values() if not entry.runs_live)
    return f"{runs} ({others}: simulate and replay only)" if others else runs


def build_policy(text: str, context: PolicyContext) -> BuiltPolicy:
    """The policy `text` names, built from `context` (errors list the known policies)."""
    spec = PolicySpec.parse(text)
    return spec.entry.build(spec, context)


def check_live_policy(text: str, engine: ServedEngine) -> PolicySpec:
    """The spec `text` writes, refused (saying why) unless the live sidecar can run it; nothing is loaded."""
    spec = PolicySpec.parse(text)
    if spec.entry.live_refusal is not None:
        raise ValueError(f"policy {text!r} {spec.entry.live_refusal}")
    spec.entry.check_live(spec, engine)
    return spec


def needs_limits(text: str) -> bool:
    """Whether `text` is built from the engine's limits, so live only once the engine reports them.

    False for text that names no registered policy: what builds it (a builder a test injects)
    needs no limits, and a wrong spec fails where it is built.
    """
    try:
        return PolicySpec.parse(text).entry.needs_limits
    except ValueError:
        return False
