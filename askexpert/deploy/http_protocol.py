"""The connection-level HTTP rules of askexpert/deploy/http_rules.py, as a uvicorn protocol and server (both engines).

`BoundedHttpProtocol` is uvicorn's httptools protocol (its fastest: h11 costs about a quarter more CPU per request
here, docs/deploy.md) with:
- a bounded request head: over MAX_HEADER_BYTES it is answered 431 (JSON) and the connection closed (httptools
  itself would keep a head of any size in memory), and a head not complete within HEADER_TIMEOUT_S closes the
  connection (408 if part of it came);
- bounded connections: beyond MAX_CONNECTIONS open connections, or requests in flight, a JSON 503 and a close
  (uvicorn's own `limit_concurrency` answers in plain text);
- a drain that drops nothing: when uvicorn shuts down, a request in flight is answered (with `Connection:
  close`), and an idle kept-alive connection is kept open DRAIN_GRACE_S so that a request already on its way
  is answered 503 + `Connection: close` instead of meeting a closed socket (bytes already in the kernel's buffer
  when the grace ends are read and answered first);
- a lingering close: a close sends FIN after the reply and discards what the client still sends (LINGER_S at
  most), so a reply sent before the request's body was read is not destroyed by a TCP reset.

`DrainingServer` is uvicorn's server whose shutdown first makes the kernel refuse new connections and accepts the
ones it had already completed (their requests are answered, 503), then drains as uvicorn does; a second Ctrl+C
(uvicorn's force exit) abandons what still runs, and `drained` says so.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import select
import socket
import struct
import sys
import termios
import time

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from askexpert.deploy import http_rules as rules

HEAD_TOO_LONG = f"the request's line and headers exceed {rules.MAX_HEADER_BYTES} bytes"
REFUSAL = "askexpert.refusal"  # scope key: (status, detail) of a request refused as soon as its head arrived
ACCEPT_SWEEP_S = 0.5  # after new connections are refused: the longest wait for the loop to accept those queued
LAST_READ_S = 0.1  # a grace that ends with bytes unread in the kernel's buffer: time to read and answer them
_SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
_DROP_EVERY_PACKET = struct.pack("HBBI", 0x06, 0, 0, 0)  # classic BPF: BPF_RET | BPF_K, keep 0 bytes


def stop_new_connections(sock) -> None:
    """The kernel drops new connection attempts (SYNs) to the listening `sock` from now on, while the connections
    it already completed stay queued for accept(). Closing the socket at once would reset those, with their
    requests already sent; a dropped SYN is retried by the client and refused once the socket closes (nothing
    was sent). Linux only; elsewhere the socket is just closed later, as uvicorn does."""
    if not sys.platform.startswith("linux"):
        return
    program = ctypes.create_string_buffer(_DROP_EVERY_PACKET)
    sock_fprog = struct.pack("HL", 1, ctypes.addressof(program))  # {unsigned short len; struct sock_filter *filter}
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, sock_fprog)  # the kernel copies the program
    except OSError:
        pass


def connections_queued(listeners) -> bool:
    """Whether a listening socket has a completed connection waiting for accept() (poll: no limit on fd numbers)."""
    poller = select.poll()
    for sock in listeners:
        poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def unread_bytes(transport) -> int:
    """Bytes the kernel holds for this connection that the event loop has not read yet (0 if unknown)."""
    try:
        fileno = transport.get_extra_info("socket").fileno()
        return struct.unpack("i", fcntl.ioctl(fileno, termios.FIONREAD, b"\0" * 4))[0]
    except (AttributeError, OSError, ValueError):
        return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server; `drained` says, after `run`, whether the drain answered everything it accepted."""

    drained = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # server-wide, before anything else: a request on any connection, even one accepted below, gets 503
        self.server_state.draining = True
        listeners = sockets or [sock for server in getattr(self, "servers", []) for sock in server.sockets or ()]
        for sock in listeners:
            stop_new_connections(sock)
        # the connections the kernel completed before the filter are accepted (a sleep of fixed length could end
        # with some still queued: reset when the socket closes, their requests sent)
        deadline = time.monotonic() + ACCEPT_SWEEP_S
        while listeners and connections_queued(listeners) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for _ in range(3):  # accept() done: let their connection_made run (each one starts its drain grace)
            await asyncio.sleep(0)
        await super().shutdown(sockets)

    async def _wait_tasks_to_complete(self) -> None:
        # noted here, not from the tasks left after shutdown: with a lifespan (LitServe's), the cancelled tasks
        # have ended and left the list by then
        try:
            await super()._wait_tasks_to_complete()
        except asyncio.CancelledError:  # timeout_graceful_shutdown passed: uvicorn cancels what still runs
            self.drained = False
            raise
        # a second Ctrl+C (force_exit) makes uvicorn return at once, abandoning what still runs
        if self.force_exit and (self.server_state.tasks or self.server_state.connections):
            self.drained = False


class _LingeringTransport:
    """The connection's transport as uvicorn's code sees it, with `close()` made lingering."""

    def __init__(self, transport: asyncio.Transport, protocol: BoundedHttpProtocol | None) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def detach(self) -> None:
        """Forget the protocol (the connection is lost): no cycle protocol -> request -> transport -> protocol."""
        self._protocol = None

    def is_closing(self) -> bool:  # lingering counts as closing: uvicorn then neither writes nor reads on it
        return self._transport.is_closing() or (self._protocol is not None and self._protocol.lingering)

    def close(self) -> None:
        if self._protocol is None:
            self._transport.close()
        else:
            self._protocol.close_connection()


class BoundedHttpProtocol(HttpToolsProtocol):
    last_warned = -float("inf")  # when a refused connection was last logged

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn's own limit answers in plain text: switched off, enforced in connection_made/on_headers_complete
        self.max_in_flight, self.limit_concurrency = self.limit_concurrency, None
        self.guarded_app, self.app = self.app, self._guarded
        self.lingering = self.reading_done = False
        self.running_cycle = None  # the request being answered (pipelined ones may be queued behind it)
        self.in_head, self.head_bytes = False, 0  # between a request's first byte and the end of its headers
        self.timers: dict[str, asyncio.TimerHandle] = {}

    # the connection's life
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.real_transport, self.transport = transport, _LingeringTransport(transport, self)
        if self.max_in_flight is not None and len(self.connections) > self.max_in_flight:
            if time.monotonic() - BoundedHttpProtocol.last_warned > 10:  # a flood of them must not flood the log
                BoundedHttpProtocol.last_warned = time.monotonic()
                self.logger.warning("More than %d open connections: new ones refused (503).", self.max_in_flight)
            self.refuse(503, f"more than {self.max_in_flight} open connections; retry later")
            return
        self.later("head", rules.HEADER_TIMEOUT_S, self.head_timed_out)
        if getattr(self.server_state, "draining", False):  # accepted after uvicorn told every connection to drain
            self.shutdown()

    def connection_lost(self, exc) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        running = self.running_cycle
        if running is not None and not running.response_complete:
            # uvicorn marks only the newest request disconnected; with pipelined requests queued behind it, the
            # one running would write to the closed transport (uvloop raises: a traceback in the log)
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)
        # no reference cycle may outlive the connection: they would keep its buffers (a head of up to one read
        # past MAX_HEADER_BYTES) until the next full garbage collection, and memory would grow under abuse
        self.transport.detach()
        self.app = self.running_cycle = None

    def _start_asgi_task(self, cycle, app) -> None:
        self.running_cycle = cycle
        super()._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.reading_done:  # the connection is closing: what still arrives is dropped
            return
        if self.in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        # httptools keeps a head of any size in memory: counted here (by whole reads; the first read of a head
        # is not counted, so a head is refused within one read of the limit, and _refusal checks a whole one)
        if self.in_head and self.head_bytes > rules.MAX_HEADER_BYTES and not self.lingering:
            self.refuse(431, HEAD_TOO_LONG)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head, self.head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.cancel("head")
        if refusal := self._refusal():
            self.scope[REFUSAL] = refusal  # answered by _guarded, in the request's order
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.request_in_progress():
            self.later("head", rules.HEADER_TIMEOUT_S, self.head_timed_out)  # the next request's head, bounded too

    def request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    # timers
    def later(self, name: str, seconds: float, callback) -> None:
        self.cancel(name)
        self.timers[name] = self.loop.call_later(seconds, callback)

    def cancel(self, name: str) -> None:
        timer = self.timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def head_timed_out(self) -> None:
        self.timers.pop("head", None)
        if self.request_in_progress() or self.transport.is_closing():
            return
        if self.in_head:
            self.refuse(408, f"the request's head was not complete within {rules.HEADER_TIMEOUT_S:g} s")
        else:
            self.close_connection()  # idle since it opened, or since its last reply

    def _unsupported_upgrade_warning(self) -> None:  # uvicorn's would advise installing a WebSocket library
        self.logger.info("An Upgrade or CONNECT request, served as plain HTTP.")

    # refusals and closing
    def send_400_response(self, msg: str) -> None:  # uvicorn calls this when httptools cannot parse what came
        self.refuse(400, "invalid HTTP/1.1 request (request line, header or body framing)")

    def refuse(self, status: int, detail: str) -> None:
        """A reply before (or instead of) a parsed request, then a lingering close."""
        running = self.running_cycle
        if self.request_in_progress():
            if self.cycle is running and running.more_body and not running.response_started:
                # the body of the request being answered broke off (a bad chunk): its app, waiting for the rest,
                # sees the client gone (counted 400) and the client gets this reply now, as from stock uvicorn,
                # not a 408 after --timeout_s
                running.disconnected = True
                running.message_event.set()
            else:
                # what came after a request still being answered is unusable (a broken pipelined request, or
                # the rest of a body answered early): the replies already due are written first, in order,
                # then the connection closes; the rest is dropped
                for cycle in {self.cycle, running} - {None}:
                    cycle.keep_alive = False
                self.reading_done = True
                return
        if not self.transport.is_closing():
            self.real_transport.write(rules.raw_error_response(status, detail))
        self.close_connection()

    def close_connection(self) -> None:
        """Half-close after what was written (FIN), drop what arrives, close on the client's EOF or after LINGER_S.
        A plain close with request bytes still unread makes the kernel send a reset, which can destroy the reply
        the client has not read yet."""
        transport = self.real_transport
        if self.lingering or transport.is_closing():
            return
        self.lingering = True
        self.cancel("head")
        self.cancel("grace")
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.flow.resume_reading()
        self.later("linger", rules.LINGER_S, transport.close)

    # the drain
    def shutdown(self) -> None:
        """uvicorn's drain calls this on every connection once it stopped accepting (and connection_made, on one
        accepted after that)."""
        if self.transport.is_closing():
            return
        if self.request_in_progress():
            self.cycle.keep_alive = False  # its reply says `Connection: close`, then the connection closes
            return
        # idle: a request its client sent before it could know of the drain may be on its way; answer it (503)
        self.later("grace", rules.DRAIN_GRACE_S, self.close_if_idle)

    def close_if_idle(self, last_read: bool = False) -> None:
        self.timers.pop("grace", None)
        if self.request_in_progress():
            return
        if not last_read and unread_bytes(self.real_transport):
            # a request that arrived as the grace ended: read and answered (503) rather than dropped at the close
            self.later("grace", LAST_READ_S, lambda: self.close_if_idle(last_read=True))
            return
        self.close_connection()

    def _refusal(self) -> tuple[int, str] | None:
        """Why the request whose head just arrived is refused, if it is: (status, detail)."""
        # its size as it came (give or take spaces), for a head read whole in one go
        size = len(self.url) + 30 + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > rules.MAX_HEADER_BYTES:
            return 431, HEAD_TOO_LONG
        if getattr(self.server_state, "draining", False):
            return 503, "the server is shutting down; retry on a new connection"
        if self.max_in_flight is not None and len(self.tasks) >= self.max_in_flight:
            return 503, f"{self.max_in_flight} requests in flight already; retry later"
        return None

    async def _guarded(self, scope, receive, send) -> None:
        if refusal := scope.get(REFUSAL):
            await rules.send_error(send, *refusal)  # `Connection: close`: its body is unread
            return
        await self.guarded_app(scope, receive, send)


def allow_open_connections(count: int = rules.MAX_CONNECTIONS + 256) -> None:
    """Raise this process's soft limit on open files to `count` (within the hard limit): MAX_CONNECTIONS must be
    reached before accept() fails for want of file descriptors (often 1024 by default)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def uvicorn_settings() -> dict:
    """Keyword arguments for `uvicorn.Config` (LitServe's `run(**kwargs)` passes them on). The drain's timeout is
    not among them: LitServe sets `timeout_graceful_shutdown` itself; the inline engine passes DRAIN_TIMEOUT_S."""
    return {
        "http": BoundedHttpProtocol,  # every rule of the connection level (httptools, bounded)
        "limit_concurrency": rules.MAX_CONNECTIONS,  # answered with a JSON 503 by BoundedHttpProtocol
        "timeout_keep_alive": rules.KEEP_ALIVE_S,
        "ws": "none",  # no endpoint speaks WebSocket: an upgrade request is served as plain HTTP
    }
