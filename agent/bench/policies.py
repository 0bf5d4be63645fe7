"""Build any clock policy by name for a twin setup: the shell side of the policy catalogue.

`max` and `static:<MHz>` need nothing; `reactive` needs the SLO targets; `throttllem` needs the
shipped IPS model of the engine and a length predictor; `oracle` decides with the twin's own
latency model and the true output lengths — the floor throttllem is measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.control.frequency import PROBE_SMALL_TOKENS, IterationTimeModel
from agent.control.policies import Policy, ReactivePolicy, ThrottllemPolicy, parse_policy
from agent.control.slo import SloTargets
from agent.modeling.profile import DEFAULT_MIN_CLOCK_MHZ
from agent.predict.ips import IpsModel
from agent.predict.lengths import LengthPredictor, OraclePredictor, parse_length_predictor
from agent.predict.timing import LearnedTimeModel
from agent.twin.oracle import TwinTimeModel
from agent.twin.simulator import TwinSetup

POLICY_SPECS = "max | static:<MHz> | reactive | throttllem[:<length predictor>] | oracle"


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


def build_policy(
    spec: str,
    setup: TwinSetup,
    targets: SloTargets,
    models_dir: Path,
    seed: int = 0,
    ips_optimism_pct: float = 0.0,
) -> BuiltPolicy:
    """The policy `spec` names, wired to `setup` (errors list the known names).

    `ips_optimism_pct` > 0 makes throttllem's IPS model that much too optimistic (the guard
    experiment); the policy's label says so.
    """
    if not (math.isfinite(ips_optimism_pct) and ips_optimism_pct >= 0):
        raise ValueError(f"IPS optimism must be a percentage >= 0, got {ips_optimism_pct}")
    name, _, arg = spec.partition(":")
    gpu = setup.gpu
    if name in ("max", "static"):
        return BuiltPolicy(parse_policy(spec, gpu), None)
    candidates = tuple(c for c in gpu.sm_clocks_mhz if c >= DEFAULT_MIN_CLOCK_MHZ)  # the profiled range
    if name == "reactive":
        return BuiltPolicy(ReactivePolicy(targets, candidates), None)
    limits = (setup.engine.max_batch_size, setup.kv_blocks())
    if name == "oracle":
        model = TwinTimeModel(
            setup.latency_model(), candidates, *limits, tokens_per_block=setup.engine.tokens_per_block
        )
        policy = ThrottllemPolicy(model, targets, gpu.max_clock_mhz, name="oracle", correct=False)
        return BuiltPolicy(policy, OraclePredictor())
    if name == "throttllem":
        ips = IpsModel(ips_model_dir(models_dir, gpu.name, setup.model.name, setup.tp))
        trained_from = ips.card["features"]["clock_mhz"]["min"]
        clocks = tuple(c for c in candidates if c >= trained_from)
        probes = (min(PROBE_SMALL_TOKENS, setup.engine.max_num_tokens), setup.engine.max_num_tokens)
        model: IterationTimeModel = LearnedTimeModel.build(
            ips, setup.tp, clocks, *limits, prefill_tokens=probes
        )
        lengths = parse_length_predictor(arg or "learned", models_dir, seed=seed)
        label = "throttllem" if not arg else f"throttllem:{arg}"
        if ips_optimism_pct:
            model = OptimisticTimeModel(model, 1.0 + ips_optimism_pct / 100.0)
            label = f"{label} (IPS +{ips_optimism_pct:g}%)"
        return BuiltPolicy(ThrottllemPolicy(model, targets, gpu.max_clock_mhz, name=label), lengths)
    raise ValueError(f"unknown policy {spec!r}; known: {POLICY_SPECS}")
