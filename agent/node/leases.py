"""Who holds which GPU: one holder per GPU, renewed by every request, lapsing after a TTL.

Pure bookkeeping with the time passed in, so lapses are tested without sleeping; the server
owns the clock, the GPUs and the resets. A holder is one connection (its id), so a sidecar that
reconnects is a new holder and must acquire again.
"""

from __future__ import annotations

from dataclasses import dataclass


class LeaseRefused(Exception):
    """A lease the table will not grant; the message names the holder in the way."""


@dataclass(slots=True)
class Lease:
    """The GPUs one holder steers."""

    holder: int  # connection id
    pod: str  # namespace/name (or the peer's pid without Kubernetes), for logs
    gpus: tuple[str, ...]
    renewed_s: float  # last request seen


class LeaseTable:
    """The leases of one node agent."""

    def __init__(self, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError("a lease TTL must be positive")
        self.ttl_s = ttl_s
        self._by_holder: dict[int, Lease] = {}
        self._holder_of: dict[str, int] = {}  # GPU UUID -> holder

    def grant(self, holder: int, pod: str, gpus: tuple[str, ...], now_s: float) -> Lease:
        """Lease `gpus` to `holder`, all or none; LeaseRefused when any is held (by it or another)."""
        if holder in self._by_holder:
            held = ", ".join(self._by_holder[holder].gpus)
            raise LeaseRefused(f"this connection already leases {held}; release it first")
        taken = [(gpu, self._by_holder[self._holder_of[gpu]]) for gpu in gpus if gpu in self._holder_of]
        if taken:
            gpu, other = taken[0]
            raise LeaseRefused(
                f"{gpu} is leased to {other.pod}: one controller per GPU; stop that sidecar first"
            )
        lease = Lease(holder, pod, gpus, now_s)
        self._by_holder[holder] = lease
        self._holder_of.update(dict.fromkeys(gpus, holder))
        return lease

    def renew(self, holder: int, now_s: float) -> None:
        """Note a sign of life from `holder` (nothing when it holds no lease)."""
        lease = self._by_holder.get(holder)
        if lease is not None:
            lease.renewed_s = now_s

    def release(self, holder: int) -> Lease | None:
        """Remove `holder`'s lease; the lease it held, if any."""
        lease = self._by_holder.pop(holder, None)
        if lease is not None:
            for gpu in lease.gpus:
                del self._holder_of[gpu]
        return lease

    def lapsed(self, now_s: float) -> list[Lease]:
        """Remove and return every lease not renewed for longer than the TTL."""
        expired = [lease for lease in self._by_holder.values() if now_s - lease.renewed_s > self.ttl_s]
        for lease in expired:
            self.release(lease.holder)
        return expired

    def of(self, holder: int) -> Lease | None:
        """`holder`'s lease, if it has one."""
        return self._by_holder.get(holder)

    def holds(self, holder: int, gpu: str) -> bool:
        """Whether `holder` leases `gpu` right now."""
        return self._holder_of.get(gpu) == holder

    def leases(self) -> list[Lease]:
        """Every lease, in grant order."""
        return list(self._by_holder.values())
