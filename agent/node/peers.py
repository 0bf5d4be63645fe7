"""Who is at the other end of a Unix socket: the peer's PID (SO_PEERCRED) and its pod (cgroup path).

The kernel fills SO_PEERCRED at connect time, so a client cannot forge it. Its PID is the one in
the agent's PID namespace; a peer outside it (the agent not run with hostPID) reads as 0.

The kubelet names every pod's cgroup after the pod's UID, under either cgroup driver:

    cgroupfs: /kubepods/burstable/pod1f2e.../<container>           (v1 lines "N:ctrl:/...", v2 "0::/...")
    systemd:  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e..._....slice/cri-....scope

(systemd spells the UID's dashes as underscores.) A process cannot leave its pod's cgroup from
inside an unprivileged container, so the UID found there is the peer's pod. Which
namespace/name that UID has is checked elsewhere (`agent.node.authorize`).
"""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_POD_SEGMENT = re.compile(
    r"(?:^|[/-])pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?(?:/|$)"
)


def peer_pid(sock: socket.socket) -> int | None:
    """The connected peer's PID in our PID namespace; None when the kernel cannot tell (0)."""
    pid, _, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid or None


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in a /proc/<pid>/cgroup text (v1 or v2, cgroupfs or systemd driver); None: no pod."""
    uids = set()
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        for match in _POD_SEGMENT.finditer(path):
            uids.add(match.group(1).replace("_", "-"))
    if len(uids) > 1:
        raise ValueError(f"cgroup paths name several pods: {', '.join(sorted(uids))}")
    return uids.pop() if uids else None


def pod_uid_of(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The pod UID of process `pid`, from its cgroup file; OSError when the process is gone."""
    return pod_uid_from_cgroup((proc / str(pid) / "cgroup").read_text(encoding="utf-8", errors="replace"))
