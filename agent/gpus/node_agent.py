"""Actuator that asks the node agent (`throttllem node`) to steer the engine's GPUs.

The sidecar needs no privilege and no GPU device this way: the agent holds CAP_SYS_ADMIN and a
lease per GPU for this sidecar. The lease lives as long as this actuator's one Unix-socket
connection and its heartbeats (every lease_ttl/3, from a background task); if the sidecar dies
or freezes, the agent resets the GPUs itself. The wire protocol is documented in
`agent.node.protocol`; this module owns its constants because the sidecar side sits below the
agent in the layers.

Agent errors map onto the GpuControlError tree by the reply's `kind`; an agent that cannot be
reached is a `TransientGpuError`, and the next call (or heartbeat) reconnects, re-acquires and
restores the lock this actuator had set: an agent restart resets every GPU, but the control loop
believes its lock still holds and would not send it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.gpus.base import (
    GpuControlError,
    GpuLostError,
    GpuNotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    TransientGpuError,
    UnsupportedClockError,
    check_supported_clock,
)

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/throttllem/node.sock")
MAX_LINE_BYTES = 8192  # one request: the largest, an acquire of 64 GPUs, takes about 3 KB
MAX_REPLY_BYTES = 1 << 20  # one reply: a status of every GPU and lease of a node
DEFAULT_TIMEOUT_S = 2.0  # the agent answers from memory or one NVML call; longer means it is stuck


# What the Downward API can give, for the sidecar's settings and the agent's hello alike.
POD_FIELDS: dict[str, tuple[re.Pattern[str], str]] = {
    "namespace": (re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"), "a namespace name (DNS label)"),
    "name": (
        re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"),
        "a pod name (DNS subdomain)",
    ),
    "uid": (
        re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
        "a pod UID (8-4-4-4-12 lower-case hex)",
    ),
}


def check_pod_field(field: str, value: object) -> str:
    """`value` as pod `field` (namespace, name or uid); ValueError says what it must be."""
    pattern, what = POD_FIELDS[field]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"must be {what}")
    return value


class LeaseRefusedError(PermissionDeniedError):
    """The agent will not lease these GPUs to this pod: held by another, or not allocated to it."""


class NodeAgentReplyError(GpuControlError):
    """The agent answered something outside the protocol."""


# The GPU errors a reply's `kind` carries across the socket, both ways: the agent names the
# error it caught, the sidecar raises the same class again (subclasses before their bases).
GPU_ERROR_KINDS: tuple[tuple[str, type[GpuControlError]], ...] = (
    ("not_supported", NotSupportedError),
    ("not_found", GpuNotFoundError),
    ("transient", TransientGpuError),
    ("gpu_lost", GpuLostError),
)
_ERRORS: dict[str, type[GpuControlError]] = {"refused": LeaseRefusedError, **dict(GPU_ERROR_KINDS)}


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """Who the sidecar says it is (the Downward API's metadata.namespace, .name and .uid)."""

    namespace: str | None = None
    name: str | None = None
    uid: str | None = None


@dataclass(frozen=True, slots=True)
class NodeAgentTarget:
    """Where the agent listens and who asks it."""

    socket: Path = DEFAULT_SOCKET
    pod: PodIdentity = PodIdentity()
    timeout_s: float = DEFAULT_TIMEOUT_S


def raise_for_reply(reply: dict[str, Any], op: str) -> None:
    """Raise the GpuControlError (or UnsupportedClockError) an error reply stands for."""
    if reply.get("ok") is True:
        return
    message = f"node agent refused {op}: {reply.get('error', reply)}"
    if reply.get("kind") == "unsupported_clock":
        raise UnsupportedClockError(message)
    raise _ERRORS.get(str(reply.get("kind")), GpuControlError)(message)


class _Connection:
    """One connection to the agent: requests in order, one reply line each."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: NodeAgentTarget):
        self._reader = reader
        self._writer = writer
        self._target = target

    @classmethod
    async def open(cls, target: NodeAgentTarget) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(target.socket, limit=MAX_REPLY_BYTES), target.timeout_s
            )
        except (OSError, TimeoutError) as err:
            raise TransientGpuError(
                f"node agent at {target.socket} is unreachable ({err!r}): check that `throttllem node` "
                "runs on this node and that THROTTLLEM_NODE_SOCKET names its socket"
            ) from err
        return cls(reader, writer, target)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        line = json.dumps({"op": op, **fields}).encode() + b"\n"
        try:
            self._writer.write(line)
            await asyncio.wait_for(self._writer.drain(), self._target.timeout_s)
            answer = await asyncio.wait_for(self._reader.readline(), self._target.timeout_s)
        except asyncio.CancelledError:  # a caller's deadline: the reply would answer the next request
            self.close()
            raise
        except (OSError, TimeoutError, ValueError) as err:
            self.close()
            raise TransientGpuError(f"node agent at {self._target.socket} dropped {op} ({err!r})") from err
        if not answer:
            self.close()
            raise TransientGpuError(f"node agent at {self._target.socket} closed the connection during {op}")
        try:
            reply = json.loads(answer)
        except ValueError as err:
            self.close()
            raise NodeAgentReplyError(f"node agent answered {op} with non-JSON: {answer[:200]!r}") from err
        if not isinstance(reply, dict):
            raise NodeAgentReplyError(f"node agent answered {op} with {reply!r}, not an object")
        raise_for_reply(reply, op)
        return reply

    @property
    def closed(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        self._writer.close()


async def agent_status(target: NodeAgentTarget) -> dict[str, Any]:
    """The agent's `status` reply (its GPUs and leases): asked without a hello, holding no lease."""
    connection = await _Connection.open(target)
    try:
        return await connection.request("status")
    finally:
        connection.close()


class NodeAgentActuator:
    """The engine's GPUs, leased from the node agent and locked as one."""

    actuates = True

    def __init__(self, target: NodeAgentTarget, uuids: tuple[str, ...]) -> None:
        self._target = target
        self._requested = uuids  # empty: every GPU the agent may lease to this pod
        self._uuids: tuple[str, ...] = uuids  # the GPUs leased
        self._clocks_mhz: tuple[int, ...] = ()
        self._lease_ttl_s = 1.0
        self._connection: _Connection | None = None
        self._lock = asyncio.Lock()  # one request at a time on the connection
        self._locked_mhz: int | None = None  # the lock this actuator set; restored after a reconnect
        self._heartbeat: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, target: NodeAgentTarget, uuids: tuple[str, ...] = ()) -> NodeAgentActuator:
        """Connect, lease `uuids` (empty: every GPU the agent allows this pod) and start heartbeats."""
        actuator = cls(target, uuids)
        async with actuator._lock:
            await actuator._connect()
        actuator._heartbeat = asyncio.create_task(actuator._beat(), name="node-agent-heartbeat")
        log.info(
            "node agent %s leased %s: SM clocks %d-%d MHz",
            target.socket,
            ",".join(actuator._uuids),
            actuator._clocks_mhz[-1],
            actuator._clocks_mhz[0],
        )
        return actuator

    @property
    def name(self) -> str:
        """Backend and devices."""
        return f"node:{','.join(self._uuids) or self._target.socket}"

    async def supported_clocks_mhz(self) -> tuple[int, ...]:
        """Clocks every leased GPU supports, highest first."""
        return self._clocks_mhz

    async def set_clock_mhz(self, mhz: int) -> None:
        """Lock every leased GPU at `mhz`; a repeat of the current lock is skipped."""
        check_supported_clock(mhz, self._clocks_mhz, self.name)
        if mhz == self._locked_mhz:
            return
        await self._call("set_clock", mhz=mhz)
        self._locked_mhz = mhz

    async def reset(self) -> None:
        """Back to stock clocks (and default power limit), always."""
        await self._call("reset")
        self._locked_mhz = None

    async def clock_mhz(self) -> int:
        """The lowest SM clock among the leased GPUs now."""
        return int((await self._call("clock"))["clock_mhz"])

    async def close(self) -> None:
        """Stop heartbeats and release the leases: the agent resets the GPUs.

        The lock is taken first so a reconnect the heartbeat has under way finishes (and is
        released here) rather than being cut off mid-acquire, which would leave the reset to the
        agent's disconnect sweep instead of done by the time this returns.
        """
        async with self._lock:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._heartbeat
                self._heartbeat = None
            if self._connection is None or self._connection.closed:
                return
            try:
                await self._connection.request("release")
            except GpuControlError as err:  # the agent resets on the closed connection anyway
                log.warning("release at %s failed (the agent resets on disconnect): %s", self.name, err)
            self._connection.close()
            self._connection = None

    async def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        async with self._lock:
            if self._connection is None or self._connection.closed:
                await self._connect()
            assert self._connection is not None
            try:
                return await self._connection.request(op, **fields)
            except TransientGpuError:  # the agent is gone or busy: start afresh next call
                self._connection.close()
                self._connection = None
                raise

    async def _connect(self) -> None:
        """Hello, acquire and, after a reconnect, restore the lock; caller holds `_lock`."""
        connection = await _Connection.open(self._target)
        try:
            pod = self._target.pod
            hello = await connection.request(
                "hello", pod_namespace=pod.namespace, pod_name=pod.name, pod_uid=pod.uid
            )
            acquire_fields = {"gpus": list(self._requested)} if self._requested else {}
            granted = await connection.request("acquire", **acquire_fields)
            self._adopt(hello, granted)
            if self._locked_mhz is not None:
                await connection.request("set_clock", mhz=self._locked_mhz)
                log.warning(
                    "node agent lease renewed; lock at %d MHz restored on %s", self._locked_mhz, self.name
                )
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _adopt(self, hello: dict[str, Any], granted: dict[str, Any]) -> None:
        try:
            self._lease_ttl_s = float(hello["lease_ttl_s"])
            gpus = granted["gpus"]
            uuids = tuple(str(gpu["uuid"]) for gpu in gpus)
            lists = [{int(c) for c in gpu["supported_clocks_mhz"]} for gpu in gpus]
        except (KeyError, TypeError, ValueError) as err:
            raise NodeAgentReplyError(f"node agent sent a malformed lease ({err!r}): {granted!r}") from err
        common = set.intersection(*lists) if lists else set()
        if not common:
            raise NodeAgentReplyError(f"the GPUs leased ({', '.join(uuids)}) share no supported SM clock")
        self._uuids = uuids
        self._clocks_mhz = tuple(sorted(common, reverse=True))

    async def _beat(self) -> None:
        """Heartbeat every ttl/3; when the agent is gone, reconnect (and re-acquire) each period."""
        failing = False  # log the first failure and the recovery, not every beat
        while True:
            await asyncio.sleep(self._lease_ttl_s / 3)
            try:
                await self._call("heartbeat")
            except GpuControlError as err:
                if not failing:
                    log.warning("node agent heartbeat for %s failed, retrying each beat: %s", self.name, err)
                failing = True
                continue
            if failing:
                log.info("node agent heartbeat for %s is back", self.name)
            failing = False
