"""NvmlActuator / NvmlMeter against a stateful stand-in for the pynvml module's functions."""

import asyncio
import ctypes.util
import logging
import threading

import pynvml
import pytest

from agent.catalog import gpu_spec
from agent.gpus import (
    DriverNotLoadedError,
    DryRunActuator,
    GpuLostError,
    GpuNotFoundError,
    NotSupportedError,
    NvmlActuator,
    NvmlMeter,
    PermissionDeniedError,
    TransientGpuError,
    UnsupportedClockError,
    build_actuator,
    build_meter,
)

UUID = "GPU-22dbdd79-f55a-92a8-aa39-322198e72ed6"
A100_CLOCKS = tuple(range(1410, 209, -15))
ENERGY_STEP_MJ = 1234  # the fake counter grows this much per read


class FakeNvml:
    """One A100 as pynvml shows it: supported clocks, a lock, an energy counter, real NVML errors."""

    def __init__(self) -> None:
        self.handle = object()
        self.inits = 0
        self.shutdowns = 0
        self.locks: list[tuple[int, int]] = []  # every nvmlDeviceSetGpuLockedClocks call
        self.resets = 0
        self.locked: tuple[int, int] | None = None
        self.energy_mj = 5_000_000
        self.fail: dict[str, int] = {}  # function name -> NVML_ERROR_* code it raises
        self.threads: set[str] = set()
        self.release = threading.Event()  # blocks nvmlDeviceGetClockInfo when "hang" is set
        self.hang = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))

    def _enter(self, name: str, handle: object = None) -> None:
        self.threads.add(threading.current_thread().name)
        if name in self.fail:
            raise pynvml.NVMLError(self.fail[name])
        if handle is not None:
            assert handle is self.handle

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.shutdowns += 1

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> object:
        self._enter("nvmlDeviceGetHandleByUUID")
        if uuid != UUID:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return self.handle

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        self._enter("nvmlDeviceGetHandleByIndex")
        if index != 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.handle

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        self._enter("nvmlDeviceGetUUID", handle)
        return UUID

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: object) -> list[int]:
        self._enter("nvmlDeviceGetSupportedMemoryClocks", handle)
        return [1215, 1593]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: object, mem_mhz: int) -> list[int]:
        self._enter("nvmlDeviceGetSupportedGraphicsClocks", handle)
        if mem_mhz == 1593:
            return sorted(A100_CLOCKS)
        return [1005, 990]

    def nvmlDeviceSetGpuLockedClocks(self, handle: object, lo: int, hi: int) -> None:
        self._enter("nvmlDeviceSetGpuLockedClocks", handle)
        self.locks.append((lo, hi))
        self.locked = (lo, hi)

    def nvmlDeviceResetGpuLockedClocks(self, handle: object) -> None:
        self._enter("nvmlDeviceResetGpuLockedClocks", handle)
        self.resets += 1
        self.locked = None

    def nvmlDeviceGetClockInfo(self, handle: object, clock_type: int) -> int:
        self._enter("nvmlDeviceGetClockInfo", handle)
        assert clock_type == pynvml.NVML_CLOCK_SM
        if self.hang:
            self.release.wait(5.0)
        return 1410 if self.locked is None else self.locked[1]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object) -> int:
        self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        self.energy_mj += ENERGY_STEP_MJ
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
        self._enter("nvmlDeviceGetPowerUsage", handle)
        return 251_500


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    fake.install(monkeypatch)
    return fake


def test_open_lists_sm_clocks_at_the_highest_memory_clock_without_touching_the_lock(nvml):
    async def scenario():
        act = await NvmlActuator.open(uuid=UUID)
        clocks = await act.supported_clocks_mhz()
        await act.close()
        return act, clocks

    act, clocks = asyncio.run(scenario())
    assert clocks == A100_CLOCKS
    assert clocks[0] == 1410 and clocks[-1] == 210 and len(clocks) == 81
    assert act.name == f"nvml:{UUID}" and act.actuates
    assert nvml.locks == [] and nvml.resets == 0
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    assert nvml.threads == {"nvml_0"}  # every call ran off the event loop, on one thread


def test_lock_skips_repeats_reads_back_and_reset_always_reaches_the_gpu(nvml):
    async def scenario():
        act = await NvmlActuator.open(index=0)
        await act.reset()  # start-up reset: nothing of ours is locked, it still goes out
        await act.set_clock_mhz(1050)
        await act.set_clock_mhz(1050)
        locked_clock = await act.clock_mhz()
        await act.set_clock_mhz(900)
        await act.reset()
        stock_clock = await act.clock_mhz()
        await act.close()
        return act, locked_clock, stock_clock

    act, locked_clock, stock_clock = asyncio.run(scenario())
    assert nvml.locks == [(1050, 1050), (900, 900)]
    assert act.clock_changes == 2
    assert (locked_clock, stock_clock) == (1050, 1410)
    assert nvml.resets == 2  # start-up and explicit; close had no lock of ours left to reset
    assert nvml.shutdowns == 1


@pytest.mark.parametrize(("mhz", "nearest"), [(1051, 1050), (1500, 1410), (100, 210), (1057, 1050)])
def test_unsupported_clock_is_refused_with_the_nearest_and_never_sent(nvml, mhz, nearest):
    async def scenario():
        act = await NvmlActuator.open(uuid=UUID)
        try:
            await act.set_clock_mhz(mhz)
        finally:
            await act.close()

    with pytest.raises(UnsupportedClockError, match=f"nearest supported: {nearest} MHz") as info:
        asyncio.run(scenario())
    assert isinstance(info.value, ValueError)
    assert nvml.locks == []


def test_close_resets_a_lock_left_behind_and_shuts_nvml_down_once(nvml):
    async def scenario():
        act = await NvmlActuator.open(uuid=UUID)
        await act.set_clock_mhz(600)
        await act.close()
        await act.close()

    asyncio.run(scenario())
    assert nvml.locked is None and nvml.resets == 1
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_permission_denied_says_what_to_do_and_reads_keep_working(nvml):
    nvml.fail["nvmlDeviceSetGpuLockedClocks"] = pynvml.NVML_ERROR_NO_PERMISSION
    nvml.fail["nvmlDeviceResetGpuLockedClocks"] = pynvml.NVML_ERROR_NO_PERMISSION

    async def scenario():
        act = await NvmlActuator.open(uuid=UUID)
        with pytest.raises(PermissionDeniedError) as info:
            await act.set_clock_mhz(1050)
        clock = await act.clock_mhz()
        await act.close()
        return info.value, clock

    err, clock = asyncio.run(scenario())
    message = str(err)
    assert "Insufficient Permissions" in message
    assert "CAP_SYS_ADMIN" in message and "--cap-add SYS_ADMIN" in message
    assert "THROTTLLEM_ACTUATOR=dryrun" in message
    assert isinstance(err.__cause__, pynvml.NVMLError_NoPermission)
    assert clock == 1410 and nvml.locked is None
    assert nvml.shutdowns == 1


def test_failed_reset_on_close_is_logged_and_nvml_still_shut_down(nvml, caplog):
    async def scenario():
        act = await NvmlActuator.open(uuid=UUID)
        await act.set_clock_mhz(1050)
        nvml.fail["nvmlDeviceResetGpuLockedClocks"] = pynvml.NVML_ERROR_GPU_IS_LOST
        with caplog.at_level(logging.ERROR, logger="agent.gpus.nvml"):
            await act.close()

    asyncio.run(scenario())
    assert "stays locked" in caplog.text and "GPU is lost" in caplog.text
    assert nvml.shutdowns == 1


@pytest.mark.parametrize(
    ("code", "error", "advice"),
    [
        (pynvml.NVML_ERROR_GPU_IS_LOST, GpuLostError, "Xid"),
        (pynvml.NVML_ERROR_RESET_REQUIRED, GpuLostError, "reset the GPU or reboot"),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, NotSupportedError, "MIG"),
        (pynvml.NVML_ERROR_TIMEOUT, TransientGpuError, "retry later"),
    ],
)
def test_nvml_errors_become_ours_with_advice(nvml, code, error, advice):
    nvml.fail["nvmlDeviceGetClockInfo"] = code

    async def scenario():
        act = await NvmlActuator.open(uuid=UUID)
        try:
            await act.clock_mhz()
        finally:
            await act.close()

    with pytest.raises(error, match=advice) as info:
        asyncio.run(scenario())
    assert info.value.__cause__.value == code
    assert UUID in str(info.value)


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_init_without_driver_is_a_clear_error_and_nothing_to_shut_down(nvml, code):
    nvml.fail["nvmlInit"] = code
    with pytest.raises(DriverNotLoadedError, match="NVIDIA_DRIVER_CAPABILITIES"):
        asyncio.run(NvmlActuator.open(uuid=UUID))
    assert nvml.shutdowns == 0


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has NVML")
def test_the_real_library_is_missing_here_and_says_so():
    with pytest.raises(DriverNotLoadedError, match="NVML Shared Library Not Found"):
        asyncio.run(NvmlMeter.open(index=0))


@pytest.mark.parametrize(
    ("selector", "shown"), [({"uuid": "GPU-nope"}, "GPU-nope"), ({"index": 3}, "index 3")]
)
def test_unknown_gpu_points_at_nvidia_smi_and_releases_nvml(nvml, selector, shown):
    with pytest.raises(GpuNotFoundError, match="nvidia-smi -L") as info:
        asyncio.run(NvmlActuator.open(**selector))
    assert shown in str(info.value)
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_gpu_must_be_selected_exactly_once(nvml):
    for selector in ({}, {"uuid": UUID, "index": 0}):
        with pytest.raises(ValueError, match="exactly one of uuid"):
            asyncio.run(NvmlActuator.open(**selector))
    assert nvml.inits == 0


def test_devices_without_clock_lists_are_not_supported(nvml, monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlDeviceGetSupportedMemoryClocks", lambda handle: [])
    with pytest.raises(NotSupportedError, match="no memory clocks"):
        asyncio.run(NvmlActuator.open(uuid=UUID))
    assert nvml.shutdowns == 1


def test_a_hung_call_does_not_block_the_loop_and_reads_as_lost(nvml):
    nvml.hang = True

    async def scenario():
        act = await NvmlActuator.open(uuid=UUID, timeout_s=0.05)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        with pytest.raises(GpuLostError, match=r"within 0\.05 s"):
            await act.clock_mhz()
        task.cancel()
        nvml.release.set()
        await act.close()
        return ticks

    assert asyncio.run(scenario()) >= 3


def test_energy_is_joules_since_open_and_survives_a_counter_reset(nvml):
    async def scenario():
        meter = await NvmlMeter.open(uuid=UUID)
        first = await meter.energy_j()
        second = await meter.energy_j()
        nvml.energy_mj = 0  # driver reload: the counter restarts
        after_reset = await meter.energy_j()
        power = await meter.power_w()
        await meter.close()
        return meter, (first, second, after_reset), power

    meter, readings, power = asyncio.run(scenario())
    step_j = ENERGY_STEP_MJ / 1000
    assert readings == pytest.approx((step_j, 2 * step_j, 3 * step_j))
    assert power == pytest.approx(251.5)
    assert meter.name == f"nvml:{UUID}"
    assert nvml.shutdowns == 1


def test_energy_without_data_is_transient(nvml):
    async def scenario():
        meter = await NvmlMeter.open(uuid=UUID)
        nvml.fail["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_NO_DATA
        try:
            await meter.energy_j()
        finally:
            await meter.close()

    with pytest.raises(TransientGpuError):
        asyncio.run(scenario())


def test_factories_open_nvml_and_dryrun_observes_it_read_only(nvml):
    async def scenario():
        meter = await build_meter("nvml", uuid=UUID)
        shadow = await build_actuator("dryrun", uuid=UUID)
        await shadow.set_clock_mhz(900)
        await shadow.reset()
        clock = await shadow.clock_mhz()
        clocks = await shadow.supported_clocks_mhz()
        await shadow.close()
        await meter.close()
        return shadow, clock, clocks

    shadow, clock, clocks = asyncio.run(scenario())
    assert isinstance(shadow, DryRunActuator) and not shadow.actuates
    assert shadow.name == f"dryrun:nvml:{UUID}"
    assert (clock, clocks) == (1410, A100_CLOCKS)
    assert shadow.would_be_changes == 2
    assert nvml.locks == [] and nvml.resets == 0
    assert (nvml.inits, nvml.shutdowns) == (2, 2)


def test_dryrun_falls_back_to_the_catalog_when_nvml_is_missing(nvml):
    nvml.fail["nvmlInit"] = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    spec = gpu_spec("a100-sxm4-80gb")
    shadow = asyncio.run(build_actuator("dryrun", uuid=UUID, gpu_spec=spec))
    assert shadow.name == "dryrun:a100-sxm4-80gb"
    with pytest.raises(DriverNotLoadedError):
        asyncio.run(build_actuator("dryrun", uuid=UUID))
