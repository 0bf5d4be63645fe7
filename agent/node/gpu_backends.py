"""The node agent's GPUs: NVML in production, the twin's GPU endpoint in tests and demos.

Each GPU offers the clock actuator the sidecar would use directly (`NvmlActuator`,
`TwinActuator`), plus what only the agent does: the power-limit knob and the MIG check. Locked
clocks apply to a whole GPU, so a GPU in MIG mode (nvmlDeviceGetMigMode current = 1) refuses
clock changes: they would throttle other pods' instances.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import pynvml

from agent.gpus.base import Actuator, GpuControlError, NotSupportedError
from agent.gpus.nvml import DEFAULT_CALL_TIMEOUT_S, NvmlActuator, NvmlDevice, read_supported_clocks_mhz
from agent.gpus.twin import TwinActuator, TwinGpuClient

log = logging.getLogger(__name__)


class PowerLimitOutOfRange(ValueError):
    """A power limit outside what the GPU accepts; the message gives the range."""


class NodeGpu(Protocol):
    """One GPU of the node, as the agent steers it."""

    uuid: str
    product: str  # e.g. "NVIDIA A100-SXM4-80GB"
    actuator: Actuator
    mig: bool  # MIG mode on: clocks are not ours to lock

    async def set_power_limit_w(self, watts: float) -> None:
        """Cap board power at `watts`; NotSupportedError or PowerLimitOutOfRange when it cannot."""
        ...

    async def reset_power_limit(self) -> None:
        """Back to the default power limit (nothing where no limit can be set)."""
        ...

    async def close(self) -> None:
        """Release the device (without resetting: the agent resets explicitly)."""
        ...


class NvmlGpu:
    """A GPU through NVML; clocks through NvmlActuator, sharing its NVML session and worker thread."""

    def __init__(self, device: NvmlDevice, actuator: NvmlActuator, product: str, mig: bool) -> None:
        self._device = device
        self.uuid = device.uuid
        self.actuator = actuator
        self.product = product
        self.mig = mig

    @classmethod
    async def open(cls, index: int, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> NvmlGpu:
        """Open the GPU with NVML index `index`: its clocks, name and MIG mode."""
        device = await NvmlDevice.open(None, index, timeout_s)
        try:
            clocks = await read_supported_clocks_mhz(device)
            product = await device.call("read the name", pynvml.nvmlDeviceGetName, device.handle)
            mig = await _mig_enabled(device)
        except BaseException:
            await device.close()
            raise
        return cls(device, NvmlActuator(device, clocks), str(product), mig)

    async def set_power_limit_w(self, watts: float) -> None:
        """nvmlDeviceSetPowerManagementLimit, within nvmlDeviceGetPowerManagementLimitConstraints."""
        low_mw, high_mw = await self._device.call(
            "read the power-limit range",
            pynvml.nvmlDeviceGetPowerManagementLimitConstraints,
            self._device.handle,
        )
        milliwatts = round(watts * 1000)
        if not low_mw <= milliwatts <= high_mw:
            raise PowerLimitOutOfRange(
                f"{watts:g} W is outside {self.uuid}'s power-limit range "
                f"{low_mw / 1000:g}-{high_mw / 1000:g} W"
            )
        await self._device.call(
            f"set the power limit to {watts:g} W",
            pynvml.nvmlDeviceSetPowerManagementLimit,
            self._device.handle,
            milliwatts,
        )

    async def reset_power_limit(self) -> None:
        """Set nvmlDeviceGetPowerManagementDefaultLimit; a GPU without power management has none to reset."""
        try:
            default_mw = await self._device.call(
                "read the default power limit",
                pynvml.nvmlDeviceGetPowerManagementDefaultLimit,
                self._device.handle,
            )
            await self._device.call(
                "reset the power limit",
                pynvml.nvmlDeviceSetPowerManagementLimit,
                self._device.handle,
                default_mw,
            )
        except NotSupportedError as err:
            log.debug("%s has no power limit to reset: %s", self.uuid, err)

    async def close(self) -> None:
        """Shut this GPU's NVML session down."""
        await self._device.close()


async def _mig_enabled(device: NvmlDevice) -> bool:
    """MIG mode now (not pending); a GPU without MIG support is not in MIG mode."""
    try:
        current, _pending = await device.call("read the MIG mode", pynvml.nvmlDeviceGetMigMode, device.handle)
    except NotSupportedError:
        return False
    return bool(current == pynvml.NVML_DEVICE_MIG_ENABLE)


async def open_nvml_gpus(timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> list[NvmlGpu]:
    """Every GPU NVML sees on this node."""
    first = await NvmlGpu.open(0, timeout_s)
    gpus = [first]
    try:
        count = await first._device.call("count the GPUs", pynvml.nvmlDeviceGetCount)
        for index in range(1, int(count)):
            gpus.append(await NvmlGpu.open(index, timeout_s))
    except BaseException:
        for gpu in gpus:
            await gpu.close()
        raise
    return gpus


class TwinGpu:
    """The twin's GPU endpoint: clocks only; it has no power limit to set."""

    mig = False

    def __init__(self, actuator: TwinActuator, uuid: str, product: str) -> None:
        self.actuator = actuator
        self.uuid = uuid
        self.product = product

    @classmethod
    async def open(cls, base_url: str) -> TwinGpu:
        """Connect to one twin and read its GPU's identity."""
        client, state = await TwinGpuClient.open(base_url)
        return cls(TwinActuator(client, state), state.uuid, state.name)

    async def set_power_limit_w(self, watts: float) -> None:
        """Refused: the twin's endpoint (GET/POST/DELETE /twin/v1/gpu[/locked_clocks]) has no power limit."""
        raise NotSupportedError(
            f"{self.uuid} is a twin GPU: its endpoint offers no power-limit control; lock clocks instead"
        )

    async def reset_power_limit(self) -> None:
        """Nothing: no power limit can have been set on the twin."""

    async def close(self) -> None:
        """Close the HTTP session (TwinActuator.close resets only a lock it set itself)."""
        await self.actuator.close()


async def open_twin_gpus(urls: Sequence[str]) -> list[TwinGpu]:
    """One twin GPU per URL; distinct UUIDs required (each URL is one GPU)."""
    gpus: list[TwinGpu] = []
    try:
        for url in urls:
            gpu = await TwinGpu.open(url)
            if any(other.uuid == gpu.uuid for other in gpus):
                await gpu.close()
                raise GpuControlError(f"twin {url} reports {gpu.uuid}, as does another URL: one GPU per URL")
            gpus.append(gpu)
    except BaseException:
        for gpu in gpus:
            await gpu.close()
        raise
    return gpus
