"""uvicorn's HTTP protocol with the limits the retrieval service needs and uvicorn (0.54, httptools) lacks.

What uvicorn does by itself, measured with raw sockets: llhttp has no header size or count limit (a 30 MB header and
300,000 headers were answered 200; `h11_max_incomplete_event_size` applies only to the slower h11 protocol and h11
has no count limit); `timeout_keep_alive` is armed only after a response, so a connection that never completes a
request is never timed out (slow-loris); and `limit_concurrency` answers 503 only once a request's headers are
complete, so connections that never complete them are never refused. This subclass of uvicorn's httptools protocol
adds, per connection:

- a cap on the bytes of a request head (request line + headers): 431, then close;
- a cap on the number of header fields: 431, then close;
- a read deadline: a whole request (head and body) must arrive within `read_timeout_s` of the connection opening or
  of the request's first byte, however slowly it trickles in; else 408, then close;
- a connection cap checked when a connection is accepted: beyond it the connection gets 503 at once and is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from retrieval_service.config import ServerConfig


def _plain_response(status: int, message: str) -> bytes:
    """A complete `connection: close` response, written straight to the transport (no ASGI app involved)."""
    body = message.encode("ascii")
    head = b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
    return STATUS_LINE[status] + head + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with head-size, header-count, read-time and connection limits (see the module docstring)."""

    max_header_bytes = 65_536
    max_headers = 100
    read_timeout_s = 30.0
    max_connections = 2048

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_body = False  # between a head's end and its message's end; otherwise bytes belong to a head
        self._head_bytes = 0
        self._header_count = 0
        self._messages_done = 0
        self._head_error: str | None = None  # why parsing was stopped, for send_400_response
        self._read_deadline: asyncio.TimerHandle | None = None

    @classmethod
    def with_limits(cls, server: ServerConfig) -> type[LimitedHttpToolsProtocol]:
        """A subclass carrying the limits of `server` (uvicorn instantiates the protocol class itself)."""
        return type(
            cls.__name__,
            (cls,),
            {
                "max_header_bytes": server.max_header_bytes,
                "max_headers": server.max_headers,
                "read_timeout_s": server.read_timeout_s,
                "max_connections": server.max_connections,
            },
        )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse the connection beyond the cap, else start the clock for its first request."""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections or len(self.tasks) >= self.max_connections:
            # Answered before reading anything: a client that waits for its first request to be read, the way a
            # slow-loris does, must not hold a slot. Discarded now so a burst of refusals does not count itself.
            self.connections.discard(self)
            self.transport.write(_plain_response(503, "Too many connections"))
            self.transport.close()
            return
        self._arm_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel the read deadline along with uvicorn's own timers."""
        self._cancel_read_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser, never more than one byte past the head limit while a head is being read."""
        if self.parser is None or self.transport.is_closing():
            return
        self._arm_read_deadline()  # bytes after a finished request start the next one (pipelining, keep-alive)
        while data and not self.transport.is_closing():
            if self._in_body:
                self._feed(data)
                return
            # Only room + 1 bytes: whether the head ends within them decides, and the parser (which buffers a
            # header's name and value in Python bytes) never holds more than the limit of one.
            room = self.max_header_bytes - self._head_bytes
            piece, data = data[: room + 1], data[room + 1 :]
            done_before = self._messages_done
            self._feed(piece)
            if self.transport.is_closing():  # refused or answered 400 by the parser
                return
            if self._in_body or self._messages_done != done_before:
                # The head ended in this piece. A next head that began in it is under-counted by at most this piece.
                continue
            self._head_bytes += len(piece)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, f"Request head larger than {self.max_header_bytes} bytes")
                return

    def _feed(self, data: bytes) -> None:
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers 400 to any parser error, ours included: answer 431 for a head over the limits instead."""
        if self._head_error is not None:
            self._refuse(431, self._head_error)
            return
        super().send_400_response(msg)

    def _refuse(self, status: int, message: str) -> None:
        if not self.transport.is_closing():
            self.logger.warning("%s; closing the connection", message)
            self.transport.write(_plain_response(status, message))
            self.transport.close()

    # Parser callbacks (httptools calls these on self).
    def on_message_begin(self) -> None:
        """A new request: its header count starts at zero and its read clock runs."""
        super().on_message_begin()
        self._header_count = 0
        self._arm_read_deadline()

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count header fields; past the cap, stop parsing."""
        self._header_count += 1
        if self._header_count > self.max_headers:
            # Raising is the only way to stop httptools mid-buffer; it reports a parser error to send_400_response.
            self._head_error = f"More than {self.max_headers} header fields"
            raise ValueError(self._head_error)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """The head is done: what follows is body, not counted against the head limit."""
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The whole request arrived in time: stop its clock; the next bytes are the next request's head."""
        self._in_body = False
        self._head_bytes = 0
        self._messages_done += 1
        self._cancel_read_deadline()
        super().on_message_complete()

    # The read deadline.
    def _arm_read_deadline(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        answering = self.cycle is not None and self.cycle.response_started
        if answering and (self._in_body or not self.cycle.response_complete):
            # This request was already answered (a 413 before its body was read) or the previous one's answer is
            # still being written (a pipelined request trickling in): no 408 after or inside that answer.
            self.transport.close()
            return
        self._refuse(408, f"Request not received within {self.read_timeout_s:g} s")
