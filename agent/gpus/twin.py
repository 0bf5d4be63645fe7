"""Actuator and meter for the twin's GPU control endpoint: the NVML stand-in over HTTP.

Contract (served by the twin):
    GET    {base}/twin/v1/gpu                -> 200 state JSON (see `TwinGpuState`)
    POST   {base}/twin/v1/gpu/locked_clocks  {"min_mhz": f, "max_mhz": f} -> 200 state | 400 {"error"}
    DELETE {base}/twin/v1/gpu/locked_clocks  -> 200 state

An endpoint that cannot be reached is a `TransientGpuError` naming the URL: unlike a device that
fell off the bus, a server on the network comes back (a restarted twin), so the caller retries
next tick. Any other answer that breaks the contract is a `GpuControlError` quoting it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from agent.gpus.base import EnergyAccumulator, GpuControlError, TransientGpuError, check_supported_clock

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0  # the twin answers from memory; longer means it is stuck
GPU_PATH = "/twin/v1/gpu"
LOCK_PATH = "/twin/v1/gpu/locked_clocks"


@dataclass(frozen=True, slots=True)
class TwinGpuState:
    """The twin GPU as its endpoint reports it."""

    name: str  # product name, as nvmlDeviceGetName would give it
    uuid: str  # "GPU-..." identity of the emulated device
    supported_clocks_mhz: tuple[int, ...]  # highest first
    max_clock_mhz: int  # what the stock GPU boosts to
    clock_mhz: int  # SM clock now (a lock takes effect after the twin's delay)
    locked_clock_mhz: int | None  # requested lock; None when unlocked
    power_w: float  # board power now
    energy_j: float  # energy counter since the twin started
    clock_changes: int  # lock changes the twin has applied

    @classmethod
    def from_json(cls, data: Any, url: str) -> TwinGpuState:
        """Validate one state document; a broken one names the URL and the problem."""
        try:
            locked = data["locked_clock_mhz"]
            state = cls(
                name=str(data["name"]),
                uuid=str(data["uuid"]),
                supported_clocks_mhz=tuple(
                    sorted((int(c) for c in data["supported_clocks_mhz"]), reverse=True)
                ),
                max_clock_mhz=int(data["max_clock_mhz"]),
                clock_mhz=int(data["clock_mhz"]),
                locked_clock_mhz=None if locked is None else int(locked),
                power_w=float(data["power_w"]),
                energy_j=float(data["energy_j"]),
                clock_changes=int(data["clock_changes"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GpuControlError(
                f"twin GPU endpoint {url} sent a malformed state ({err!r}): {data!r}"
            ) from err
        if not state.supported_clocks_mhz:
            raise GpuControlError(f"twin GPU endpoint {url} lists no supported clocks")
        return state


class TwinGpuClient:
    """HTTP client of one twin GPU endpoint; owns its session."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session

    @classmethod
    def connect(cls, base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> TwinGpuClient:
        """Create the session (call inside the running loop, as aiohttp requires)."""
        return cls(base_url, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)))

    @classmethod
    async def open(
        cls, base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> tuple[TwinGpuClient, TwinGpuState]:
        """Connect and read the state once; the session is closed again if that read fails."""
        client = cls.connect(base_url, timeout_s)
        try:
            return client, await client.state()
        except BaseException:
            await client.close()
            raise

    async def state(self) -> TwinGpuState:
        """Read the GPU's state."""
        return await self._request("GET", GPU_PATH)

    async def lock(self, mhz: int) -> TwinGpuState:
        """Lock the SM clock to `mhz` (min = max, as the NVML actuator does)."""
        return await self._request("POST", LOCK_PATH, {"min_mhz": mhz, "max_mhz": mhz})

    async def unlock(self) -> TwinGpuState:
        """Remove the lock."""
        return await self._request("DELETE", LOCK_PATH)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._session.close()

    async def _request(self, method: str, path: str, body: dict[str, int] | None = None) -> TwinGpuState:
        url = self.base_url + path
        try:
            async with self._session.request(method, url, json=body) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientConnectionError, TimeoutError) as err:
            raise TransientGpuError(
                f"twin GPU endpoint {url} is unreachable ({err!r}): check that the twin server is "
                "running and that the URL is right"
            ) from err
        except aiohttp.ClientError as err:
            raise GpuControlError(f"{method} {url} failed: {err!r}") from err
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise GpuControlError(
                f"{method} {url} answered HTTP {status} with non-JSON: {text[:200]!r}"
            ) from err
        if status == 200:
            return TwinGpuState.from_json(payload, url)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        raise GpuControlError(f"{method} {url} answered HTTP {status}: {error}")


class TwinActuator:
    """Locks the twin GPU's SM clock over HTTP, with the same rules as the NVML actuator."""

    actuates = True

    def __init__(self, client: TwinGpuClient, state: TwinGpuState) -> None:
        self._client = client
        self._uuid = state.uuid
        self._clocks_mhz = state.supported_clocks_mhz  # fixed for a device: read once at open
        self._locked_mhz: int | None = None  # the lock this actuator set, None when reset

    @classmethod
    async def open(cls, base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> TwinActuator:
        """Connect and read the supported clocks; does not touch the current lock."""
        client, state = await TwinGpuClient.open(base_url, timeout_s)
        log.info("twin actuator on %s at %s", state.uuid, client.base_url)
        return cls(client, state)

    @property
    def name(self) -> str:
        """Backend and device UUID."""
        return f"twin:{self._uuid}"

    async def supported_clocks_mhz(self) -> tuple[int, ...]:
        """SM clocks the twin lists, highest first."""
        return self._clocks_mhz

    async def set_clock_mhz(self, mhz: int) -> None:
        """Lock the clock; a repeat of the current lock is skipped."""
        check_supported_clock(mhz, self._clocks_mhz, self.name)
        if mhz == self._locked_mhz:
            return
        await self._client.lock(mhz)
        self._locked_mhz = mhz

    async def reset(self) -> None:
        """Remove any lock, always (as with NVML, a previous run may have left one)."""
        await self._client.unlock()
        self._locked_mhz = None

    async def clock_mhz(self) -> int:
        """The twin's SM clock now."""
        return (await self._client.state()).clock_mhz

    async def close(self) -> None:
        """Reset the lock this actuator left, then close the session."""
        if self._locked_mhz is not None:
            try:
                await self.reset()
            except GpuControlError as err:
                log.error("could not reset %s on close; it stays locked: %s", self.name, err)
        await self._client.close()


class TwinMeter:
    """Energy and power from the twin GPU's counters."""

    def __init__(self, client: TwinGpuClient, uuid: str, accumulator: EnergyAccumulator) -> None:
        self._client = client
        self._uuid = uuid
        self._energy = accumulator

    @classmethod
    async def open(cls, base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> TwinMeter:
        """Connect and take the first energy reading: energy is counted from here."""
        client, state = await TwinGpuClient.open(base_url, timeout_s)
        energy = EnergyAccumulator(f"twin:{state.uuid}")
        energy.update(state.energy_j)
        return cls(client, state.uuid, energy)

    @property
    def name(self) -> str:
        """Backend and device UUID."""
        return f"twin:{self._uuid}"

    async def energy_j(self) -> float:
        """Joules since open; a twin restart (counter back to zero) is absorbed."""
        return self._energy.update((await self._client.state()).energy_j)

    async def power_w(self) -> float:
        """The twin's board power now."""
        return (await self._client.state()).power_w

    async def close(self) -> None:
        """Close the session."""
        await self._client.close()
