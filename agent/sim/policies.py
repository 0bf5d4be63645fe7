"""Build any clock policy by name for a twin setup: the policy catalogue plus the twin's oracle.

Everything but `oracle` is built by `agent.policy_factory`, as the live sidecar builds it, from
the engine limits the twin setup implies; `oracle` decides with the twin's own latency model and
the true output lengths — the floor throttllem is measured against.
"""

from __future__ import annotations

from pathlib import Path

from agent.control.admission import EngineLimits
from agent.control.policies import ThrottllemPolicy
from agent.control.slo import SloTargets
from agent.policy_factory import (
    LIVE_POLICY_NAMES,
    LIVE_POLICY_SPECS,
    BuiltPolicy,
    OptimisticTimeModel,
    check_optimism,
    ips_model_dir,
    needs_limits,
    profiled_clocks,
)
from agent.policy_factory import build_policy as build_engine_policy
from agent.predict.lengths import OraclePredictor
from agent.sim.oracle_model import TwinTimeModel
from agent.twin.setup import TwinSetup

__all__ = ["POLICY_SPECS", "BuiltPolicy", "OptimisticTimeModel", "build_policy", "ips_model_dir"]

POLICY_SPECS = f"{LIVE_POLICY_SPECS} | oracle"


def setup_limits(setup: TwinSetup) -> EngineLimits:
    """What the twin's engine can hold (raises ModelDoesNotFitError when nothing fits)."""
    engine = setup.engine
    return EngineLimits(
        setup.kv_blocks(), engine.tokens_per_block, engine.max_batch_size, engine.max_num_tokens
    )


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
    name = spec.partition(":")[0]
    if name not in (*LIVE_POLICY_NAMES, "oracle"):
        raise ValueError(f"unknown policy {spec!r}; known: {POLICY_SPECS}")
    if name == "oracle":
        check_optimism(ips_optimism_pct)
        limits = setup_limits(setup)
        model = TwinTimeModel(
            setup.latency_model(),
            profiled_clocks(setup.gpu),
            limits.max_batch_size,
            limits.kv_blocks,
            tokens_per_block=limits.tokens_per_block,
        )
        policy = ThrottllemPolicy(model, targets, setup.gpu.max_clock_mhz, name="oracle", correct=False)
        return BuiltPolicy(policy, OraclePredictor())
    return build_engine_policy(
        spec,
        setup.gpu,
        setup.model.name,
        setup.tp,
        setup_limits(setup) if needs_limits(spec) else None,
        targets,
        models_dir,
        seed=seed,
        ips_optimism_pct=ips_optimism_pct,
    )
