"""GPU actuators (set the SM clock) and meters (read energy), one class per backend.

`build_actuator` and `build_meter` pick the backend by kind, as THROTTLLEM_ACTUATOR names it.
They are coroutines because opening NVML or an HTTP endpoint blocks or does I/O.
"""

from __future__ import annotations

import logging

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
from agent.gpus.nvml import NvmlActuator, NvmlMeter
from agent.gpus.twin import TwinActuator, TwinMeter

__all__ = [
    "ACTUATOR_KINDS",
    "METER_KINDS",
    "Actuator",
    "DcgmMeter",
    "DriverNotLoadedError",
    "DryRunActuator",
    "GpuControlError",
    "GpuLostError",
    "GpuNotFoundError",
    "Meter",
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
]

log = logging.getLogger(__name__)

ACTUATOR_KINDS = ("nvml", "twin", "dryrun")
METER_KINDS = ("nvml", "dcgm", "twin")


async def build_actuator(
    kind: str,
    *,
    uuid: str | None = None,
    index: int | None = None,
    twin_url: str | None = None,
    gpu_spec: GpuSpec | None = None,
) -> Actuator:
    """Open the actuator `kind`: nvml (by uuid or index), twin (twin_url), or dryrun.

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
        try:
            observed = await NvmlActuator.open(uuid=uuid, index=index)
        except GpuControlError as err:
            if gpu_spec is None:
                raise
            log.warning("dry-run without NVML, clocks from the catalog's %s: %s", gpu_spec.name, err)
            return DryRunActuator.from_spec(gpu_spec)
        return await DryRunActuator.observing(observed)
    if gpu_spec is not None:
        return DryRunActuator.from_spec(gpu_spec)
    raise ValueError("a dryrun actuator needs uuid or index (NVML, read-only), twin_url, or gpu_spec")


def _required(value: str | None, what: str, kind: str) -> str:
    if value is None:
        raise ValueError(f"a {kind} backend needs {what}")
    return value
