"""The twin GPU's control endpoint: the NVML stand-in the `twin` actuator talks to.

Contract (shared with `agent.gpus.twin`, do not change it):

    GET    /twin/v1/gpu                -> 200 state
    POST   /twin/v1/gpu/locked_clocks  {"min_mhz": int, "max_mhz": int} -> 200 state | 400 {"error"}
    DELETE /twin/v1/gpu/locked_clocks  -> 200 state

State: `name`, `uuid`, `supported_clocks_mhz` (highest first), `max_clock_mhz`, `clock_mhz` (the SM
clock in effect now: a lock takes effect after the twin's clock-change delay; unlocked, the GPU
boosts to max when busy and idles at its lowest clock), `locked_clock_mhz` (the lock last
requested, null when unlocked), `power_w` (mean over the last 100 ms of twin time), `energy_j`
(since the server started) and `clock_changes` (changes that took effect). Power and energy are
the engine's: all `gpu_count` GPUs (`gpu_uuids`) of its TP group, which share the one clock;
`uuid` is the first of them.

Like `nvmlDeviceSetGpuLockedClocks(min, max)` on a busy GPU, a range lock runs at its top: the
twin locks at `max_mhz`. Both ends must be supported clocks, with min <= max.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from agent.twin.gpu import UnsupportedClockError
from agent.twin.server.protocol import dumps, error_body
from agent.twin.server.realtime import RealtimeTwin
from agent.twin.setup import TwinSetup

POWER_WINDOW_S = 0.1
_UUID_NAMESPACE = uuid.UUID("6f1c1a52-7b0e-4d53-9d2c-2f3e8a0c7b11")  # fixed: the same twin, the same UUIDs


def gpu_uuids(setup: TwinSetup) -> list[str]:
    """Deterministic NVML-style UUIDs ("GPU-xxxxxxxx-...") of the engine's GPUs, one per TP rank."""
    return [f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{setup.gpu.name}/{rank}')}" for rank in range(setup.tp)]


class GpuControl:
    """Lock, unlock and read the twin GPU (all TP ranks share one clock)."""

    def __init__(self, runtime: RealtimeTwin, uuids: list[str]) -> None:
        self.runtime = runtime
        self.uuids = uuids
        self.uuid = uuids[0]
        self.requested_mhz: int | None = None

    def lock(self, min_mhz: int, max_mhz: int) -> None:
        """Lock at `max_mhz`; raises ValueError (UnsupportedClockError) for a range NVML would refuse."""
        gpu = self.runtime.gpu
        if min_mhz > max_mhz:
            raise ValueError(f"min_mhz {min_mhz} exceeds max_mhz {max_mhz}")
        for mhz in (min_mhz, max_mhz):
            if mhz not in gpu.supported_clocks_mhz():
                raise UnsupportedClockError(
                    f"{mhz} MHz is not a supported SM clock of {gpu.spec.name} "
                    f"({gpu.spec.min_clock_mhz}..{gpu.spec.max_clock_mhz} MHz in 15 MHz steps)"
                )
        now = self.runtime.now_s()
        self.runtime.meter.settle(now)  # idle energy so far at the old clock
        gpu.lock_sm_clock_mhz(max_mhz, now)
        self.requested_mhz = max_mhz

    def unlock(self) -> None:
        """Back to stock behaviour."""
        now = self.runtime.now_s()
        self.runtime.meter.settle(now)
        self.runtime.gpu.reset_sm_clock(now)
        self.requested_mhz = None

    def state(self) -> dict[str, Any]:
        """The state document."""
        runtime, gpu = self.runtime, self.runtime.gpu
        now = runtime.now_s()
        energy = runtime.meter.energy_j(now)
        locked = gpu.locked_clock_mhz(now)
        if locked is not None:
            clock = locked
        else:
            clock = gpu.spec.min_clock_mhz if runtime.meter.idle else gpu.spec.max_clock_mhz
        return {
            "name": gpu.spec.product_name,
            "uuid": self.uuid,
            "gpu_uuids": self.uuids,
            "gpu_count": gpu.count,
            "supported_clocks_mhz": list(gpu.supported_clocks_mhz()),
            "max_clock_mhz": gpu.spec.max_clock_mhz,
            "clock_mhz": clock,
            "locked_clock_mhz": self.requested_mhz,
            "power_w": runtime.meter.power_w(now, POWER_WINDOW_S),
            "energy_j": energy,
            "clock_changes": gpu.clock_changes,
        }


def _state_response(control: GpuControl) -> web.Response:
    return web.Response(text=dumps(control.state(), sort_keys=False), content_type="application/json")


def _bad_request(message: str) -> web.Response:
    return web.Response(status=400, text=error_body(message), content_type="application/json")


def _lock_range(body: bytes) -> tuple[int, int]:
    """(min_mhz, max_mhz) from a lock request; ValueError names what is wrong."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError('expected {"min_mhz": int, "max_mhz": int}')
    values = []
    for key in ("min_mhz", "max_mhz"):
        value = document.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key!r} must be an integer (MHz), got {value!r}")
        values.append(value)
    return values[0], values[1]


def gpu_routes(control: GpuControl) -> list[web.RouteDef]:
    """The endpoint's routes, for the Triton HTTP app."""

    async def get_state(_: web.Request) -> web.Response:
        return _state_response(control)

    async def lock(request: web.Request) -> web.Response:
        try:
            control.lock(*_lock_range(await request.read()))
        except ValueError as exc:
            return _bad_request(str(exc))
        return _state_response(control)

    async def unlock(_: web.Request) -> web.Response:
        control.unlock()
        return _state_response(control)

    return [
        web.get("/twin/v1/gpu", get_state, allow_head=False),
        web.post("/twin/v1/gpu/locked_clocks", lock),
        web.delete("/twin/v1/gpu/locked_clocks", unlock),
    ]
