"""GPU actuators (set the SM clock) and meters (read energy), one class per backend.

`build_actuator` and `build_meter` pick the backend by kind, as THROTTLLEM_ACTUATOR names it.
They are coroutines because opening NVML or an HTTP endpoint blocks or does I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TypeVar

from agent.domain import GpuSpec
from agent.gpus.base import (
    Actuator,
    DriverNotLoadedError,
    GpuControlError,
    GpuLostError,
    GpuNotFoundError,
    Meter,
    NotSupportedError,
    PermissionDeniedError,
    TransientGpuError,
    UnsupportedClockError,
)
from agent.gpus.dcgm import DEFAULT_URL as DCGM_DEFAULT_URL
from agent.gpus.dcgm import DcgmMeter
from agent.gpus.dryrun import DryRunActuator
from agent.gpus.group import ActuatorGroup, MeterGroup, open_all
from agent.gpus.node_agent import LeaseRefusedError, NodeAgentActuator, NodeAgentTarget
from agent.gpus.nvml import NvmlActuator, NvmlMeter
from agent.gpus.twin import TwinActuator, TwinMeter

__all__ = [
    "ACTUATOR_KINDS",
    "METER_KINDS",
    "Actuator",
    "ActuatorGroup",
    "DcgmMeter",
    "DriverNotLoadedError",
    "DryRunActuator",
    "GpuControlError",
    "GpuLostError",
    "GpuNotFoundError",
    "LeaseRefusedError",
    "Meter",
    "MeterGroup",
    "NodeAgentActuator",
    "NodeAgentTarget",
    "NotSupportedError",
    "NvmlActuator",
    "NvmlMeter",
    "PermissionDeniedError",
    "TransientGpuError",
    "TwinActuator",
    "TwinMeter",
    "UnsupportedClockError",
    "build_actuator",
    "build_meter",
    "open_engine_actuator",
    "open_engine_meter",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

ACTUATOR_KINDS = ("nvml", "twin", "dryrun", "node")
METER_KINDS = ("nvml", "dcgm", "twin")


async def build_actuator(
    kind: str,
    *,
    uuid: str | None = None,
    index: int | None = None,
    twin_url: str | None = None,
    gpu_spec: GpuSpec | None = None,
    node_agent: NodeAgentTarget | None = None,
) -> Actuator:
    """Open the actuator `kind`: nvml (by uuid or index), twin (twin_url), dryrun, or node (node_agent).

    dryrun observes the twin when given twin_url, NVML read-only when given uuid or index
    (falling back to gpu_spec's clocks if NVML is unusable), else takes gpu_spec's clocks.
    """
    match kind:
        case "nvml":
            return await NvmlActuator.open(uuid=uuid, index=index)
        case "twin":
            return await TwinActuator.open(_required(twin_url, "twin_url", kind))
        case "dryrun":
            return await _dry_run(uuid, index, twin_url, gpu_spec)
        case "node":
            target = _required(node_agent, "node_agent", kind)
            return await NodeAgentActuator.open(target, () if uuid is None else (uuid,))
    raise ValueError(f"unknown actuator kind {kind!r}; allowed: {', '.join(ACTUATOR_KINDS)}")


async def build_meter(
    kind: str,
    *,
    uuid: str | None = None,
    index: int | None = None,
    twin_url: str | None = None,
    dcgm_url: str = DCGM_DEFAULT_URL,
) -> Meter:
    """Open the meter `kind`: nvml or dcgm (by uuid or index), or twin (twin_url)."""
    match kind:
        case "nvml":
            return await NvmlMeter.open(uuid=uuid, index=index)
        case "dcgm":
            return await DcgmMeter.open(dcgm_url, uuid=uuid, index=index)
        case "twin":
            return await TwinMeter.open(_required(twin_url, "twin_url", kind))
    raise ValueError(f"unknown meter kind {kind!r}; allowed: {', '.join(METER_KINDS)}")


async def _dry_run(
    uuid: str | None, index: int | None, twin_url: str | None, gpu_spec: GpuSpec | None
) -> DryRunActuator:
    if twin_url is not None:
        return await DryRunActuator.observing(await TwinActuator.open(twin_url))
    if uuid is not None or index is not None:
        return await _observing_nvml(partial(NvmlActuator.open, uuid=uuid, index=index), gpu_spec)
    if gpu_spec is not None:
        return DryRunActuator.from_spec(gpu_spec)
    raise ValueError("a dryrun actuator needs uuid or index (NVML, read-only), twin_url, or gpu_spec")


async def open_engine_actuator(
    kind: str,
    *,
    uuids: Sequence[str] = (),
    index: int | None = None,
    twin_url: str | None = None,
    gpu_spec: GpuSpec | None = None,
    node_agent: NodeAgentTarget | None = None,
) -> Actuator:
    """The actuator of a whole engine: every GPU in `uuids` locked as one (see `agent.gpus.group`).

    One UUID (or an index) is `build_actuator`'s single GPU. The twin serves one engine and
    steers all its GPUs behind one endpoint, so it needs no list. The node agent leases them
    all on one connection (no list: every GPU it allows this pod).
    """
    if kind == "node":
        return await NodeAgentActuator.open(_required(node_agent, "node_agent", kind), tuple(uuids))
    if len(uuids) <= 1 or kind == "twin":
        return await build_actuator(
            kind, uuid=uuids[0] if uuids else None, index=index, twin_url=twin_url, gpu_spec=gpu_spec
        )
    if kind == "nvml":
        return await ActuatorGroup.of(await _open_nvml_actuators(uuids))
    if kind == "dryrun":

        async def group() -> Actuator:
            return await ActuatorGroup.of(await _open_nvml_actuators(uuids))

        return await _observing_nvml(group, gpu_spec)
    raise ValueError(f"unknown actuator kind {kind!r}; allowed: {', '.join(ACTUATOR_KINDS)}")


async def _open_nvml_actuators(uuids: Sequence[str]) -> list[NvmlActuator]:
    openers = [partial(NvmlActuator.open, uuid=uuid) for uuid in uuids]
    return await open_all(openers, lambda actuator: actuator.close())


async def open_engine_meter(
    kind: str,
    *,
    uuids: Sequence[str] = (),
    index: int | None = None,
    twin_url: str | None = None,
    dcgm_url: str = DCGM_DEFAULT_URL,
) -> Meter:
    """The meter of a whole engine: energy and power summed over every GPU in `uuids`."""
    if len(uuids) <= 1 or kind == "twin":
        return await build_meter(
            kind, uuid=uuids[0] if uuids else None, index=index, twin_url=twin_url, dcgm_url=dcgm_url
        )
    match kind:
        case "nvml":
            openers = [partial(NvmlMeter.open, uuid=uuid) for uuid in uuids]
        case "dcgm":
            openers = [partial(DcgmMeter.open, dcgm_url, uuid=uuid) for uuid in uuids]
        case _:
            raise ValueError(f"unknown meter kind {kind!r}; allowed: {', '.join(METER_KINDS)}")
    return MeterGroup(await open_all(openers, lambda meter: meter.close()))


async def _observing_nvml(
    open_nvml: Callable[[], Awaitable[Actuator]], gpu_spec: GpuSpec | None
) -> DryRunActuator:
    """Dry-run observing NVML read-only; without usable NVML, the catalog's clocks for `gpu_spec`."""
    try:
        observed = await open_nvml()
    except GpuControlError as err:
        if gpu_spec is None:
            raise
        log.warning("dry-run without NVML, clocks from the catalog's %s: %s", gpu_spec.name, err)
        return DryRunActuator.from_spec(gpu_spec)
    return await DryRunActuator.observing(observed)


def _required(value: T | None, what: str, kind: str) -> T:
    if value is None:
        raise ValueError(f"a {kind} backend needs {what}")
    return value
