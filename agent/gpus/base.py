"""What the sidecar needs from a GPU: an actuator for the SM clock and a meter for energy.

Every backend (NVML, the twin's HTTP endpoint, dry-run, dcgm-exporter) turns its own failures
into the exceptions below at its boundary, grouped by what the caller should do:

    GpuControlError            anything the GPU layer could not do
    ├── TransientGpuError      retry next tick (timeout, no data yet, exporter restarting)
    ├── PermissionDeniedError  fall back to observe-only: writes need CAP_SYS_ADMIN
    ├── NotSupportedError      fall back to observe-only: this GPU/driver/exporter cannot do it
    ├── GpuNotFoundError       fix the configuration: no GPU with that UUID or index
    ├── DriverNotLoadedError   fatal: no NVIDIA driver or libnvidia-ml
    └── GpuLostError           fatal: the GPU (or the twin) is gone; reset if possible, stop
    UnsupportedClockError      a caller bug (ValueError): a clock the GPU does not list

Locked clocks outlive the process (NVML docs), so actuators reset on `close()` when they left a
lock behind, and `reset()` always talks to the device, to clear locks left by a dead sidecar.
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)

DRYRUN_ADVICE = "or set THROTTLLEM_ACTUATOR=dryrun to run in shadow mode (decide and log, never actuate)"

# interfaces.md §4.2/§8.1: locked-clock writes are NVML "device commands" that need root with
# CAP_SYS_ADMIN. `nvidia-smi -acp UNRESTRICTED` only relaxes the deprecated application-clock
# commands, so it is deliberately not suggested.
CLOCK_PERMISSION_ADVICE = (
    "locking or resetting GPU clocks needs root with CAP_SYS_ADMIN: run the sidecar as root, "
    "with `docker run --cap-add SYS_ADMIN`, or in Kubernetes with "
    "securityContext.capabilities.add: [SYS_ADMIN] (or privileged: true) in a namespace whose "
    "pod-security level is `privileged`"
)
# What the sidecar can do instead; a profile cannot (it measures locked clocks), so it says only the above.
PERMISSION_ADVICE = f"{CLOCK_PERMISSION_ADVICE}; {DRYRUN_ADVICE}"


class GpuControlError(Exception):
    """Anything the GPU layer could not do; the message says what to do about it."""


class TransientGpuError(GpuControlError):
    """The call may succeed on the next tick: keep the last known state and retry."""


class PermissionDeniedError(GpuControlError):
    """Reads work but clock writes are refused: run privileged or observe only."""


class NotSupportedError(GpuControlError):
    """The GPU, driver or exporter cannot do what was asked; retrying will not help."""


class GpuNotFoundError(GpuControlError):
    """No GPU matches the configured UUID or index."""


class DriverNotLoadedError(GpuControlError):
    """No NVIDIA driver or NVML library on this machine (or in this container)."""


class GpuLostError(GpuControlError):
    """The GPU, or the endpoint that stands for it, stopped answering."""


class UnsupportedClockError(ValueError):
    """A clock that is not in the GPU's supported list: a bug in the caller, not the GPU."""


class Actuator(Protocol):
    """Sets the SM clock of one GPU. Clocks are in MHz; the supported list is highest first."""

    @property
    def name(self) -> str:
        """Backend and device, for logs and metrics, e.g. "nvml:GPU-22dbdd79-..."."""
        ...

    @property
    def actuates(self) -> bool:
        """False for dry-run: the GPU keeps its stock behaviour whatever is set."""
        ...

    async def supported_clocks_mhz(self) -> tuple[int, ...]:
        """SM clocks the GPU accepts for a lock, highest first."""
        ...

    async def set_clock_mhz(self, mhz: int) -> None:
        """Lock the SM clock to `mhz`; raises UnsupportedClockError for a clock not listed."""
        ...

    async def reset(self) -> None:
        """Remove any clock lock: back to the GPU's stock (boosting) behaviour."""
        ...

    async def clock_mhz(self) -> int:
        """The SM clock the GPU runs at now."""
        ...

    async def close(self) -> None:
        """Release the device, resetting a lock this actuator left behind."""
        ...


class Meter(Protocol):
    """Measures the energy one GPU has used since the meter was opened."""

    @property
    def name(self) -> str:
        """Backend and device, for logs and metrics."""
        ...

    async def energy_j(self) -> float:
        """Joules since the meter was opened; never decreases, even across counter resets."""
        ...

    async def power_w(self) -> float:
        """Current board power as the backend reports it (NVML: 1 s average on Ampere+ but GA100)."""
        ...

    async def close(self) -> None:
        """Release the device or connection."""
        ...


def check_supported_clock(mhz: int, clocks_mhz: tuple[int, ...], device: str) -> None:
    """Refuse a clock the device does not list, naming the nearest one (ties go up: safer for SLOs)."""
    if mhz in clocks_mhz:
        return
    nearest = min(clocks_mhz, key=lambda c: (abs(c - mhz), -c))
    raise UnsupportedClockError(
        f"{mhz} MHz is not a supported SM clock of {device}; nearest supported: {nearest} MHz "
        f"(range {clocks_mhz[-1]}-{clocks_mhz[0]} MHz)"
    )


class EnergyAccumulator:
    """Turns a raw energy counter into energy since the first reading, surviving counter resets.

    Counters restart from zero (NVML's after a driver reload, the twin's after a restart); a
    reading below the previous one is taken as such a restart and counted from zero, as
    Prometheus `increase()` does. The total therefore only grows.
    """

    def __init__(self, source: str) -> None:
        self._source = source  # named in the reset warning
        self._last_j: float | None = None  # previous raw counter reading
        self._total_j = 0.0  # energy since the first reading
        self.resets = 0  # counter restarts seen

    def update(self, counter_j: float) -> float:
        """Feed one raw counter reading (J); returns joules since the first reading."""
        if self._last_j is None:
            self._last_j = counter_j
            return self._total_j
        if counter_j >= self._last_j:
            self._total_j += counter_j - self._last_j
        else:
            self.resets += 1
            self._total_j += counter_j
            log.warning(
                "%s energy counter went back from %.3f J to %.3f J: counting it as a restart",
                self._source,
                self._last_j,
                counter_j,
            )
        self._last_j = counter_j
        return self._total_j
