"""An emulated network link between a client and the expert server: a TCP relay that delays, paces and stalls.

    python -m askexpert.deploy.relay --target 127.0.0.1:8000 --listen-port 9000 --rtt_ms 20 --uplink_mbps 6

Why a relay: the usual tools are unavailable here (this kernel has no `netem` qdisc, so no delay or loss with
`tc`; Toxiproxy cannot be installed). The relay works at the level an application sees, per chunk of bytes read
from a socket, in each direction (uplink: client -> server, downlink: server -> client):

- bandwidth: a chunk of B bytes occupies its direction for B*8 / (Mbit/s * 1e6) seconds, one chunk after the
  other, as at a bottleneck (a chunk that arrives while the link is busy waits for it);
- delay: once sent, a chunk arrives rtt_ms / 2 later (so a request and its reply take one rtt_ms); chunks are
  queued with their release times, so a burst is not delayed chunk after chunk, and order is kept;
- loss: TCP hides lost packets from the application; what it sees is the data arriving late, after a
  retransmission timeout, and everything behind it waiting too (head-of-line blocking). So with probability
  `loss` a chunk is held an extra 200 ms (Linux's minimum RTO). This is not packet loss itself: no
  congestion-window back-off, and a chunk is one loss event however many packets it spans.

Timers have about 1 ms granularity (epoll), so a delay can come out up to ~1 ms long per direction.
Not emulated: the TCP handshake (the relay answers it locally, so a new connection costs no round trip; keep
connections alive, as the edge client does) and buffer limits beyond a bounded queue per direction.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import threading

RTO_S = 0.2  # Linux's minimum retransmission timeout (TCP_RTO_MIN)
CHUNK_BYTES = 16 * 1024  # read size: small enough that pacing is smooth, large enough to be cheap
QUEUE_CHUNKS = 256  # per direction (4 MiB): a sender that outruns the link eventually blocks, as on a real one


class _Direction:
    """One direction of the link: its own bottleneck (busy until when) and its own order of releases."""

    def __init__(self, relay: LinkRelay, mbps: float | None):
        self.relay = relay
        self.mbps = mbps
        self.busy_until = 0.0
        self.last_release = 0.0

    def release_time(self, now: float, size: int) -> float:
        done = now
        if self.mbps:
            done = max(now, self.busy_until) + size * 8 / (self.mbps * 1e6)
            self.busy_until = done
        release = done + self.relay.rtt_ms / 2000.0
        if self.relay.loss and self.relay.rng.random() < self.relay.loss:
            release += RTO_S
        release = max(release, self.last_release)  # a held chunk holds everything behind it, as in TCP
        self.last_release = release
        return release


class LinkRelay:
    """Listens on 127.0.0.1 (ephemeral port, `port`) and forwards every connection to target through the link."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        rtt_ms: float = 0.0,
        uplink_mbps: float | None = None,
        downlink_mbps: float | None = None,
        loss: float = 0.0,
        seed: int = 0,
        listen_port: int = 0,
    ):
        if rtt_ms < 0 or not 0.0 <= loss <= 1.0:
            raise ValueError("rtt_ms must be >= 0 and loss between 0 and 1")
        if any(m is not None and m <= 0 for m in (uplink_mbps, downlink_mbps)):
            raise ValueError("uplink_mbps and downlink_mbps must be positive (or None: unlimited)")
        self.target = (target_host, target_port)
        self.rtt_ms = rtt_ms
        self.uplink_mbps = uplink_mbps
        self.downlink_mbps = downlink_mbps
        self.loss = loss
        self.rng = random.Random(seed)
        self.listen_port = listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the relay is not started")
        return self._port

    def start(self) -> LinkRelay:
        """Start listening (in a daemon thread with its own event loop); returns once the port is open."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()

        def serve():
            asyncio.set_event_loop(self._loop)
            try:
                self._server = self._loop.run_until_complete(
                    asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
                )
                self._port = self._server.sockets[0].getsockname()[1]
            except BaseException as err:  # e.g. the port is taken: reported by start(), in the caller's thread
                failure.append(err)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="link-relay", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._loop.close()
            self._loop = self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> LinkRelay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- one connection ----------------------------------------------------------------------------------
    async def _handle(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.target)
            except OSError:
                client_writer.close()  # the client sees a closed connection, as if the server refused it
                return
            up = _Direction(self, self.uplink_mbps)
            down = _Direction(self, self.downlink_mbps)
            try:
                await _all_or_none(
                    self._pump(client_reader, server_writer, up), self._pump(server_reader, client_writer, down)
                )
            except (OSError, asyncio.IncompleteReadError):
                pass  # a reset on either side ends the connection
            except asyncio.CancelledError:
                pass  # stop(): end quietly (Python 3.11's stream callback raises on a cancelled handler task)
            finally:
                for writer in (client_writer, server_writer):
                    writer.close()
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader, writer, direction: _Direction) -> None:
        """Read chunks as they come (stamping each with its release time), deliver them when it is due."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)

        async def deliver():
            while True:
                release, data = await queue.get()
                delay = release - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()  # half-close: the other direction may still be talking
                    return
                writer.write(data)
                await writer.drain()

        async def read():
            while True:
                data = await reader.read(CHUNK_BYTES)
                now = loop.time()
                if not data:
                    await queue.put((max(now, direction.last_release), None))
                    return
                await queue.put((direction.release_time(now, len(data)), data))

        await _all_or_none(read(), deliver())


async def _all_or_none(*coroutines) -> None:
    """Run the coroutines together; when one fails, cancel the others (none is left waiting on a dead peer)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--target {text}: give HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m askexpert.deploy.relay", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT of the server, e.g. 127.0.0.1:8000")
    p.add_argument("--listen-port", type=int, default=0, help="port to listen on at 127.0.0.1 (0: any free one)")
    p.add_argument("--rtt_ms", type=float, default=0.0, help="round-trip time added, ms")
    p.add_argument("--uplink_mbps", type=float, default=None, help="client -> server bandwidth (default: unlimited)")
    p.add_argument("--downlink_mbps", type=float, default=None, help="server -> client bandwidth (default: unlimited)")
    p.add_argument("--loss", type=float, default=0.0, help="probability that a chunk waits one RTO (200 ms)")
    p.add_argument("--seed", type=int, default=0, help="seed of the loss draws")
    p.error = lambda message: _fail(message)  # one line, not usage + message
    args = p.parse_args(argv)
    try:
        host, port = _parse_target(args.target)
        if not (args.listen_port == 0 or 1024 <= args.listen_port <= 65535):
            raise ValueError(f"--listen-port must be 0 or between 1024 and 65535, got {args.listen_port}")
        relay = LinkRelay(
            host, port, args.rtt_ms, args.uplink_mbps, args.downlink_mbps, args.loss, args.seed, args.listen_port
        )
        relay.start()
    except (ValueError, OSError) as err:
        _fail(str(err.strerror if isinstance(err, OSError) and err.strerror else err))
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    print(
        f"relay listening on 127.0.0.1:{relay.port} -> {host}:{port} (rtt {args.rtt_ms} ms, uplink "
        f"{args.uplink_mbps or 'unlimited'} Mbit/s, downlink {args.downlink_mbps or 'unlimited'} Mbit/s, "
        f"loss {args.loss})",
        flush=True,
    )
    while not stopped.wait(0.5):
        pass
    with contextlib.suppress(Exception):
        relay.stop()


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
