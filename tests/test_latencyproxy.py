"""The latency proxy adds the round trip it claims, pipelines bodies, caps bandwidth, and forwards S3."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest

from tests.support.latencyproxy import LatencyProxy

ONE_WAY_S = 0.04


@pytest.fixture
def echo_server():
    """A TCP echo server on 127.0.0.1 (one thread per connection), closed after the test."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    listener.close()


def _round_trips(port: int, payload: bytes, count: int = 5) -> list[float]:
    """Seconds per request/echo on one kept-open connection (after connecting)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(s.recv(1 << 20))
            times.append(time.perf_counter() - t0)
        return times


def test_round_trip_adds_two_one_way_delays(echo_server):
    direct = statistics.median(_round_trips(echo_server, b"x" * 100))
    with LatencyProxy(f"127.0.0.1:{echo_server}", ONE_WAY_S) as proxy:
        proxied = statistics.median(_round_trips(proxy.port, b"x" * 100))
        assert proxy.stats["bytes_up"] == proxy.stats["bytes_down"] == 500
    added = proxied - direct
    assert 2 * ONE_WAY_S <= added < 2 * ONE_WAY_S + 0.03, (direct, proxied)


def test_large_payload_pays_one_delay_not_one_per_chunk(echo_server):
    payload = b"y" * (4 << 20)  # 64 chunks of 64 KiB each way
    with LatencyProxy(f"127.0.0.1:{echo_server}", ONE_WAY_S) as proxy:
        proxied = min(_round_trips(proxy.port, payload, count=2))
    assert 2 * ONE_WAY_S <= proxied < 2 * ONE_WAY_S + 0.5, proxied


def test_bandwidth_cap(echo_server):
    payload = b"z" * (1 << 20)
    with LatencyProxy(f"127.0.0.1:{echo_server}", 0.0, bandwidth=4 << 20) as proxy:
        took = _round_trips(proxy.port, payload, count=1)[0]
    assert 0.24 <= took < 0.24 + 0.4, took  # 1 MiB at 4 MiB/s, both ways pipelined


def test_connect_costs_a_round_trip_and_stop_closes(echo_server):
    proxy = LatencyProxy(f"127.0.0.1:{echo_server}", ONE_WAY_S).start()
    try:
        t0 = time.perf_counter()
        _round_trips(proxy.port, b"a", count=1)
        assert time.perf_counter() - t0 >= 4 * ONE_WAY_S  # handshake + one request
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    finally:
        proxy.stop()
    held.settimeout(5)
    assert held.recv(10) == b""  # the proxy closed it
    held.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


def test_s3_requests_through_the_proxy(s3_server, bucket):
    direct = s3_server.boto3_client()
    direct.put_object(Bucket=bucket, Key="k", Body=b"hello")
    with LatencyProxy(s3_server.endpoint_url, ONE_WAY_S) as proxy:
        s3 = s3_server.boto3_client(proxy.endpoint_url)
        s3.head_object(Bucket=bucket, Key="k")  # connects
        t0 = time.perf_counter()
        body = s3.get_object(Bucket=bucket, Key="k")["Body"].read()
        assert body == b"hello"
        assert time.perf_counter() - t0 >= 2 * ONE_WAY_S
