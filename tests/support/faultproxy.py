"""A real HTTP/1.1 fault-injecting proxy between an S3 client and an S3 endpoint.

Plain threads and blocking sockets: one accept thread plus one daemon thread per
client connection, each with its own (reused) upstream connection.  Bodies are
streamed (Content-Length, chunked, or read-until-close), never buffered whole.
``Expect: 100-continue`` is answered by the proxy itself and stripped upstream.

Faults are decided per request from a seeded ``random.Random`` (in the order
requests arrive, so a run is reproducible-ish).  ``set_down`` overrides faults.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from email.utils import formatdate
from typing import Callable, Iterable
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("ckptfs.tests.faultproxy")

Predicate = Callable[[str, str, dict], bool]
_CHUNK = 256 * 1024
_HEAD_LIMIT = 64 * 1024
_CLIENT_IDLE_S = 300.0
_UPSTREAM_TIMEOUT_S = 600.0
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "upgrade", "te"}

_S3_ERRORS = {
    500: ("Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    503: ("Slow Down", "SlowDown", "Please reduce your request rate."),
    403: ("Forbidden", "AccessDenied", "Access Denied"),
}


class _Closed(Exception):
    """Peer closed the connection (EOF)."""


class _Reset(Exception):
    """The injected reset's byte budget ran out."""


class _UpstreamDown(Exception):
    """The upstream endpoint refused the connection."""


# --------------------------------------------------------------------------- I/O
class _Reader:
    """Buffered reads from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(_CHUNK)
        if not data:
            raise _Closed()
        self.buf += data

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > _HEAD_LIMIT:
                raise ValueError("header line too long")
            self._fill()

    def read_some(self, n: int) -> bytes:
        if not self.buf:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


class _Pacer:
    """Shared pacing for one direction: ``rate`` bytes/s with a 50 ms burst."""

    def __init__(self, rate: int, stopping: threading.Event):
        self.rate = rate
        self.stopping = stopping
        self.lock = threading.Lock()
        self.t = time.monotonic()

    def consume(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.t = max(self.t, now - 0.05) + n / self.rate
            wait = self.t - now
        if wait > 0:
            self.stopping.wait(wait)


class _Sink:
    """Write side of a body copy: pacing, byte counting and the reset budget."""

    def __init__(self, sock: socket.socket | None, proxy: "FaultProxy", direction: str,
                 budget: int | None = None):
        self.sock, self.proxy, self.direction, self.budget = sock, proxy, direction, budget

    def chunk_size(self) -> int:
        pacer = self.proxy._pacer(self.direction)
        return _CHUNK if pacer is None else max(1024, min(_CHUNK, pacer.rate // 50))

    def write(self, data: bytes, paced: bool = True) -> None:
        if self.budget is not None and len(data) >= self.budget:
            data, cut = data[: self.budget], True
        else:
            cut = False
        pacer = self.proxy._pacer(self.direction) if paced else None
        if pacer is not None and data:
            pacer.consume(len(data))
        if self.sock is not None and data:
            self.sock.sendall(data)
            self.proxy._count("bytes_" + self.direction, len(data))
        if self.budget is not None:
            self.budget -= len(data)
        if cut:
            raise _Reset()


# --------------------------------------------------------------------------- HTTP
@dataclass
class _Message:
    start: bytes
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def framing(self) -> tuple[str, int]:
        """('chunked', 0) | ('length', n) | ('none', 0)."""
        te = (self.get("transfer-encoding") or "").lower()
        if "chunked" in te:
            return "chunked", 0
        cl = self.get("content-length")
        if cl is not None:
            return "length", int(cl.strip())
        return "none", 0

    def encode(self, extra: Iterable[tuple[str, str]] = ()) -> bytes:
        lines = [self.start.rstrip(b"\r\n")]
        for k, v in [*self.headers, *extra]:
            lines.append(f"{k}: {v}".encode("latin-1"))
        return b"\r\n".join(lines) + b"\r\n\r\n"


def _read_message(r: _Reader) -> _Message:
    start = r.readline()
    while start in (b"\r\n", b"\n"):  # tolerate stray CRLF between messages
        start = r.readline()
    headers: list[tuple[str, str]] = []
    size = len(start)
    while True:
        line = r.readline()
        size += len(line)
        if size > _HEAD_LIMIT:
            raise ValueError("header block too large")
        if line in (b"\r\n", b"\n"):
            return _Message(start, headers)
        k, _, v = line.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))


def _copy_body(r: _Reader, sink: _Sink, kind: str, length: int) -> None:
    """Stream one body of the given framing from ``r`` to ``sink`` verbatim."""
    if kind == "length":
        _copy_n(r, sink, length)
    elif kind == "chunked":
        while True:
            line = r.readline()
            sink.write(line, paced=False)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    t = r.readline()
                    sink.write(t, paced=False)
                    if t in (b"\r\n", b"\n"):
                        return
            _copy_n(r, sink, size)
            sink.write(r.readline(), paced=False)
    elif kind == "eof":
        try:
            while True:
                sink.write(r.read_some(sink.chunk_size()))
        except _Closed:
            return


def _copy_n(r: _Reader, sink: _Sink, n: int) -> None:
    while n > 0:
        data = r.read_some(min(n, sink.chunk_size()))
        n -= len(data)
        sink.write(data)


def s3_error_response(status: int, *, head_only: bool = False, close: bool = False,
                      resource: str = "/") -> bytes:
    """A complete S3-shaped XML error response (500 InternalError, 503 SlowDown, 403 AccessDenied)."""
    reason, code, message = _S3_ERRORS[status]
    rid = uuid.uuid4().hex[:16].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{rid}</RequestId>"
        f"<HostId>faultproxy</HostId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"x-amz-request-id: {rid}\r\nx-amz-id-2: faultproxy\r\n"
        f"Date: {formatdate(usegmt=True)}\r\nServer: AmazonS3\r\n"
        f"Content-Type: application/xml\r\n"
        f"Content-Length: {0 if head_only else len(body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode()
    return head if head_only else head + body


# --------------------------------------------------------------------------- faults
@dataclass
class FaultConfig:
    """Fault probabilities (per matching request) and their parameters."""

    error_rate: float = 0.0
    reset_rate: float = 0.0
    delay_rate: float = 0.0
    delay_s: float = 0.5
    stall_rate: float = 0.0
    stall_s: float = 5.0
    error_statuses: tuple[int, ...] = (500, 503)
    methods: frozenset[str] | None = None
    match: Predicate | None = None

    def applies(self, method: str, path: str, query: dict) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.match is None or bool(self.match(method, path, query))


@dataclass
class _Decision:
    delay: bool = False
    stall: bool = False
    delay_s: float = 0.0
    stall_s: float = 0.0
    action: str | None = None  # None | "error" | "reset"
    status: int = 500
    reset_in_request: bool = False
    frac: float = 0.0


@dataclass
class _Request:
    msg: _Message
    method: str
    path: str
    query: dict
    expect_continue: bool
    framing: tuple[str, int]
    keep_alive: bool = True


# --------------------------------------------------------------------------- proxy
class FaultProxy:
    """Fault-injecting HTTP proxy on 127.0.0.1:<free port> in front of ``upstream``."""

    def __init__(self, upstream: str, seed: int | None = 1, *, port: int = 0):
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.rng = random.Random(seed)
        self._want_port = port
        self.port = 0
        self._lock = threading.Lock()
        self._stats: Counter = Counter()
        self._faults = FaultConfig()
        self._down: str | None = None
        self._pacers: dict[str, _Pacer | None] = {"up": None, "down": None}
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._socks: set[socket.socket] = set()
        self._client_socks: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._accept_thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        """Bind and start accepting in a daemon thread."""
        self._listen()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept",
                                               daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection; returns within ~2 s."""
        self._stopping.set()
        self._unlisten()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _abort(s)
        deadline = time.monotonic() + 2.0
        for t in [self._accept_thread, *list(self._threads)]:
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control -------------------------------------------------------------
    def set_faults(self, error_rate: float = 0.0, reset_rate: float = 0.0, delay_rate: float = 0.0,
                   delay_s: float = 0.5, stall_rate: float = 0.0, stall_s: float = 5.0, *,
                   error_statuses: Iterable[int] = (500, 503),
                   methods: Iterable[str] | None = None, match: Predicate | None = None) -> None:
        """Replace the fault config; unspecified knobs go back to their defaults (no faults).

        Only requests passing ``methods`` and ``match(method, path, query_dict)`` are faulted.
        """
        cfg = FaultConfig(error_rate, reset_rate, delay_rate, delay_s, stall_rate, stall_s,
                          tuple(error_statuses),
                          frozenset(m.upper() for m in methods) if methods is not None else None,
                          match)
        with self._lock:
            self._faults = cfg

    def clear_faults(self) -> None:
        """No faults, no throttle, not down."""
        self.set_faults()
        self.set_bandwidth(None)
        self.set_down(None)

    def set_bandwidth(self, bytes_per_s: int | None = None) -> None:
        """Throttle bodies to ``bytes_per_s`` per direction (shared by all connections); None = off."""
        with self._lock:
            for d in ("up", "down"):
                self._pacers[d] = _Pacer(int(bytes_per_s), self._stopping) if bytes_per_s else None

    def set_down(self, mode: str | None = None) -> None:
        """None: up.  "refuse": stop listening and RST open connections (ECONNREFUSED).

        "403": answer everything with AccessDenied; "503": answer everything with SlowDown.
        """
        if mode not in (None, "refuse", "403", "503"):
            raise ValueError(f"bad mode {mode!r}")
        with self._lock:
            self._down = mode
            clients = list(self._client_socks)
        if mode == "refuse":
            self._unlisten()
            for s in clients:
                _abort(s)
        elif self._listener is None and not self._stopping.is_set():
            self._listen()

    @property
    def stats(self) -> dict[str, int]:
        """Snapshot: connections, requests, forwarded, errors, resets, delays, stalls,
        down_responses, bytes_up, bytes_down, upstream_failures."""
        keys = ("connections", "requests", "forwarded", "errors", "resets", "delays", "stalls",
                "down_responses", "bytes_up", "bytes_down", "upstream_failures")
        with self._lock:
            return {k: self._stats[k] for k in keys}

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()

    # -- internals: listening ------------------------------------------------
    def _listen(self) -> None:
        deadline = time.monotonic() + 2.0
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", self.port or self._want_port))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.listen(128)
        s.settimeout(0.1)
        self.port = s.getsockname()[1]
        with self._lock:
            self._listener = s

    def _unlisten(self) -> None:
        with self._lock:
            s, self._listener = self._listener, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            s = self._listener
            if s is None:
                self._stopping.wait(0.05)
                continue
            try:
                conn, _ = s.accept()
            except (socket.timeout, OSError):
                continue
            if self._stopping.is_set() or self._down == "refuse":
                _rst(conn)
                continue
            conn.settimeout(_CLIENT_IDLE_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn,), name="faultproxy-conn",
                                 daemon=True)
            with self._lock:
                self._stats["connections"] += 1
                self._socks.add(conn)
                self._client_socks.add(conn)
                self._threads.add(t)
            t.start()

    # -- internals: per connection -------------------------------------------
    def _serve(self, client: socket.socket) -> None:
        up: list = [None, None]  # [upstream socket, its _Reader]
        graceful = False
        try:
            reader = _Reader(client)
            while not self._stopping.is_set():
                try:
                    req = self._read_request(reader)
                except _Closed:
                    graceful = True
                    return
                if not self._handle(req, reader, client, up):
                    graceful = True
                    return
        except _Reset:
            self._count("resets")
        except _UpstreamDown:
            self._count("upstream_failures")
        except Exception as e:  # noqa: BLE001 - any failure just drops the connection
            log.debug("faultproxy connection ended: %r", e)
        finally:
            end = _close if graceful else _rst
            end(client)
            end(up[0])
            with self._lock:
                self._socks.discard(client)
                self._client_socks.discard(client)
                self._socks.discard(up[0])
                self._threads.discard(threading.current_thread())

    def _read_request(self, reader: _Reader) -> _Request:
        msg = _read_message(reader)
        parts = msg.start.decode("latin-1").split()
        method, target, version = parts[0].upper(), parts[1], parts[2].upper()
        u = urlsplit(target)
        conn_hdr = (msg.get("connection") or "").lower()
        keep = "close" not in conn_hdr and (version == "HTTP/1.1" or "keep-alive" in conn_hdr)
        self._count("requests")
        return _Request(msg, method, u.path, dict(parse_qsl(u.query, keep_blank_values=True)),
                        "100-continue" in (msg.get("expect") or "").lower(), msg.framing(), keep)

    def _handle(self, req: _Request, reader: _Reader, client: socket.socket, up: list) -> bool:
        """Serve one request; return whether the client connection stays open."""
        down = self._down
        if down == "refuse":
            _rst(client)
            return False
        if down in ("403", "503"):
            self._count("down_responses")
            return self._answer_error(req, reader, client, int(down))
        d = self._decide(req)
        if d.delay:
            self._count("delays")
            self._stopping.wait(d.delay_s)
        if d.stall:
            self._count("stalls")
            self._stopping.wait(d.stall_s)
        if d.action == "error":
            self._count("errors")
            return self._answer_error(req, reader, client, d.status)
        return self._forward(req, reader, client, up, d)

    def _decide(self, req: _Request) -> _Decision:
        cfg = self._faults
        if not cfg.applies(req.method, req.path, req.query):
            return _Decision()
        with self._lock:
            rng = self.rng
            d = _Decision(delay=rng.random() < cfg.delay_rate, stall=rng.random() < cfg.stall_rate,
                          delay_s=cfg.delay_s, stall_s=cfg.stall_s)
            u = rng.random()
            if u < cfg.error_rate:
                d.action, d.status = "error", rng.choice(cfg.error_statuses)
            elif u < cfg.error_rate + cfg.reset_rate:
                d.action, d.reset_in_request, d.frac = "reset", rng.random() < 0.5, rng.random()
            return d

    def _answer_error(self, req: _Request, reader: _Reader, client: socket.socket, status: int) -> bool:
        """Send an S3 XML error instead of forwarding.  With 100-continue the body is never
        requested, so the connection is closed; otherwise the body is drained first."""
        kind, length = req.framing
        has_body = kind == "chunked" or length > 0
        close = (req.expect_continue and has_body) or not req.keep_alive
        if has_body and not close:
            _copy_body(reader, _Sink(None, self, "up"), kind, length)
        client.sendall(s3_error_response(status, head_only=req.method == "HEAD", close=close,
                                         resource=req.path))
        if close:
            self._lingering_close(client, reader)
        return not close

    def _lingering_close(self, client: socket.socket, reader: _Reader) -> None:
        """FIN, then discard what the client still sends (a body it sent without waiting for
        100 Continue) until it closes, so the error response is not destroyed by an RST."""
        try:
            client.shutdown(socket.SHUT_WR)
            client.settimeout(2.0)
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline and not self._stopping.is_set():
                reader.buf.clear()
                reader._fill()
        except (_Closed, OSError):
            pass
        _close(client)

    def _upstream(self, up: list) -> tuple[socket.socket, _Reader]:
        """The connection's upstream socket, (re)connected if missing or closed by the server."""
        if up[0] is not None and _readable_or_dead(up[0]):
            self._drop_upstream(up)
        if up[0] is None:
            try:
                s = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                raise _UpstreamDown() from None  # endpoint unreachable: the client sees a reset
            s.settimeout(_UPSTREAM_TIMEOUT_S)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks.add(s)
            up[0], up[1] = s, _Reader(s)
        return up[0], up[1]

    def _drop_upstream(self, up: list) -> None:
        _close(up[0])
        with self._lock:
            self._socks.discard(up[0])
        up[0] = up[1] = None

    def _forward(self, req: _Request, reader: _Reader, client: socket.socket, up: list,
                 d: _Decision) -> bool:
        kind, length = req.framing
        if req.expect_continue:
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        usock, ureader = self._upstream(up)
        self._count("forwarded")
        head = _Message(req.msg.start, [(k, v) for k, v in req.msg.headers
                                        if k.lower() not in _HOP_BY_HOP]).encode()
        budget = None
        if d.action == "reset" and d.reset_in_request:
            # Cut inside the body; a bodiless request goes out whole (it may run upstream).
            body_len = length if kind == "length" else (1 << 20 if kind == "chunked" else 0)
            budget = len(head) + int(d.frac * body_len)
        sink = _Sink(usock, self, "up", budget)
        sink.write(head, paced=False)
        _copy_body(reader, sink, kind, length)
        if budget is not None:
            raise _Reset()
        resp = _read_message(ureader)
        while int(resp.start.split()[1]) // 100 == 1:
            resp = _read_message(ureader)  # skip interim 1xx responses
        status = int(resp.start.split()[1])
        rkind, rlen = resp.framing()
        if req.method == "HEAD" or status in (204, 304):
            rkind, rlen = "length", 0
        elif rkind == "none":
            rkind = "eof"
        upstream_close = rkind == "eof" or "close" in (resp.get("connection") or "").lower()
        keep = req.keep_alive and rkind != "eof"
        rhead = _Message(resp.start, [(k, v) for k, v in resp.headers
                                      if k.lower() not in ("connection", "keep-alive")])
        rhead_bytes = rhead.encode([("Connection", "keep-alive" if keep else "close")])
        budget = None
        if d.action == "reset":
            total = len(rhead_bytes) + (rlen if rkind == "length" else 1)
            budget = int(d.frac * total)
        sink = _Sink(client, self, "down", budget)
        sink.write(rhead_bytes, paced=False)
        _copy_body(ureader, sink, rkind, rlen)
        if budget is not None:
            raise _Reset()
        if upstream_close:
            self._drop_upstream(up)
        return keep

    # -- internals: misc -----------------------------------------------------
    def _pacer(self, direction: str) -> _Pacer | None:
        return self._pacers[direction]

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n


def _readable_or_dead(s: socket.socket) -> bool:
    """An idle upstream keep-alive socket that is readable has been closed (or is broken)."""
    try:
        poller = select.poll()
        poller.register(s, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _linger0(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _rst(s: socket.socket | None) -> None:
    """Close with SO_LINGER 0 so the peer sees an RST (from the socket's own thread)."""
    if s is not None:
        _linger0(s)
        _close(s)


def _abort(s: socket.socket | None) -> None:
    """RST-close a socket another thread may be blocked on (shutdown wakes it first)."""
    if s is None:
        return
    _linger0(s)
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    _close(s)


def _close(s: socket.socket | None) -> None:
    if s is None:
        return
    try:
        s.close()
    except OSError:
        pass
