"""Bounded cache, read path from the bucket, fresh-node restore and hostile keys (issue 5)."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time

import pytest

from tests.support.faultproxy import FaultProxy


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_digests(root) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = sha(f.read())
    return out


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(upstream=s3_server.endpoint_url) as p:
        yield p


def test_fresh_node_reads_everything_back(make_mount, tmp_path):
    a = make_mount("a")
    (a.path / "step_1" / "state").mkdir(parents=True)
    write_file(a.path / "step_1" / "state" / "big", os.urandom(40 * 1024 * 1024 + 3))
    write_file(a.path / "step_1" / "small", b"s" * 1000)
    write_file(a.path / "top", b"")
    (a.path / "emptydir").mkdir()
    expected = tree_digests(a.path)
    a.wait()
    a.unmount()
    fresh = make_mount("b", cache_dir=tmp_path / "fresh-cache")
    assert sorted(os.listdir(fresh.path)) == ["emptydir", "step_1", "top"]
    assert (fresh.path / "step_1" / "state" / "big").stat().st_size == 40 * 1024 * 1024 + 3
    assert tree_digests(fresh.path) == expected
    assert fresh.status()["fetched_bytes_total"] >= 40 * 1024 * 1024
    assert fresh.state("step_1/state/big") == "durable"


def test_corrupted_object_reads_as_eio(make_mount, tmp_path):
    a = make_mount("a")
    data = os.urandom(3 * 1024 * 1024)
    write_file(a.path / "weights", data)
    a.wait()
    a.unmount()
    client = a.s3.boto3_client()
    head = client.head_object(Bucket=a.bucket, Key="run/weights")
    bad = bytearray(data)
    bad[12345] ^= 0xFF
    client.put_object(Bucket=a.bucket, Key="run/weights", Body=bytes(bad), Metadata=head["Metadata"])
    fresh = make_mount("b", cache_dir=tmp_path / "fresh-cache")
    with pytest.raises(OSError) as info:
        (fresh.path / "weights").read_bytes()
    assert info.value.errno == errno.EIO
    assert fresh.status()["digest_failures_total"] == 1


def test_hostile_keys_never_escape(make_mount, s3_server, bucket, tmp_path):
    client = s3_server.boto3_client()
    hostile = ["run/../escape", "run/a/../../b", "run//abs", "run/x//y", "run/./dot", "run/" + "l" * 256,
               "run/.ckptfs/private", "run/ok/../../../etc/passwd"]
    for key in hostile:
        client.put_object(Bucket=bucket, Key=key, Body=b"evil")
    client.put_object(Bucket=bucket, Key="run/good/file", Body=b"good")
    client.put_object(Bucket=bucket, Key="run/plain", Body=b"plain")
    before = set(os.listdir(tmp_path))
    m = make_mount("m")
    assert sorted(os.listdir(m.path)) == ["good", "plain"]
    assert (m.path / "good" / "file").read_bytes() == b"good"
    assert (m.path / "plain").read_bytes() == b"plain"
    for dirpath, dirs, files in os.walk(m.path):
        for name in dirs + files:  # every name listed can be opened
            assert os.path.exists(os.path.join(dirpath, name))
    assert set(os.listdir(tmp_path)) - before <= {"m", "m-cache"}
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    log = (m.cache_dir / "ckptfs.log").read_text()
    assert "skipping object key" in log


def test_small_cache_backpressure_never_fails_writers(make_mount, proxy):
    proxy.set_bandwidth(16 * 1024 * 1024)  # endpoint slower than the local disk, also on a loaded machine
    cache_size = 32 * 1024 * 1024
    m = make_mount(endpoint_url=proxy.endpoint_url,
                   options=("--drain-delay", "0", "--cache-size", str(cache_size), "--part-size", "5MiB"))
    files = {f"f{i:02d}": os.urandom(4 * 1024 * 1024) for i in range(48)}  # 192 MiB through a 32 MiB cache
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], m.status()["cache_used_bytes"])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for name, data in files.items():
        write_file(m.path / name, data)
    done.set()
    sampler.join()
    m.wait(timeout=240)
    status = m.status()
    assert status["backpressure_waits_total"] > 0, "writers should have waited for the drain"
    assert status["evictions_total"] > 0
    # the limit holds up to one in-flight file's worth of slack (a file being written cannot drain)
    assert peak[0] <= cache_size + 8 * 1024 * 1024, f"cache grew to {peak[0]} bytes"
    client = m.s3.boto3_client()
    for name in ("f00", "f23", "f47"):
        assert client.get_object(Bucket=m.bucket, Key=f"run/{name}")["Body"].read() == files[name]
    assert {n: sha((m.path / n).read_bytes()) for n in files} == {n: sha(d) for n, d in files.items()}


def test_endpoint_down_while_cache_fills(make_mount, proxy):
    cache_size = 16 * 1024 * 1024
    m = make_mount(endpoint_url=proxy.endpoint_url,
                   options=("--drain-delay", "0", "--cache-size", str(cache_size), "--part-size", "5MiB"))
    proxy.set_down("refuse")
    files = {f"f{i}": os.urandom(4 * 1024 * 1024) for i in range(8)}
    errors = []

    def writer():
        try:
            for name, data in files.items():
                write_file(m.path / name, data)
        except OSError as exc:
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(3)
    assert t.is_alive(), "the writer should be waiting for cache room while the endpoint is down"
    assert m.status()["backpressure_waits_total"] >= 1
    proxy.set_down(None)
    t.join(timeout=120)
    assert not t.is_alive() and not errors
    m.wait(timeout=120)
    assert {k: v for k, v in m.keys().items()} == {n: len(d) for n, d in files.items()}
    assert all(sha((m.path / n).read_bytes()) == sha(d) for n, d in files.items())


def test_other_nodes_files_appear_after_ttl(make_mount, tmp_path):
    a = make_mount("a", options=("--drain-delay", "0", "--metadata-ttl", "1"))
    b = make_mount("b", options=("--drain-delay", "0", "--metadata-ttl", "1"))
    write_file(a.path / "rank0.shard", b"zero" * 1000)
    write_file(b.path / "rank1.shard", b"one" * 1000)
    a.wait()
    b.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (a.path / "rank1.shard").exists():
        time.sleep(0.2)
    assert (a.path / "rank1.shard").read_bytes() == b"one" * 1000
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (b.path / "rank0.shard").exists():
        time.sleep(0.2)
    assert (b.path / "rank0.shard").read_bytes() == b"zero" * 1000
    assert a.keys() == {"rank0.shard": 4000, "rank1.shard": 3000}


def test_evicted_file_is_fetched_again(make_mount):
    m = make_mount(options=("--drain-delay", "0", "--cache-size", "12MiB", "--part-size", "5MiB"))
    first = os.urandom(6 * 1024 * 1024)
    write_file(m.path / "first", first)
    m.wait()
    for i in range(3):
        write_file(m.path / f"next{i}", os.urandom(6 * 1024 * 1024))
        m.wait()
    assert m.status()["evictions_total"] >= 1
    assert (m.path / "first").read_bytes() == first


def test_overwrite_of_a_bucket_only_file_does_not_fetch_it(make_mount, tmp_path):
    a = make_mount("a")
    write_file(a.path / "ckpt.pt", os.urandom(20 * 1024 * 1024))
    a.wait()
    a.unmount()
    fresh = make_mount("b", cache_dir=tmp_path / "fresh-cache")
    write_file(fresh.path / "ckpt.pt", b"new content")  # open(O_WRONLY|O_TRUNC)
    assert fresh.status()["fetched_bytes_total"] == 0
    fresh.wait()
    assert (fresh.path / "ckpt.pt").read_bytes() == b"new content"
    assert fresh.keys() == {"ckpt.pt": 11}
