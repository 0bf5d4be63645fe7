"""The node agent's wire protocol: newline-delimited JSON over one Unix-socket connection per sidecar.

The connection is the lease's liveness: SIGKILL or an OOM kill closes it, and the agent sees
that at once (an HTTP keep-alive pool would hide a dead client). Each request is one JSON object
on one line of at most MAX_LINE_BYTES; each is answered by one line, in order:

    {"op": "hello", "pod_namespace": s, "pod_name": s, "pod_uid": s}
        -> {"ok": true, "lease_ttl_s": f}               who asks (the Downward API's values)
    {"op": "acquire", "gpus": ["GPU-...", ...]}          omit "gpus": every GPU this pod may lease
        -> {"ok": true, "gpus": [{"uuid", "name", "supported_clocks_mhz", "mig"}, ...]}
    {"op": "set_clock", "mhz": n}       -> {"ok": true}  lock every leased GPU at n MHz
    {"op": "reset"}                     -> {"ok": true}  stock clocks and default power limit
    {"op": "set_power_limit", "watts": w} -> {"ok": true}  the power-limit knob, on every leased GPU
    {"op": "clock"}                     -> {"ok": true, "clock_mhz": n}  lowest SM clock of the lease
    {"op": "heartbeat"}                 -> {"ok": true}
    {"op": "release"}                   -> {"ok": true}  reset, then give the leases back
    {"op": "status"}                    -> {"ok": true, "gpus": [...], "leases": [...]}  (debugging;
                                           needs no hello)
    any failure -> {"ok": false, "kind": k, "error": "what and what to do"}, k one of
        bad_request, refused, not_supported, not_found, unsupported_clock, transient, gpu_lost, gpu_error

Every request renews the connection's lease. It lapses when the connection closes or nothing
arrives for the agent's lease_ttl_s; the agent then resets the GPUs. A line over the limit, or
one that takes longer than the agent's idle timeout, ends the connection (after an error reply
where one can be sent); anything else malformed is answered `bad_request` and the connection goes on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from agent.gpus.node_agent import MAX_LINE_BYTES, PodIdentity, check_pod_field

__all__ = [
    "MAX_LINE_BYTES",
    "Acquire",
    "Hello",
    "Plain",
    "ProtocolError",
    "Request",
    "SetClock",
    "SetPowerLimit",
    "encode",
    "error_reply",
    "parse_request",
]

MAX_GPUS = 64  # far above any node's count; bounds the work one request can ask for
MAX_CLOCK_MHZ = 100_000
MAX_POWER_W = 10_000.0
PLAIN_OPS = ("reset", "heartbeat", "release", "status", "clock")
_GPU_UUID = re.compile(r"GPU-[0-9A-Za-z-]{1,92}")


class ProtocolError(ValueError):
    """A request the agent cannot read; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Hello:
    """The sidecar's pod, as it claims it (checked against the kubelet and the peer's cgroup)."""

    pod: PodIdentity


@dataclass(frozen=True, slots=True)
class Acquire:
    """Lease these GPUs; None: every GPU the pod may lease."""

    gpus: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class SetClock:
    """Lock every leased GPU's SM clock at `mhz`."""

    mhz: int


@dataclass(frozen=True, slots=True)
class SetPowerLimit:
    """Cap every leased GPU's board power at `watts`."""

    watts: float


@dataclass(frozen=True, slots=True)
class Plain:
    """An op without arguments: one of PLAIN_OPS."""

    op: str


Request = Hello | Acquire | SetClock | SetPowerLimit | Plain


def parse_request(line: bytes) -> Request:
    """One request line; ProtocolError for anything that is not a valid request."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, an over-long integer, deep nesting
        raise ProtocolError("not a JSON object on one line") from None
    if not isinstance(message, dict):
        raise ProtocolError("a request must be a JSON object")
    op = message.get("op")
    match op:
        case "hello":
            return Hello(PodIdentity(_pod(message, "namespace"), _pod(message, "name"), _pod(message, "uid")))
        case "acquire":
            return Acquire(_gpu_list(message.get("gpus")))
        case "set_clock":
            mhz = message.get("mhz")
            if not isinstance(mhz, int) or isinstance(mhz, bool) or not 0 < mhz <= MAX_CLOCK_MHZ:
                raise ProtocolError(f"mhz must be an integer clock in MHz, 1-{MAX_CLOCK_MHZ}")
            return SetClock(mhz)
        case "set_power_limit":
            watts = message.get("watts")
            if (
                not isinstance(watts, int | float)
                or isinstance(watts, bool)
                or not math.isfinite(watts)
                or not 0 < watts <= MAX_POWER_W
            ):
                raise ProtocolError(f"watts must be a number of watts, above 0 and at most {MAX_POWER_W:g}")
            return SetPowerLimit(float(watts))
        case str() if op in PLAIN_OPS:
            return Plain(op)
    known = ", ".join(("hello", "acquire", "set_clock", "set_power_limit", *PLAIN_OPS))
    raise ProtocolError(f"unknown op {str(op)[:40]!r}; known: {known}")


def _pod(message: dict[str, Any], field: str) -> str | None:
    value = message.get(f"pod_{field}")
    if value is None:
        return None
    try:
        return check_pod_field(field, value)
    except ValueError as err:
        raise ProtocolError(f"pod_{field} {err}") from None


def _gpu_list(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not 0 < len(value) <= MAX_GPUS
        or not all(isinstance(uuid, str) and _GPU_UUID.fullmatch(uuid) for uuid in value)
    ):
        raise ProtocolError(f"gpus must be a list of 1-{MAX_GPUS} GPU UUIDs (GPU-...)")
    if len(set(value)) != len(value):
        raise ProtocolError("gpus lists a GPU twice")
    return tuple(value)


def encode(reply: dict[str, Any]) -> bytes:
    """One reply line."""
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


def error_reply(kind: str, error: str) -> dict[str, Any]:
    """The error shape every op answers with."""
    return {"ok": False, "kind": kind, "error": error}
