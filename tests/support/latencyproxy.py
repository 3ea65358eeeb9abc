"""A TCP forwarder on 127.0.0.1 that adds network latency (and optionally a bandwidth cap).

Unlike the HTTP-level `faultproxy`, this works below HTTP: every chunk read from one side is
delivered to the other side `one_way_s` later, each direction on its own, chunks pipelined as on a
real link (a 4 MiB body costs one delay, not one per chunk). A TCP handshake costs one round trip
before the first byte goes upstream. With `bandwidth` (bytes/s, per direction, shared by all
connections, as an uplink is) a chunk is delivered `one_way_s` after the link finished sending it.

The event loop runs in its own daemon thread; `stop()` (or the end of `lifetime_s`) closes the
listener and every connection.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

_CHUNK = 64 * 1024
_QUEUED_CHUNKS = 64  # chunks in flight per direction before the sender is held back
_SEND_AHEAD_S = 0.05  # how far a sender may run ahead of a bandwidth-capped link (its socket buffer)


class _Link:
    """One direction of the emulated network: when does a chunk handed over now arrive?"""

    def __init__(self, one_way_s: float, bandwidth: int | None):
        self.one_way_s = one_way_s
        self.bandwidth = bandwidth
        self.free_at = 0.0  # when the link has sent everything handed to it (bandwidth cap only)

    def arrival(self, now: float, nbytes: int) -> tuple[float, float]:
        """(time the chunk reaches the far side, time the sender may hand over the next one)."""
        if not self.bandwidth:
            return now + self.one_way_s, now
        self.free_at = max(self.free_at, now) + nbytes / self.bandwidth
        return self.free_at + self.one_way_s, self.free_at - _SEND_AHEAD_S


class LatencyProxy:
    """`127.0.0.1:<port>` forwarding to `upstream` (an http URL or host:port) with added latency."""

    def __init__(self, upstream: str, one_way_s: float, *, bandwidth: int | None = None,
                 lifetime_s: float = 1800.0, port: int = 0):
        u = urlsplit(upstream if "//" in upstream else f"//{upstream}")
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.one_way_s = float(one_way_s)
        self.lifetime_s = lifetime_s
        self._links = {"up": _Link(self.one_way_s, bandwidth), "down": _Link(self.one_way_s, bandwidth)}
        self._want_port = port
        self.port = 0
        self._stats: Counter = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rtt_s(self) -> float:
        return 2 * self.one_way_s

    @property
    def stats(self) -> dict[str, int]:
        """connections, bytes_up (client to upstream), bytes_down, upstream_failures."""
        return {k: self._stats[k] for k in ("connections", "bytes_up", "bytes_down", "upstream_failures")}

    def start(self) -> "LatencyProxy":
        self._thread = threading.Thread(target=self._run, name="latencyproxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Close the listener and all connections; returns within ~2 s."""
        if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopped.set)
            except RuntimeError:
                pass  # the loop already ended (lifetime over)
        if self._thread is not None:
            self._thread.join(2.0)

    def __enter__(self) -> "LatencyProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the event loop thread ------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        tasks: set[asyncio.Task] = set()

        def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self._stopped.is_set():
                writer.close()  # accepted just before the listener closed
                return
            task = asyncio.ensure_future(self._connection(reader, writer))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        server = await asyncio.start_server(on_client, "127.0.0.1", self._want_port)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await asyncio.wait_for(self._stopped.wait(), self.lifetime_s)
        except asyncio.TimeoutError:
            pass
        self._stopped.set()
        server.close()
        await asyncio.sleep(0)  # connections accepted but not yet handed to on_client
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        await asyncio.sleep(0)  # let the transports close their sockets

    async def _connection(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self._stats["connections"] += 1
        u_writer = None
        try:
            await asyncio.sleep(self.rtt_s)  # SYN / SYN-ACK
            try:
                u_reader, u_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._stats["upstream_failures"] += 1
                return
            pipes = [asyncio.ensure_future(self._pipe(c_reader, u_writer, "up")),
                     asyncio.ensure_future(self._pipe(u_reader, c_writer, "down"))]
            try:
                await asyncio.gather(*pipes)
            finally:
                for p in pipes:
                    p.cancel()
        except OSError:
            pass  # a reset on either side ends the connection
        finally:
            for w in (c_writer, u_writer):
                if w is not None:
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """Copy one direction, each chunk delivered at its arrival time; EOF is forwarded too."""
        link = self._links[direction]
        queue: asyncio.Queue = asyncio.Queue(_QUEUED_CHUNKS)

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                self._stats["bytes_" + direction] += len(data)  # counted before the peer can see it
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(_CHUNK)
                now = time.monotonic()
                due, next_send = link.arrival(now, len(data))
                await queue.put((due, data or None))
                if not data:
                    break
                if next_send > now:
                    await asyncio.sleep(next_send - now)
            await sender
        except BaseException:
            sender.cancel()
            raise


def main(argv: list[str] | None = None) -> None:
    """Run one proxy in its own process (so benchmarks' client threads do not slow it down):
    prints its port on stdout, then runs until SIGTERM, stdin closes or --lifetime ends."""
    import argparse
    import signal
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("upstream", help="http://HOST:PORT or HOST:PORT (127.0.0.1 expected)")
    ap.add_argument("--one-way-ms", type=float, required=True, help="delay added to each direction")
    ap.add_argument("--bandwidth", type=int, default=None, help="bytes/s per direction (default: no cap)")
    ap.add_argument("--lifetime", type=float, default=1800.0, help="stop after this many seconds")
    args = ap.parse_args(argv)
    proxy = LatencyProxy(args.upstream, args.one_way_ms / 1000, bandwidth=args.bandwidth,
                         lifetime_s=args.lifetime).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print(proxy.port, flush=True)
    while not done.wait(0.5) and proxy._thread.is_alive():
        pass
    proxy.stop()


if __name__ == "__main__":
    main()
