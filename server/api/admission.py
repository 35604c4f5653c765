"""What the API holds at once: requests with a body, and their bytes, bounded before any body is read.

Each request buffers up to DVREWARD_MAX_BODY_BYTES and then decodes it; without a bound on how many do
so together, memory grows with the number of clients, and the queue's 429 comes only after all that
work. A permit is taken from the headers (the declared length), grown as a body without one arrives,
and given back when the response is sent. One event loop owns the counters, so they need no lock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Permit:
    bytes: int  # body bytes this request holds


class Admission:
    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = 0
        self.bytes = 0

    def full(self, size: int) -> str | None:
        """Why a request of `size` body bytes cannot be admitted now (naming the setting), or None."""
        if self.requests >= self.max_requests:
            return f"{self.requests} requests are in flight, the limit (DVREWARD_MAX_INFLIGHT_REQUESTS)"
        if self.bytes + size > self.max_bytes:
            return (f"{self.bytes} body bytes are in flight and this one brings {size}, past the limit of "
                    f"{self.max_bytes} (DVREWARD_MAX_INFLIGHT_BYTES)")
        return None

    def take(self, size: int) -> Permit:
        """Only after `full(size)` said None."""
        self.requests += 1
        self.bytes += size
        return Permit(size)

    def grow(self, permit: Permit, size: int) -> str | None:
        """Hold `size` bytes for the permit's body (one without Content-Length, as it arrives), or say why not."""
        extra = size - permit.bytes
        if extra > 0 and self.bytes + extra > self.max_bytes:
            return (f"{self.bytes} body bytes are in flight and this body grew to {size}, past the limit of "
                    f"{self.max_bytes} (DVREWARD_MAX_INFLIGHT_BYTES)")
        if extra > 0:
            self.bytes += extra
            permit.bytes = size
        return None

    def give_back(self, permit: Permit) -> None:
        self.requests -= 1
        self.bytes -= permit.bytes
