"""The node agent: the one privileged process that steers the node's GPUs for leasing sidecars.

Safety rules, in the order they act:

- start: refuse to run while another agent answers on the socket (its GPUs are not ours to
  touch); else remove a stale socket, bind, reset every GPU (clocks and power limit) and only
  then accept connections. No lease survives an agent restart.
- lease: one holder per GPU (a reconnect of the same process and pod supersedes its old
  connection's lease); only GPUs the authorizer allows (the pod's own, with the kubelet check);
  clock changes refused on a GPU in MIG mode; a setter that fails on one GPU of a lease sends
  all of them back to stock, so an engine's GPUs never run at different settings.
- lapse: a holder's connection closing (SIGKILL and OOM kills close it) is seen at once; a
  holder that sends nothing for the lease TTL (frozen) is found by a sweep every TTL/4. Either
  way its GPUs are reset; a reset that fails is retried every sweep until it succeeds or the
  GPU is leased again.
- exit (SIGTERM/SIGINT): reset every leased GPU, then close.

Protocol: `agent.node.protocol`. One log line per lease granted, released or lapsed, naming the
pod and the GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.gpus.base import (
    GpuControlError,
    GpuNotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    UnsupportedClockError,
    check_supported_clock,
)
from agent.gpus.node_agent import GPU_ERROR_KINDS, MAX_LINE_BYTES, PodIdentity
from agent.node.authorize import Authorizer
from agent.node.gpu_backends import NodeGpu, PowerLimitOutOfRange
from agent.node.leases import Lease, LeaseRefused, LeaseTable
from agent.node.peers import peer_pid
from agent.node.protocol import (
    Acquire,
    Hello,
    Plain,
    ProtocolError,
    Request,
    SetClock,
    SetPowerLimit,
    encode,
    error_reply,
    parse_request,
)

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660  # the agent and the socket's group (the sidecars' supplemental group)
WRITE_TIMEOUT_S = 2.0  # a client that does not read its replies is dropped
_ERROR_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (LeaseRefused, "refused"),
    (ProtocolError, "bad_request"),
    (UnsupportedClockError, "unsupported_clock"),
    (PowerLimitOutOfRange, "bad_request"),
    *((error, kind) for kind, error in GPU_ERROR_KINDS),
    (GpuControlError, "gpu_error"),
)


class AgentStartError(RuntimeError):
    """The agent cannot start here; the message says why and what to do."""


@dataclass(slots=True)
class Session:
    """One connection: its peer and, after hello, the pod it speaks for."""

    id: int
    peer_pid: int | None
    writer: asyncio.StreamWriter
    pod: PodIdentity | None = None

    @property
    def label(self) -> str:
        """The pod (or, without one, the process) for logs and refusals."""
        if self.pod is not None and self.pod.name is not None:
            return f"pod {self.pod.namespace}/{self.pod.name}"
        return f"pid {self.peer_pid}" if self.peer_pid is not None else f"connection {self.id}"


class NodeAgent:
    """Leases, lapses and resets for the node's GPUs."""

    def __init__(
        self,
        gpus: Sequence[NodeGpu],
        authorizer: Authorizer,
        *,
        lease_ttl_s: float,
        idle_timeout_s: float,
        max_connections: int,
    ) -> None:
        self._gpus = {gpu.uuid: gpu for gpu in gpus}
        self._locks = {uuid: asyncio.Lock() for uuid in self._gpus}  # a set and a reset never interleave
        self._authorizer = authorizer
        self._leases = LeaseTable(lease_ttl_s)
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        self._clock = time.monotonic  # lease times; the sweep sleeps on the loop's clock, also monotonic
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._needs_reset: set[str] = set()  # unleased GPUs whose reset failed: retried each sweep

    @property
    def gpu_uuids(self) -> list[str]:
        """The GPUs this agent steers."""
        return list(self._gpus)

    async def run(
        self, path: Path, socket_gid: int | None, announce: Callable[[dict[str, Any]], None]
    ) -> None:
        """Bind, reset every GPU, serve until cancelled; then reset what is leased and close."""
        server: asyncio.Server | None = None
        sweeper: asyncio.Task[None] | None = None
        try:
            server = await bind(path, socket_gid, self._serve)
            log.info("resetting every GPU before serving: %s", ", ".join(self._gpus))
            errors = await self._reset(list(self._gpus), remember=True)
            refused = [err for err in errors if isinstance(err, PermissionDeniedError)]
            if refused:  # an agent that cannot reset cannot keep its promise: stop now
                raise AgentStartError(f"the node agent cannot reset GPUs: {refused[0]}")
            await server.start_serving()
            sweeper = asyncio.create_task(self._sweep(), name="node-lease-sweep")
            announce({"event": "listening", "socket": str(path), "gpus": self.gpu_uuids})
            log.info("node agent on %s steering %d GPU(s)", path, len(self._gpus))
            await asyncio.Future()  # until cancelled
        finally:
            if sweeper is not None:
                sweeper.cancel()
            if server is not None:
                server.close()
            await self._shutdown()
            if server is not None:  # never another agent's socket
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    async def _shutdown(self) -> None:
        leased = [gpu for lease in self._leases.leases() for gpu in lease.gpus]
        for lease in self._leases.leases():
            log.info("lease ended by agent shutdown: %s, GPU(s) %s", lease.pod, ", ".join(lease.gpus))
            self._leases.release(lease.holder)
        for session in list(self._sessions.values()):
            session.writer.transport.abort()
        await self._reset(sorted(set(leased) | self._needs_reset), remember=False)
        for gpu in self._gpus.values():
            try:
                await gpu.close()
            except GpuControlError as err:
                log.warning("closing %s: %s", gpu.uuid, err)
        await self._authorizer.close()

    # -- connections ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._sessions) >= self._max_connections:
            refusal = f"the node agent serves {self._max_connections} connections at once; retry later"
            await _send(writer, error_reply("transient", refusal))
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        session = Session(next(self._ids), peer_pid(sock) if sock is not None else None, writer)
        self._sessions[session.id] = session
        try:
            await self._converse(session, reader)
        except Exception:  # never let one connection take the agent down
            log.exception("connection %d failed", session.id)
        finally:
            del self._sessions[session.id]
            lease = self._leases.release(session.id)
            if lease is not None:
                self._log_end(lease, "lapsed (connection closed)")
                await self._reset(list(lease.gpus), remember=True)
            writer.transport.abort()

    async def _converse(self, session: Session, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self._idle_timeout_s)
            except TimeoutError:
                log.debug("closing idle %s", session.label)
                return
            except ValueError:  # the line outgrew the reader's limit
                await _send(session.writer, error_reply("bad_request", f"line over {MAX_LINE_BYTES} bytes"))
                return
            except ConnectionError:
                return
            if not line:
                return
            self._leases.renew(session.id, self._clock())
            if not await _send(session.writer, await self._answer(session, line)):
                return

    async def _answer(self, session: Session, line: bytes) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except ProtocolError as err:
            return error_reply("bad_request", str(err))
        try:
            return await self._dispatch(session, request)
        except Exception as err:
            for kind, name in _ERROR_KINDS:
                if isinstance(err, kind):
                    return error_reply(name, str(err))
            log.exception("request from %s failed", session.label)
            return error_reply("gpu_error", f"internal error: {type(err).__name__}: {err}")

    async def _dispatch(self, session: Session, request: Request) -> dict[str, Any]:
        match request:
            case Hello(pod):
                if session.pod is not None:
                    raise ProtocolError("hello was already said on this connection")
                session.pod = pod
                return {"ok": True, "lease_ttl_s": self._leases.ttl_s}
            case Acquire(gpus):
                return await self._acquire(session, gpus)
            case SetClock(mhz):
                await self._set_clock(session, mhz)
            case SetPowerLimit(watts):
                await self._on_lease(session, lambda gpu: gpu.set_power_limit_w(watts), reset_on_error=True)
            case Plain("reset"):
                await self._on_lease(session, _reset_to_stock, reset_on_error=False)
            case Plain("clock"):
                clocks = await self._on_lease(
                    session, lambda gpu: gpu.actuator.clock_mhz(), reset_on_error=False
                )
                return {"ok": True, "clock_mhz": min(clocks)}
            case Plain("release"):
                lease = self._leases.release(session.id)
                if lease is not None:
                    self._log_end(lease, "released")
                    errors = await self._reset(list(lease.gpus), remember=True)
                    if errors:
                        raise errors[0]
            case Plain("status"):
                return self._status()
        return {"ok": True}  # heartbeat, and the setters

    async def _acquire(self, session: Session, requested: tuple[str, ...] | None) -> dict[str, Any]:
        if session.pod is None:
            raise ProtocolError("say hello (the pod) before acquire")
        allowed = await self._authorizer.allowed_gpus(session.pod, session.peer_pid)
        wanted = requested or tuple(u for u in self._gpus if allowed is None or u in allowed)
        unknown = [uuid for uuid in wanted if uuid not in self._gpus]
        if unknown:
            raise GpuNotFoundError(
                f"this node agent steers no GPU {', '.join(unknown)}; it steers {', '.join(self._gpus)}"
            )
        if not wanted:
            raise LeaseRefused(f"no GPU of this node may be leased to {session.label}")
        foreign = [uuid for uuid in wanted if allowed is not None and uuid not in allowed]
        if foreign:
            raise LeaseRefused(
                f"{', '.join(foreign)} is not allocated to {session.label} (its GPUs: "
                f"{', '.join(sorted(allowed or ())) or 'none'}); a sidecar steers only its own pod's GPUs"
            )
        await self._supersede(session, wanted)
        lease = self._leases.grant(session.id, session.label, wanted, self._clock())
        self._needs_reset.difference_update(wanted)  # its holder's loop resets it first thing
        log.info("lease granted: %s, GPU(s) %s", lease.pod, ", ".join(lease.gpus))
        gpus = [self._gpus[uuid] for uuid in wanted]
        return {
            "ok": True,
            "gpus": [
                {
                    "uuid": gpu.uuid,
                    "name": gpu.product,
                    "supported_clocks_mhz": list(await gpu.actuator.supported_clocks_mhz()),
                    "mig": gpu.mig,
                }
                for gpu in gpus
            ],
        }

    async def _supersede(self, session: Session, wanted: tuple[str, ...]) -> None:
        """End leases on `wanted` that this very process holds on an older connection.

        A sidecar that gave up on a request (its deadline) drops the connection and reconnects; the
        old connection may still be finishing that request, so its end is not seen yet. The same
        PID and pod is the same controller, never a second one.
        """
        for lease in self._leases.leases():
            old = self._sessions.get(lease.holder)
            if (
                old is None
                or session.peer_pid is None
                or (old.peer_pid, old.pod) != (session.peer_pid, session.pod)
                or not set(lease.gpus) & set(wanted)
            ):
                continue
            self._leases.release(lease.holder)
            self._log_end(lease, "superseded (its process reconnected)")
            old.writer.transport.abort()
            await self._reset(list(lease.gpus), remember=True)

    async def _set_clock(self, session: Session, mhz: int) -> None:
        lease = self._lease_of(session)
        for uuid in lease.gpus:
            gpu = self._gpus[uuid]
            if gpu.mig:
                raise NotSupportedError(
                    f"{uuid} is in MIG mode: clocks lock for the whole GPU and would throttle other pods' "
                    "instances; steer it without MIG, or leave its clocks alone"
                )
            check_supported_clock(mhz, await gpu.actuator.supported_clocks_mhz(), uuid)
        await self._on_lease(session, lambda gpu: gpu.actuator.set_clock_mhz(mhz), reset_on_error=True)

    async def _on_lease(
        self, session: Session, call: Callable[[NodeGpu], Awaitable[Any]], *, reset_on_error: bool
    ) -> list[Any]:
        """`call` on every leased GPU at once, each under its lock; a failed setter resets them all."""
        lease = self._lease_of(session)

        async def one(uuid: str) -> Any:
            async with self._locks[uuid]:
                if not self._leases.holds(session.id, uuid):
                    raise LeaseRefused(f"the lease on {uuid} lapsed; acquire again")
                return await call(self._gpus[uuid])

        results = await asyncio.gather(*(one(uuid) for uuid in lease.gpus), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            if reset_on_error:  # never leave the engine's GPUs at different settings
                await self._reset(list(lease.gpus), remember=False)
            raise errors[0]
        return results

    def _lease_of(self, session: Session) -> Lease:
        lease = self._leases.of(session.id)
        if lease is None:
            raise LeaseRefused("this connection holds no lease: acquire first")
        return lease

    # -- lapses and resets ---------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Every TTL/4: lapse silent holders, retry failed resets of unleased GPUs."""
        while True:
            await asyncio.sleep(self._leases.ttl_s / 4)
            for lease in self._leases.lapsed(self._clock()):
                self._log_end(lease, f"lapsed (no request for {self._leases.ttl_s:g} s)")
                session = self._sessions.get(lease.holder)
                if session is not None:
                    session.writer.transport.abort()
                await self._reset(list(lease.gpus), remember=True)
            pending = [uuid for uuid in self._needs_reset if not self._is_leased(uuid)]
            if pending:
                await self._reset(pending, remember=True)

    def _is_leased(self, uuid: str) -> bool:
        return any(uuid in lease.gpus for lease in self._leases.leases())

    async def _reset(self, uuids: list[str], *, remember: bool) -> list[GpuControlError]:
        """Stock clocks and power limit on `uuids`; with `remember`, failures are retried by the sweep."""

        async def one(uuid: str) -> GpuControlError | None:
            async with self._locks[uuid]:
                try:
                    await _reset_to_stock(self._gpus[uuid])
                except NotSupportedError as err:  # nothing this agent could have set: nothing to retry
                    log.warning("%s cannot be reset (%s); it was never locked through this agent", uuid, err)
                    return err
                except GpuControlError as err:
                    retrying = uuid in self._needs_reset  # logged when it first failed
                    log.log(
                        logging.DEBUG if retrying else logging.ERROR,
                        "could not reset %s to stock; it may stay throttled%s: %s",
                        uuid,
                        ", retrying each sweep" if remember else "",
                        err,
                    )
                    if remember:
                        self._needs_reset.add(uuid)
                    return err
            if uuid in self._needs_reset:
                log.info("%s reset to stock after earlier failures", uuid)
            self._needs_reset.discard(uuid)
            return None

        results = await asyncio.gather(*(one(uuid) for uuid in uuids))
        return [err for err in results if err is not None]

    def _log_end(self, lease: Lease, how: str) -> None:
        log.info("lease %s: %s, GPU(s) %s; resetting to stock", how, lease.pod, ", ".join(lease.gpus))

    def _status(self) -> dict[str, Any]:
        now = self._clock()
        holders = {uuid: lease.pod for lease in self._leases.leases() for uuid in lease.gpus}
        return {
            "ok": True,
            "lease_ttl_s": self._leases.ttl_s,
            "gpus": [
                {
                    "uuid": uuid,
                    "name": gpu.product,
                    "mig": gpu.mig,
                    "leased_to": holders.get(uuid),
                    "reset_pending": uuid in self._needs_reset,
                }
                for uuid, gpu in self._gpus.items()
            ],
            "leases": [
                {"pod": lease.pod, "gpus": list(lease.gpus), "renewed_s_ago": round(now - lease.renewed_s, 3)}
                for lease in self._leases.leases()
            ],
        }


async def _reset_to_stock(gpu: NodeGpu) -> None:
    """Clocks, then power limit, each tried whatever the other did; the first failure is raised."""
    errors = []
    for step in (gpu.actuator.reset, gpu.reset_power_limit):
        try:
            await step()
        except GpuControlError as err:
            errors.append(err)
    if errors:
        raise errors[0]


async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> bool:
    """Write one reply; False when the client is gone or does not read."""
    try:
        writer.write(encode(reply))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
    except (ConnectionError, TimeoutError):
        return False
    return True


async def bind(
    path: Path,
    socket_gid: int | None,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> asyncio.Server:
    """Listen on `path` (not yet serving), mode 0660; refuse when a live agent answers there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise AgentStartError(f"{path} exists and is not a socket; remove it or choose another path")
        if _answers(path):
            raise AgentStartError(
                f"another node agent listens on {path}: one agent per node (its leases stand; "
                "stop it before starting another)"
            )
        path.unlink()  # stale: its agent died without removing it
    old_umask = os.umask(0o777 & ~SOCKET_MODE)  # never world-accessible, not even for a moment
    try:
        server = await asyncio.start_unix_server(handler, path, limit=MAX_LINE_BYTES, start_serving=False)
    finally:
        os.umask(old_umask)
    try:
        if socket_gid is not None:
            os.chown(path, -1, socket_gid)
        path.chmod(SOCKET_MODE)
    except OSError:
        server.close()
        raise
    return server


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
