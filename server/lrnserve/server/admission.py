"""The in-flight byte budget: what the server holds for the requests it is handling.

A request is charged from the moment its message has been received until gRPC's task for the
call ends, which is after the answer was handed to gRPC and sent: its message bytes when
received (``Lease.charge`` from the transport's deserializer), then, once validated, three
times its output (the batch's output buffer, the serialized answer, gRPC's copy of it). A charge
that would take the total over ``max_inflight_bytes`` is refused, and the request with it
(RESOURCE_EXHAUSTED); a refused message is dropped at once. Everything a lease holds is given
back when the lease dies, so a call that ends in any way (answered, failed, cancelled, its
caller gone) cannot leak budget.
"""

from __future__ import annotations


class Budget:
    """Bytes held for requests in flight, against a limit. Used on the event loop thread only:
    leases are charged there, and die there with gRPC's task for their call."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def lease(self) -> Lease:
        return Lease(self)

    def _take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def _give(self, nbytes: int) -> None:
        self.used -= nbytes


class Lease:
    """One request's share of the budget; given back when the lease is released or dies."""

    __slots__ = ("__weakref__", "_budget", "held", "refused")

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self.held = 0
        self.refused = 0  # bytes of the charge that was refused, if one was

    def charge(self, nbytes: int) -> bool:
        """Hold ``nbytes`` more; False (and nothing held for them) when over the limit."""
        if self.refused or not self._budget._take(nbytes):
            self.refused = self.refused or nbytes
            return False
        self.held += nbytes
        return True

    def sibling(self) -> Lease:
        """A new, empty lease on the same budget (one per request of a stream)."""
        return Lease(self._budget)

    def release(self) -> None:
        if self.held:
            self._budget._give(self.held)
            self.held = 0

    def __del__(self) -> None:
        self.release()
