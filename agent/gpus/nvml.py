"""NVML actuator and meter, through nvidia-ml-py (module `pynvml`).

Every NVML call runs on one worker thread per opened device, never on the event loop. NVML
calls are blocking ctypes calls whose latency is unpublished (interfaces.md §4.4) and which can
hang when the driver is wedged; a stalled loop would stop the proxy serving. One thread, not
`asyncio.to_thread`'s pool, keeps calls in submission order, so a reset issued after a lock is
applied after it. The hop costs ~0.2 ms (measured on a 2-core x86 CPU); setters skip no-op
changes, so the control loop pays it only when the clock really moves.

Reads (clocks, energy, power) need no privilege; locking and resetting clocks need
CAP_SYS_ADMIN (NVML "device commands").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pynvml

from agent.gpus.base import (
    DRYRUN_ADVICE,
    PERMISSION_ADVICE,
    DriverNotLoadedError,
    EnergyAccumulator,
    GpuControlError,
    GpuLostError,
    GpuNotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    TransientGpuError,
    check_supported_clock,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CALL_TIMEOUT_S = 5.0  # far above any healthy NVML call; beyond it the driver is hung
INIT_TIMEOUT_S = 60.0  # nvmlInit without the persistence daemon brings every GPU up: seconds each

_NO_DRIVER_ADVICE = (
    "install the NVIDIA driver; in a container use the NVIDIA runtime with "
    "NVIDIA_DRIVER_CAPABILITIES including `utility` so libnvidia-ml.so.1 is mounted; "
    "on a machine without a GPU use THROTTLLEM_ACTUATOR=twin"
)
_NOT_FOUND_ADVICE = (
    "list GPUs with `nvidia-smi -L` and pass the UUID (GPU-...), which Triton reports in the "
    "gpu_uuid label of nv_gpu_utilization; NVML indices ignore CUDA_VISIBLE_DEVICES"
)


def _translate(err: pynvml.NVMLError, action: str, device: str, lookup: bool) -> GpuControlError:
    """Map an NVML error to ours, with what to do; `lookup` marks device selection calls."""
    what = f"NVML could not {action} on {device} ({err})"
    if lookup and isinstance(
        err, pynvml.NVMLError_NotFound | pynvml.NVMLError_GpuNotFound | pynvml.NVMLError_InvalidArgument
    ):
        return GpuNotFoundError(f"{what}: {_NOT_FOUND_ADVICE}")
    if isinstance(err, pynvml.NVMLError_NoPermission):
        return PermissionDeniedError(f"{what}: {PERMISSION_ADVICE}")
    if isinstance(
        err,
        pynvml.NVMLError_NotSupported
        | pynvml.NVMLError_FunctionNotFound
        | pynvml.NVMLError_FreqNotSupported
        | pynvml.NVMLError_Deprecated,
    ):
        return NotSupportedError(
            f"{what}: locked SM clocks need a Volta or newer GPU, a whole device (not a MIG "
            f"instance) and a recent driver; {DRYRUN_ADVICE}"
        )
    if isinstance(err, pynvml.NVMLError_GpuIsLost | pynvml.NVMLError_ResetRequired):
        return GpuLostError(
            f"{what}: the GPU fell off the bus or needs a reset; check `nvidia-smi` and the "
            "kernel log for Xid errors, then reset the GPU or reboot"
        )
    if isinstance(err, pynvml.NVMLError_LibraryNotFound | pynvml.NVMLError_DriverNotLoaded):
        return DriverNotLoadedError(f"{what}: {_NO_DRIVER_ADVICE}")
    if isinstance(err, pynvml.NVMLError_LibRmVersionMismatch):
        return DriverNotLoadedError(
            f"{what}: the NVML library and the kernel driver differ in version; reload the "
            "driver or reboot after a driver upgrade"
        )
    if isinstance(
        err,
        pynvml.NVMLError_Timeout
        | pynvml.NVMLError_NoData
        | pynvml.NVMLError_InUse
        | pynvml.NVMLError_NotReady,
    ):
        return TransientGpuError(f"{what}: retry later")
    return GpuControlError(what)


class NvmlDevice:
    """One NVML session bound to one GPU; every call goes through `call`, on one worker thread."""

    def __init__(self, executor: ThreadPoolExecutor, handle: Any, uuid: str, timeout_s: float) -> None:
        self._executor = executor
        self.handle = handle  # pynvml device handle
        self.uuid = uuid  # "GPU-..." as NVML reports it
        self._timeout_s = timeout_s
        self._closed = False

    @classmethod
    async def open(cls, uuid: str | None, index: int | None, timeout_s: float) -> NvmlDevice:
        """Initialise NVML and find the GPU by UUID (preferred: stable) or NVML index."""
        if (uuid is None) == (index is None):
            raise ValueError("select the GPU by exactly one of uuid (preferred) or index")
        selector = f"GPU {uuid}" if uuid is not None else f"GPU index {index}"
        find, key = (
            (pynvml.nvmlDeviceGetHandleByUUID, uuid)
            if uuid is not None
            else (pynvml.nvmlDeviceGetHandleByIndex, index)
        )
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        try:
            await _run(executor, INIT_TIMEOUT_S, "initialise", selector, pynvml.nvmlInit)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        try:
            handle = await _run(executor, timeout_s, "find the device", selector, find, key, lookup=True)
            found_uuid = await _run(
                executor, timeout_s, "read the UUID", selector, pynvml.nvmlDeviceGetUUID, handle
            )
        except BaseException:
            await _shutdown(executor, timeout_s)
            raise
        log.info("NVML opened %s (%s)", found_uuid, selector)
        return cls(executor, handle, found_uuid, timeout_s)

    async def call(self, action: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one NVML function off the loop, translating its errors."""
        return await _run(self._executor, self._timeout_s, action, self.uuid, fn, *args)

    async def close(self) -> None:
        """Shut NVML down for this session (NVML counts nvmlInit calls); idempotent."""
        if self._closed:
            return
        self._closed = True
        await _shutdown(self._executor, self._timeout_s)


async def _run(
    executor: ThreadPoolExecutor,
    timeout_s: float,
    action: str,
    device: str,
    fn: Callable[..., T],
    *args: Any,
    lookup: bool = False,
) -> T:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(executor, fn, *args), timeout_s)
    except pynvml.NVMLError as err:
        raise _translate(err, action, device, lookup) from err
    except TimeoutError as err:
        raise GpuLostError(
            f"NVML did not {action} on {device} within {timeout_s:g} s: the driver may be hung; "
            "check `nvidia-smi` and the kernel log for Xid errors"
        ) from err


async def _shutdown(executor: ThreadPoolExecutor, timeout_s: float) -> None:
    """nvmlShutdown, logging rather than raising: it runs on the way out."""
    try:
        await _run(executor, timeout_s, "shut down", "NVML", pynvml.nvmlShutdown)
    except GpuControlError as err:
        log.warning("%s", err)
    executor.shutdown(wait=False, cancel_futures=True)


async def read_supported_clocks_mhz(device: NvmlDevice) -> tuple[int, ...]:
    """SM clocks at the highest memory clock (the one an inference server runs at), highest first."""
    mem_clocks = await device.call(
        "list memory clocks", pynvml.nvmlDeviceGetSupportedMemoryClocks, device.handle
    )
    if not mem_clocks:
        raise NotSupportedError(f"{device.uuid} lists no memory clocks; {DRYRUN_ADVICE}")
    sm_clocks = await device.call(
        "list SM clocks", pynvml.nvmlDeviceGetSupportedGraphicsClocks, device.handle, max(mem_clocks)
    )
    if not sm_clocks:
        raise NotSupportedError(f"{device.uuid} lists no SM clocks; {DRYRUN_ADVICE}")
    return tuple(sorted(set(sm_clocks), reverse=True))


class NvmlActuator:
    """Locks the SM clock of one GPU with nvmlDeviceSetGpuLockedClocks(f, f)."""

    actuates = True

    def __init__(self, device: NvmlDevice, clocks_mhz: tuple[int, ...]) -> None:
        self._device = device
        self._clocks_mhz = clocks_mhz  # fixed for a device: read once at open
        self._locked_mhz: int | None = None  # the lock this actuator set, None when reset
        self.clock_changes = 0  # locks actually sent to the GPU

    @classmethod
    async def open(
        cls, *, uuid: str | None = None, index: int | None = None, timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    ) -> NvmlActuator:
        """Open the GPU and read its supported clocks; does not touch the current lock."""
        device = await NvmlDevice.open(uuid, index, timeout_s)
        try:
            clocks = await read_supported_clocks_mhz(device)
        except BaseException:
            await device.close()
            raise
        log.info("NVML actuator on %s: SM clocks %d-%d MHz", device.uuid, clocks[-1], clocks[0])
        return cls(device, clocks)

    @property
    def name(self) -> str:
        """Backend and device UUID."""
        return f"nvml:{self._device.uuid}"

    async def supported_clocks_mhz(self) -> tuple[int, ...]:
        """SM clocks NVML lists at the highest memory clock, highest first."""
        return self._clocks_mhz

    async def set_clock_mhz(self, mhz: int) -> None:
        """Lock min = max = `mhz`; a repeat of the current lock is skipped."""
        check_supported_clock(mhz, self._clocks_mhz, self.name)
        if mhz == self._locked_mhz:
            return
        await self._device.call(
            f"lock the SM clock at {mhz} MHz",
            pynvml.nvmlDeviceSetGpuLockedClocks,
            self._device.handle,
            mhz,
            mhz,
        )
        self._locked_mhz = mhz
        self.clock_changes += 1
        log.debug("%s locked at %d MHz", self.name, mhz)

    async def reset(self) -> None:
        """Reset locked clocks, always: a dead sidecar may have left a lock behind."""
        await self._device.call(
            "reset the locked SM clock", pynvml.nvmlDeviceResetGpuLockedClocks, self._device.handle
        )
        self._locked_mhz = None
        log.debug("%s clocks reset", self.name)

    async def clock_mhz(self) -> int:
        """Current SM clock (NVML_CLOCK_SM); at idle it sits below any lock."""
        mhz = await self._device.call(
            "read the SM clock", pynvml.nvmlDeviceGetClockInfo, self._device.handle, pynvml.NVML_CLOCK_SM
        )
        return int(mhz)

    async def close(self) -> None:
        """Reset the lock this actuator left (it outlives us), then shut NVML down."""
        if self._locked_mhz is not None:
            try:
                await self.reset()
            except GpuControlError as err:
                log.error("could not reset %s on close; it stays locked: %s", self.name, err)
        await self._device.close()


class NvmlMeter:
    """Energy from nvmlDeviceGetTotalEnergyConsumption (mJ since driver load; Volta+)."""

    def __init__(self, device: NvmlDevice, accumulator: EnergyAccumulator) -> None:
        self._device = device
        self._energy = accumulator

    @classmethod
    async def open(
        cls, *, uuid: str | None = None, index: int | None = None, timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    ) -> NvmlMeter:
        """Open the GPU and take the first energy reading: energy is counted from here."""
        device = await NvmlDevice.open(uuid, index, timeout_s)
        meter = cls(device, EnergyAccumulator(f"nvml:{device.uuid}"))
        try:
            await meter.energy_j()
        except BaseException:
            await device.close()
            raise
        return meter

    @property
    def name(self) -> str:
        """Backend and device UUID."""
        return f"nvml:{self._device.uuid}"

    async def energy_j(self) -> float:
        """Joules since open, from the driver's energy counter (not integrated power)."""
        mj = await self._device.call(
            "read the energy counter", pynvml.nvmlDeviceGetTotalEnergyConsumption, self._device.handle
        )
        return self._energy.update(float(mj) / 1000.0)

    async def power_w(self) -> float:
        """Board power: 1 s average on Ampere+ except GA100, instantaneous before (NVML docs)."""
        mw = await self._device.call("read power", pynvml.nvmlDeviceGetPowerUsage, self._device.handle)
        return float(mw) / 1000.0

    async def close(self) -> None:
        """Shut NVML down for this meter."""
        await self._device.close()
