"""Policies for a twin setup: the engine limits it implies, and a build context with the twin's exact model.

Every policy is built by `agent.policy_registry`, as the live sidecar builds it; what the twin
adds is what a live engine cannot give: its limits before it runs, and the exact latency model
`throttllem-exact` decides with (`agent.sim.exact_model`), beside the true output lengths.
"""

from __future__ import annotations

from pathlib import Path

from agent.catalog import DEFAULT_MIN_CLOCK_MHZ
from agent.control.admission import EngineLimits
from agent.control.frequency import IterationTimeModel
from agent.control.peers.dynamollm import PowerProfile
from agent.control.slo import SloTargets
from agent.policy_registry import PolicyContext, ServedEngine
from agent.sim.exact_model import TwinDecodePower, TwinTimeModel
from agent.twin.power import PowerModel
from agent.twin.setup import TwinSetup


def setup_limits(setup: TwinSetup) -> EngineLimits:
    """What the twin's engine can hold (raises ModelDoesNotFitError when nothing fits)."""
    engine = setup.engine
    return EngineLimits(
        setup.kv_blocks(), engine.tokens_per_block, engine.max_batch_size, engine.max_num_tokens
    )


def policy_context(
    setup: TwinSetup,
    targets: SloTargets,
    models_dir: Path,
    seed: int = 0,
    ips_optimism_pct: float = 0.0,
    min_clock_mhz: int = DEFAULT_MIN_CLOCK_MHZ,
) -> PolicyContext:
    """What any policy is built from on `setup`, the exact time model of `throttllem-exact` included.

    `ips_optimism_pct` > 0 makes throttllem's IPS model that much too optimistic (the guard
    experiment); the policy's label says so. No policy locks below `min_clock_mhz`.
    """

    def exact_time_model(clocks_mhz: tuple[int, ...], limits: EngineLimits) -> IterationTimeModel:
        return TwinTimeModel(
            setup.latency_model(),
            clocks_mhz,
            limits.max_batch_size,
            limits.kv_blocks,
            tokens_per_block=limits.tokens_per_block,
        )

    def decode_power(clocks_mhz: tuple[int, ...], limits: EngineLimits) -> PowerProfile:
        return TwinDecodePower(
            setup.latency_model(), PowerModel(setup.gpu), setup.tp, clocks_mhz, limits.tokens_per_block
        )

    return PolicyContext(
        engine=ServedEngine(setup.gpu, setup.model.name, setup.tp, models_dir),
        targets=targets,
        limits=setup_limits(setup),
        seed=seed,
        ips_optimism_pct=ips_optimism_pct,
        exact_time_model=exact_time_model,
        power_profile=decode_power,
        min_clock_mhz=min_clock_mhz,
    )
