"""Build any clock policy by name for a twin setup: the shell side of the policy catalogue.

`max` and `static:<MHz>` need nothing; `reactive` needs the SLO targets; `throttllem` needs the
shipped IPS model of the engine and a length predictor; `oracle` decides with the twin's own
latency model and the true output lengths — the floor throttllem is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.control.frequency import PROBE_SMALL_TOKENS
from agent.control.policies import Policy, ReactivePolicy, ThrottllemPolicy, parse_policy
from agent.control.slo import SloTargets
from agent.modeling.profile import DEFAULT_MIN_CLOCK_MHZ
from agent.predict.ips import IpsModel
from agent.predict.lengths import LengthPredictor, OraclePredictor, parse_length_predictor
from agent.predict.timing import LearnedTimeModel
from agent.twin.oracle import TwinTimeModel
from agent.twin.simulator import TwinSetup

POLICY_SPECS = "max | static:<MHz> | reactive | throttllem[:<length predictor>] | oracle"


@dataclass(frozen=True, slots=True)
class BuiltPolicy:
    """A policy and the length predictor its scoreboard needs (None: it does not gate)."""

    policy: Policy
    lengths: LengthPredictor | None


def ips_model_dir(models_dir: Path, gpu: str, model: str, tp: int) -> Path:
    """Where the IPS model of one engine configuration lives."""
    return models_dir / gpu / f"{model}-tp{tp}"


def build_policy(
    spec: str, setup: TwinSetup, targets: SloTargets, models_dir: Path, seed: int = 0
) -> BuiltPolicy:
    """The policy `spec` names, wired to `setup` (errors list the known names)."""
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
        learned = LearnedTimeModel.build(ips, setup.tp, clocks, *limits, prefill_tokens=probes)
        lengths = parse_length_predictor(arg or "learned", models_dir, seed=seed)
        label = "throttllem" if not arg else f"throttllem:{arg}"
        return BuiltPolicy(ThrottllemPolicy(learned, targets, gpu.max_clock_mhz, name=label), lengths)
    raise ValueError(f"unknown policy {spec!r}; known: {POLICY_SPECS}")
