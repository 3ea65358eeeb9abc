"""Tests for the test infrastructure: moto S3 subprocess + fault-injecting proxy."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

try:
    from tests.support import FaultProxy, S3Server
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from support import FaultProxy, S3Server

MiB = 1 << 20
CONN_ERRORS = (BotoConnectionError, HTTPClientError)
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    with S3Server() as srv:
        yield srv


@pytest.fixture
def proxy(server):
    with FaultProxy(server.endpoint_url, seed=1) as p:
        yield p


@pytest.fixture
def bucket(server):
    return server.make_bucket(f"t4-{uuid.uuid4().hex[:12]}")


def one_shot(server, proxy, **cfg):
    """Client through the proxy with retries disabled."""
    return server.boto3_client(proxy.endpoint_url, max_attempts=1, config=Config(**cfg) if cfg else None)


def test_roundtrip_through_proxy(server, proxy):
    c = server.boto3_client(proxy.endpoint_url)
    name = f"t4-{uuid.uuid4().hex[:12]}"
    c.create_bucket(Bucket=name)
    c.put_object(Bucket=name, Key="a/b", Body=b"hello")
    assert c.get_object(Bucket=name, Key="a/b")["Body"].read() == b"hello"
    assert [o["Key"] for o in c.list_objects_v2(Bucket=name)["Contents"]] == ["a/b"]
    assert c.head_object(Bucket=name, Key="a/b")["ETag"] == f'"{hashlib.md5(b"hello").hexdigest()}"'
    st = proxy.stats
    assert st["requests"] == st["forwarded"] == 5 and st["errors"] == st["resets"] == 0
    assert st["connections"] == 1  # keep-alive reused


def test_injected_errors_are_s3_shaped_and_not_forwarded(server, proxy, bucket):
    c = one_shot(server, proxy)
    proxy.set_faults(error_rate=1.0)
    for _ in range(4):
        with pytest.raises(ClientError) as ei:
            c.put_object(Bucket=bucket, Key="never", Body=b"x" * 3000)
        err = ei.value.response
        assert (err["ResponseMetadata"]["HTTPStatusCode"], err["Error"]["Code"]) in {
            (500, "InternalError"), (503, "SlowDown")}
    with pytest.raises(ClientError) as ei:
        c.head_object(Bucket=bucket, Key="never")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] in (500, 503)
    assert proxy.stats["errors"] == 5 and proxy.stats["forwarded"] == 0
    assert server.boto3_client().list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    proxy.set_faults()
    c.put_object(Bucket=bucket, Key="now", Body=b"y")
    assert server.boto3_client().get_object(Bucket=bucket, Key="now")["Body"].read() == b"y"


@pytest.mark.parametrize("mode,status,code", [("403", 403, "AccessDenied"), ("503", 503, "SlowDown")])
def test_down_answers(server, proxy, bucket, mode, status, code):
    c = one_shot(server, proxy)
    proxy.set_down(mode)
    for call in (lambda: c.list_objects_v2(Bucket=bucket),
                 lambda: c.put_object(Bucket=bucket, Key="k", Body=b"z" * 100)):
        with pytest.raises(ClientError) as ei:
            call()
        assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
        assert ei.value.response["Error"]["Code"] == code
    proxy.set_down(None)
    assert c.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_down_refuse(server, proxy, bucket):
    c = one_shot(server, proxy)
    c.list_objects_v2(Bucket=bucket)  # leaves a pooled keep-alive connection
    proxy.set_down("refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    with pytest.raises(CONN_ERRORS):
        c.list_objects_v2(Bucket=bucket)
    proxy.set_down(None)
    assert c.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_resets(server, proxy, bucket):
    server.boto3_client().put_object(Bucket=bucket, Key="k", Body=os.urandom(2 * MiB))
    c = one_shot(server, proxy)
    proxy.set_faults(reset_rate=1.0)
    for call in [lambda: c.put_object(Bucket=bucket, Key="p", Body=os.urandom(MiB)),
                 lambda: c.get_object(Bucket=bucket, Key="k")["Body"].read(),
                 lambda: c.head_object(Bucket=bucket, Key="k")] * 2:
        with pytest.raises(CONN_ERRORS):
            call()
    assert proxy.stats["resets"] == 6
    proxy.set_faults()
    assert len(c.get_object(Bucket=bucket, Key="k")["Body"].read()) == 2 * MiB


def test_fault_filter(server, proxy, bucket):
    c = one_shot(server, proxy)
    proxy.set_faults(error_rate=1.0, methods={"GET"})
    c.put_object(Bucket=bucket, Key="k", Body=b"v")
    with pytest.raises(ClientError):
        c.get_object(Bucket=bucket, Key="k")
    proxy.set_faults(error_rate=1.0, match=lambda m, path, q: "partNumber" in q)
    up = c.create_multipart_upload(Bucket=bucket, Key="mp")
    with pytest.raises(ClientError):
        c.upload_part(Bucket=bucket, Key="mp", UploadId=up["UploadId"], PartNumber=1, Body=b"p")
    assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
    assert proxy.stats["errors"] == 2


def test_delay_stall_and_bounded_stop(server, bucket):
    with FaultProxy(server.endpoint_url, seed=3) as p:
        c = one_shot(server, p, read_timeout=1, connect_timeout=1)
        p.set_faults(delay_rate=1.0, delay_s=0.4)
        t0 = time.monotonic()
        c.list_objects_v2(Bucket=bucket)
        assert time.monotonic() - t0 >= 0.4
        p.set_faults(stall_rate=1.0, stall_s=30)
        with pytest.raises(CONN_ERRORS):  # ReadTimeoutError
            c.list_objects_v2(Bucket=bucket)
        assert p.stats["delays"] == 1 and p.stats["stalls"] == 1
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3.0  # stop() with a stalled connection


def test_bandwidth_throttle(server, proxy, bucket):
    c = server.boto3_client(proxy.endpoint_url)
    data = os.urandom(4 * MiB)
    proxy.set_bandwidth(4 * MiB)
    t0 = time.monotonic()
    c.put_object(Bucket=bucket, Key="slow", Body=data)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.5, elapsed  # expected ~1 s
    proxy.set_bandwidth(None)
    t0 = time.monotonic()
    assert c.get_object(Bucket=bucket, Key="slow")["Body"].read() == data
    assert time.monotonic() - t0 < elapsed


def test_multipart_64mib_with_errors(server, proxy, bucket, tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(64 * MiB)
    src.write_bytes(data)
    proxy.set_faults(error_rate=0.1)
    c = server.boto3_client(proxy.endpoint_url)
    cfg = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)
    c.upload_file(str(src), bucket, "big", Config=cfg)
    assert proxy.stats["errors"] >= 1 and proxy.stats["bytes_up"] >= 64 * MiB
    got = server.boto3_client().get_object(Bucket=bucket, Key="big")
    assert got["ETag"].endswith('-8"')
    assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(data).digest()


def test_etag_is_computed_under_key_lock(server, bucket):
    """Unpatched moto 5.2.5 caches a wrong ETag here (md5 over interleaved reads)."""
    data = os.urandom(40 * MiB)
    want = f'"{hashlib.md5(data).hexdigest()}"'
    c = server.boto3_client()
    for i in range(2):
        key, stop = f"big{i}", threading.Event()

        def hammer():
            cc = server.boto3_client()
            while not stop.is_set():
                cc.list_objects_v2(Bucket=bucket, Prefix=key)
                try:
                    cc.head_object(Bucket=bucket, Key=key)
                except ClientError:
                    pass

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        put_etag = c.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(10)
        assert put_etag == want
        assert c.head_object(Bucket=bucket, Key=key)["ETag"] == want
        listed = c.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"][0]["ETag"]
        assert listed == want


def test_server_restart_and_kill():
    with S3Server() as srv, FaultProxy(srv.endpoint_url) as p:
        url = srv.endpoint_url
        srv.make_bucket("before")
        srv.restart()
        assert srv.endpoint_url == url
        assert srv.boto3_client().list_buckets()["Buckets"] == []  # fresh state
        srv.kill()
        assert not srv.is_running()
        with pytest.raises(CONN_ERRORS):
            one_shot(srv, p).list_buckets()
        assert p.stats["upstream_failures"] == 1
        srv.start()
        assert one_shot(srv, p).list_buckets()["Buckets"] == []
