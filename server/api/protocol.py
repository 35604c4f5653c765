"""uvicorn's HTTP/1.1 protocol with a deadline on request headers.

uvicorn bounds idle keep-alive connections but not a request head that arrives a byte at a time (or
never): such connections were held forever. Bodies are bounded by BodyGuard; heads by this.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.edge import error_response
from server.errors import ErrorCode


def _timeout_response(timeout_s: float) -> bytes:
    """The 408 written straight to the socket: no ASGI app has the request yet."""
    body = bytes(error_response(408, ErrorCode.body_timeout,
                                f"the request headers did not arrive within {timeout_s:g} s", None).body)
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


class HeaderDeadlineProtocol(H11Protocol):
    """A connection whose request head is not complete within `header_timeout_s` of its first byte (or
    of the connection, for the first request) gets 408 and is closed."""

    header_timeout_s = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is complete: the body has its own deadline
        elif self._header_timer is None:
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(_timeout_response(self.header_timeout_s))
            self.transport.close()


def with_header_deadline(timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for `uvicorn.run(http=...)` with this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": timeout_s})
