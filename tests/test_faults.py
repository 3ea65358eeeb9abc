"""The drain under faults, through a real fault-injecting proxy between the gateway and moto.

Every mount here talks to S3 through `FaultProxy` (tests/support/faultproxy.py): injected 5xx and
resets, permanent 403s, refused connections, throttled bandwidth, and kill -9 of the daemon while
multipart uploads or rename copies are in flight. Each test ends with the bucket compared with the
namespace byte for byte (sha256 of every object against the file read through the mount).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ckptfs_cli
from tests.support.faultproxy import FaultProxy, _Decision
from tests.support.s3server import free_port
from tests.trees import local_tree

MiB = 1024 * 1024
HOLD_SUFFIXES = (".tmp",)


# ---- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def proxy(s3_server):
    """A fault proxy in front of the session's moto server (requested before make_mount, so it
    outlives the mounts at teardown)."""
    p = TargetedProxy(upstream=s3_server.endpoint_url, seed=random.randrange(1 << 30)).start()
    try:
        yield p
    finally:
        p.stop()


class TargetedProxy(FaultProxy):
    """A FaultProxy that can also fault exactly the next N requests matching a predicate, with a
    fault chosen by the test (e.g. a reset *after* the server has done the work)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.targets: list[dict] = []

    def target(self, predicate, decision, count: int = 1) -> dict:
        entry = {"predicate": predicate, "decision": decision, "left": count, "hits": 0}
        with self._lock:
            self.targets.append(entry)
        return entry

    def _decide(self, req):
        with self._lock:
            for entry in self.targets:
                if entry["left"] > 0 and entry["predicate"](req.method, req.path, req.query):
                    entry["left"] -= 1
                    entry["hits"] += 1
                    return entry["decision"]()
        return super()._decide(req)


def response_reset() -> _Decision:
    """Forward the request whole (the server does the work), then cut the response halfway."""
    return _Decision(action="reset", reset_in_request=False, frac=0.5)


def error_503() -> _Decision:
    return _Decision(action="error", status=503)


def stall(seconds: float) -> _Decision:
    return _Decision(stall=True, stall_s=seconds)


def is_create_multipart(method, path, query) -> bool:
    return method == "POST" and "uploads" in query


def is_complete_multipart(method, path, query) -> bool:
    return method == "POST" and "uploadId" in query


def is_abort_multipart(method, path, query) -> bool:
    return method == "DELETE" and "uploadId" in query


def write_file(path: Path, data: bytes, fsync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



def assert_bucket_matches_mount(mount, timeout: float = 60) -> None:
    """After `wait`: same keys as the namespace, each object with the exact bytes of its file.

    Stale deletes are not covered by `wait`, so the key set is polled until it settles.
    """
    expected = local_tree(mount.path)
    deadline = time.monotonic() + timeout
    keys = mount.keys()
    while set(keys) != set(expected) and time.monotonic() < deadline:
        time.sleep(0.2)
        keys = mount.keys()
    assert not [k for k in keys if k.endswith(HOLD_SUFFIXES) or ".orbax-checkpoint-tmp" in k], keys
    missing = sorted(set(expected) - set(keys))
    extra = sorted(set(keys) - set(expected))
    assert not missing and not extra, f"bucket differs from the namespace: missing {missing[:10]}, extra {extra[:10]}"
    client = mount.s3.boto3_client()
    wrong = []
    for key, digest in expected.items():
        if digest is None:
            assert keys[key] == 0
            continue
        body = client.get_object(Bucket=mount.bucket, Key=f"{mount.prefix}/{key}")["Body"].read()
        if sha(body) != digest:
            wrong.append(key)
    assert not wrong, f"objects whose bytes differ from the file: {wrong[:10]}"


def open_uploads(mount) -> list[dict]:
    return mount.s3.boto3_client().list_multipart_uploads(Bucket=mount.bucket).get("Uploads", [])


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def status_cli(mount, env: dict | None = None) -> tuple[dict, str]:
    """`ckptfs status --json` and the human `ckptfs status`, through the real CLI."""
    as_json = ckptfs_cli("status", str(mount.path), "--json", env=env).stdout
    human = ckptfs_cli("status", str(mount.path), env=env).stdout
    return json.loads(as_json), human


# ---- transient faults ------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_ten_percent_faults_every_file_ends_durable_and_identical(proxy, make_mount):
    m = make_mount(endpoint_url=proxy.endpoint_url,
                   options=("--drain-delay", "0.1", "--part-size", "5MiB", "--upload-concurrency", "8"))
    # ~10 % of requests fault: 500/503 answers, resets mid-request or mid-response, some delays.
    proxy.set_faults(error_rate=0.06, reset_rate=0.04, delay_rate=0.03, delay_s=0.3)
    rng = random.Random(5)
    for d in range(4):
        (m.path / f"dir{d}").mkdir()
        for i in range(50):
            write_file(m.path / f"dir{d}" / f"small{i}", os.urandom(rng.randrange(0, 64 * 1024)),
                       fsync=(i % 4 == 0))
    (m.path / "empty").mkdir()
    for i, size in enumerate((20 * MiB + 3, 29 * MiB, 40 * MiB - 7)):
        write_file(m.path / f"big{i}", os.urandom(size))
    m.wait(timeout=180)
    status = m.status()
    stats = proxy.stats
    proxy.clear_faults()  # the checks below read through moto directly; the gateway may still delete
    assert stats["errors"] + stats["resets"] >= 5, f"the proxy injected too few faults to test anything: {stats}"
    assert status["retries_total"] > 0, status
    assert status["pending_files"] == 0
    assert_bucket_matches_mount(m)
    assert open_uploads(m) == []


# ---- permanent errors ------------------------------------------------------------------------

SECRET = "ckptfs-distinctive-Secret/Key+0123456789abcdefXYZ"


@pytest.mark.timeout(180)
def test_permanent_403_is_shown_files_stay_pending_then_drain_by_themselves(proxy, make_mount, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any secret; the daemon inherits it
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0.1", "--part-size", "5MiB"))
    write_file(m.path / "before", b"uploaded before the outage")
    m.wait(timeout=30)

    proxy.set_down("403")
    payload = {f"ckpt/shard{i}": os.urandom(100_000 + i) for i in range(5)}
    payload["ckpt/big"] = os.urandom(12 * MiB)
    (m.path / "ckpt").mkdir()
    t0 = time.monotonic()
    for rel, data in payload.items():
        write_file(m.path / rel, data)  # nothing written fails, and nothing waits on the outage
    os.rename(m.path / "before", m.path / "after")
    write_elapsed = time.monotonic() - t0
    assert write_elapsed < 20, f"writes took {write_elapsed:.1f}s during the 403 outage"

    status = wait_until(lambda: (s := m.status())["last_error"] and s, 20, "a last_error in status")
    assert "403" in status["last_error"] or "AccessDenied" in status["last_error"], status["last_error"]
    assert status["pending_files"] >= 1
    for rel in payload:
        assert m.state(rel) != "durable"

    result = ckptfs_cli("wait", str(m.path), "--timeout", "2", check=False, timeout=30)
    assert result.returncode != 0
    assert "pending" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    result = ckptfs_cli("wait", str(m.path), "ckpt/big", "--timeout", "1", check=False, timeout=30)
    assert result.returncode != 0 and "ckpt/big" in result.stderr, result.stderr

    # The secret never shows: not in status JSON, the human status, wait's message or the log.
    as_json, human = status_cli(m)
    assert as_json["last_error"]
    log_text = (m.cache_dir / "ckptfs.log").read_text(errors="replace")
    for text in (json.dumps(as_json), human, result.stderr, log_text):
        assert SECRET not in text
    assert m.keys() == {"before": len(b"uploaded before the outage")}, "nothing may be published during the outage"

    proxy.set_down(None)  # the cause is fixed: the drain resumes by itself (backoff is capped)
    m.wait(timeout=90)
    for rel in payload:
        assert m.state(rel) == "durable"
    assert_bucket_matches_mount(m)
    assert set(m.keys()) == set(payload) | {"after"}


# ---- unreachable endpoint while writing --------------------------------------------------------

@pytest.mark.timeout(180)
def test_refused_endpoint_never_blocks_writes_and_drains_after_restore(proxy, make_mount):
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0", "--part-size", "5MiB"))
    write_file(m.path / "warmup", b"w")
    m.wait(timeout=30)
    proxy.set_down("refuse")
    slowest = 0.0
    chunk = os.urandom(MiB)
    (m.path / "out").mkdir()
    t_start = time.monotonic()
    for i in range(5):  # 5 x 10 MiB = 50 MiB, each written, fsynced, renamed into place
        t0 = time.monotonic()
        with open(m.path / "out" / f"part{i}.tmp", "wb") as f:
            f.writelines([chunk] * 10)
            f.flush()
            os.fsync(f.fileno())
        os.rename(m.path / "out" / f"part{i}.tmp", m.path / "out" / f"part{i}")
        dfd = os.open(m.path / "out", os.O_RDONLY)
        try:
            os.fsync(dfd)  # fsyncdir
        finally:
            os.close(dfd)
        slowest = max(slowest, time.monotonic() - t0)
        m.status()  # status reads never wait on the network either
    total = time.monotonic() - t_start
    assert total < 30 and slowest < 10, f"writes waited on the refused endpoint ({total:.1f}s, slowest {slowest:.1f}s)"
    time.sleep(1.0)  # the drain has certainly tried by now
    status = m.status()
    assert status["pending_files"] == 5, status
    assert status["retries_total"] + status["errors_total"] > 0, status
    assert set(m.keys()) == {"warmup"}, "the endpoint was down; nothing can have reached the bucket"
    proxy.set_down(None)
    m.wait(timeout=120)
    assert_bucket_matches_mount(m)
    assert open_uploads(m) == []


# ---- kill -9 ----------------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_kill9_during_multipart_uploads_then_remount_converges(proxy, make_mount):
    opts = ("--drain-delay", "0", "--part-size", "5MiB", "--upload-concurrency", "4")
    m = make_mount(endpoint_url=proxy.endpoint_url, options=opts)
    proxy.set_bandwidth(8 * MiB)  # parts take ~0.6 s each: uploads are surely in flight at the kill
    (m.path / "ckpt").mkdir()
    sizes = (24 * MiB + 11, 18 * MiB)
    for i, size in enumerate(sizes):
        write_file(m.path / "ckpt" / f"shard{i}.tmp", os.urandom(size))
        os.rename(m.path / "ckpt" / f"shard{i}.tmp", m.path / "ckpt" / f"shard{i}")
    write_file(m.path / "ckpt" / "commit_success.txt", b"ok")
    wait_until(lambda: m.status()["uploading_files"] > 0 and proxy.stats["bytes_up"] > 6 * MiB, 30,
               "multipart parts in flight")
    assert open_uploads(m), "the kill must interrupt a multipart upload"
    assert "ckpt/commit_success.txt" not in set(m.keys()), "commit order: the marker comes after the shards"
    m.kill9()

    proxy.set_bandwidth(None)
    m.start()
    # Changes after the restart are drained as well, in order.
    write_file(m.path / "ckpt" / "after_restart", b"x" * 1000)
    m.wait(timeout=120)
    assert_bucket_matches_mount(m)
    keys = m.keys()
    assert set(keys) == {"ckpt/shard0", "ckpt/shard1", "ckpt/commit_success.txt", "ckpt/after_restart"}
    wait_until(lambda: open_uploads(m) == [], 30, "multipart uploads interrupted by the crash to be aborted")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kill_after_copies", [0, 6])
def test_kill9_during_rename_copies_then_remount_converges(proxy, make_mount, kill_after_copies):
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0.1",))
    final_tmp = m.path / "durable"
    (final_tmp / "state").mkdir(parents=True)
    for i in range(30):
        write_file(final_tmp / "state" / f"chunk{i:02d}", os.urandom(1000 + i * 997), fsync=False)
    write_file(final_tmp / "meta", b"{}")
    m.wait(timeout=60)
    old_keys = set(m.keys())
    assert len(old_keys) == 31
    # Slow every request a little, so that the copy/delete pairs are in flight when the daemon dies.
    proxy.set_faults(delay_rate=1.0, delay_s=0.15)
    copies_before = m.status()["copied_files_total"]
    os.rename(final_tmp, m.path / "step_100")
    if kill_after_copies:
        wait_until(lambda: m.status()["copied_files_total"] - copies_before >= kill_after_copies, 30,
                   "some rename copies")
    m.kill9()
    proxy.clear_faults()
    m.start()
    assert not (m.path / "durable").exists() and (m.path / "step_100" / "meta").exists()
    m.wait(timeout=120)
    assert_bucket_matches_mount(m)
    keys = set(m.keys())
    assert keys == {k.replace("durable/", "step_100/", 1) for k in old_keys}
    assert not keys & old_keys, "old keys must be gone after the rename settles"
    assert open_uploads(m) == []


# ---- mount errors -----------------------------------------------------------------------------

def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0, f"expected failure, got 0: {result.stdout} {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected exactly one line on stderr, got: {result.stderr!r}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


def mount_cli(url: str, mountpoint: Path, cache_dir: Path, endpoint: str, *extra: str, timeout: float = 90):
    return ckptfs_cli("mount", url, str(mountpoint), "--cache-dir", str(cache_dir), "--endpoint-url", endpoint,
                      *extra, check=False, timeout=timeout)


@pytest.mark.timeout(240)
def test_mount_errors_are_one_line_never_a_traceback(proxy, make_mount, s3_server, bucket, tmp_path):
    good = make_mount("good", endpoint_url=proxy.endpoint_url)
    write_file(good.path / "precious", b"keep me")
    url = f"s3://{bucket}/other"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    ep = s3_server.endpoint_url

    def no_mount_left():
        assert not os.path.ismount(mnt)
        assert list(mnt.iterdir()) == []

    # missing bucket
    r = mount_cli(f"s3://no-such-bucket-{os.getpid()}/p", mnt, cache, ep)
    assert_one_line_error(r, "no-such-bucket")
    no_mount_left()
    # unreachable endpoint (a closed port)
    t0 = time.monotonic()
    r = mount_cli(url, mnt, cache, f"http://127.0.0.1:{free_port()}")
    assert_one_line_error(r)
    assert time.monotonic() - t0 < 60
    no_mount_left()
    # wrong credentials, as the endpoint answers them: AccessDenied
    proxy.set_down("403")
    r = mount_cli(url, mnt, cache, proxy.endpoint_url)
    proxy.set_down(None)
    assert_one_line_error(r)
    assert "403" in r.stderr or "AccessDenied" in r.stderr or "denied" in r.stderr.lower(), r.stderr
    no_mount_left()
    # malformed s3:// URLs
    for bad in ("http://bucket/p", "s3://", "s3:/bucket", "s3://Bad_Bucket/p", f"{bucket}/p"):
        r = mount_cli(bad, mnt, cache, ep)
        assert_one_line_error(r)
        no_mount_left()
    # mount point missing, not a directory, not empty, already mounted
    r = mount_cli(url, tmp_path / "missing", cache, ep)
    assert_one_line_error(r, "does not exist")
    assert not (tmp_path / "missing").exists()
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    r = mount_cli(url, afile, cache, ep)
    assert_one_line_error(r, "not a directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_bytes(b"x")
    r = mount_cli(url, full, cache, ep)
    assert_one_line_error(r, "not empty")
    assert [p.name for p in full.iterdir()] == ["x"]
    r = mount_cli(url, good.path, cache, ep)
    assert_one_line_error(r, "mount")
    # cache dir not writable: a plain file in its place (tests run as root, so modes would not do)
    cache_file = tmp_path / "cache-file"
    cache_file.write_bytes(b"not a dir")
    r = mount_cli(url, mnt, cache_file, ep)
    assert_one_line_error(r, "cache")
    assert cache_file.read_bytes() == b"not a dir"
    r = mount_cli(url, mnt, cache_file / "sub", ep)
    assert_one_line_error(r, "cache")
    no_mount_left()
    # cache dir already used by a running daemon
    r = mount_cli(url, mnt, good.cache_dir, ep)
    assert_one_line_error(r, "in use")
    no_mount_left()
    # none of this damaged the running mount or its cache
    assert (good.path / "precious").read_bytes() == b"keep me"
    good.wait(timeout=30)
    good.unmount()
    good.start()
    assert (good.path / "precious").read_bytes() == b"keep me"
    # and a correct mount on the same mount point works after all the failures
    ok = mount_cli(url, mnt, cache, ep)
    assert ok.returncode == 0, ok.stderr
    try:
        write_file(mnt / "f", b"hello")
        r = ckptfs_cli("wait", str(mnt), "--timeout", "30", check=False, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        ckptfs_cli("unmount", str(mnt), check=False, timeout=120)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)


# ---- slow endpoint ----------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_slow_endpoint_does_not_slow_writes(proxy, make_mount):
    bandwidth = 20 * 1000 * 1000
    m = make_mount(endpoint_url=proxy.endpoint_url,
                   options=("--drain-delay", "0", "--part-size", "8MiB", "--upload-concurrency", "4"))
    proxy.set_bandwidth(bandwidth)
    first = os.urandom(64 * MiB)
    write_file(m.path / "first", first)
    wait_until(lambda: m.state("first") == "uploading" and proxy.stats["bytes_up"] > MiB, 30,
               "the first file to be uploading")
    # A second 64 MiB file is written and fsynced while the drain pushes the first at 20 MB/s.
    second = os.urandom(64 * MiB)
    t0 = time.monotonic()
    write_file(m.path / "second", second)
    elapsed = time.monotonic() - t0
    upload_time = len(first) / bandwidth
    print(f"wrote and fsynced 64 MiB in {elapsed:.2f}s while the drain ran at 20 MB/s")
    # The earlier file needs ~3.4 s at 20 MB/s: still not durable means the write did not wait for it.
    assert m.state("first") != "durable", (
        f"writing 64 MiB took {elapsed:.1f}s, as long as the drain of the earlier file ({upload_time:.1f}s)")
    assert m.state("second") != "durable"
    proxy.set_bandwidth(None)
    m.wait(timeout=120)
    assert_bucket_matches_mount(m)


# ---- a request that succeeded on the server but whose answer was lost ---------------------------

@pytest.mark.timeout(120)
def test_lost_create_multipart_answer_leaves_no_incomplete_upload(proxy, make_mount):
    """CreateMultipartUpload runs on the server, the answer is lost (reset): the upload the gateway
    never heard of must not stay open in the bucket forever (it is billed storage)."""
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0", "--part-size", "5MiB"))
    hit = proxy.target(is_create_multipart, response_reset)
    data = os.urandom(12 * MiB)
    write_file(m.path / "big", data)
    m.wait(timeout=60)
    assert hit["hits"] == 1
    assert_bucket_matches_mount(m)
    # Settle a while, then also give a restart (crash recovery) the chance to clean up.
    time.sleep(2)
    m.unmount()
    m.start()
    m.wait(timeout=30)
    time.sleep(1)
    leftover = open_uploads(m)
    assert leftover == [], f"incomplete multipart uploads left in the bucket: {[u['Key'] for u in leftover]}"


@pytest.mark.timeout(120)
def test_start_up_aborts_only_the_interrupted_uploads_that_may_be_its_own(make_mount):
    """At start the gateway aborts incomplete uploads begun before it started of keys it may have
    been uploading (a crash lost their ids): a file it has yet to publish. Another writer's upload
    is left alone: of a key known only from the bucket, or one that holds a FIFO here."""
    m = make_mount(options=("--drain-delay", "60"), start=False)
    client = m.s3.boto3_client()
    client.put_object(Bucket=m.bucket, Key=f"{m.prefix}/theirs", Body=b"another writer's")
    m.start()
    assert (m.path / "theirs").read_bytes() == b"another writer's"  # adopted from the bucket
    os.mkfifo(m.path / "fifo")
    write_file(m.path / "mine", b"pending for a minute")
    for name in ("theirs", "fifo", "mine"):
        client.create_multipart_upload(Bucket=m.bucket, Key=f"{m.prefix}/{name}")
    m.unmount("--no-drain")
    m.start()
    wait_until(lambda: all(u["Key"] != f"{m.prefix}/mine" for u in open_uploads(m)), 30, "the abort of mine")
    assert sorted(u["Key"] for u in open_uploads(m)) == [f"{m.prefix}/fifo", f"{m.prefix}/theirs"]
    assert m.state("mine") == "queued"


@pytest.mark.timeout(120)
def test_lost_complete_multipart_answer_does_not_stall_the_drain(proxy, make_mount):
    """CompleteMultipartUpload succeeds on the server and the answer is lost: the object is there and
    correct, so the file must become durable promptly (not after ~40 s of NoSuchUpload retries and a
    full re-upload), and later files in the commit order must not wait that long either."""
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0", "--part-size", "5MiB"))
    hit = proxy.target(is_complete_multipart, response_reset)
    write_file(m.path / "big", os.urandom(12 * MiB))
    write_file(m.path / "marker", b"after big in the commit order")
    t0 = time.monotonic()
    result = ckptfs_cli("wait", str(m.path), "--timeout", "20", check=False, timeout=60)
    elapsed = time.monotonic() - t0
    assert hit["hits"] == 1
    assert result.returncode == 0, f"not durable {elapsed:.0f}s after a lost Complete answer: {result.stderr.strip()}"
    assert_bucket_matches_mount(m)
    assert open_uploads(m) == []


# ---- the mount check and crash recovery against a flaky or slow endpoint ----------------------

@pytest.mark.timeout(120)
def test_one_transient_503_at_mount_does_not_fail_the_mount(proxy, make_mount):
    """Retries on 5xx/SlowDown are promised for the drain; one SlowDown on the bucket check at mount
    should be retried too, not turned into a failed mount."""
    m = make_mount(endpoint_url=proxy.endpoint_url, start=False)
    hit = proxy.target(lambda method, path, query: method == "HEAD", error_503)
    result = mount_cli(m.url, m.path, m.cache_dir, proxy.endpoint_url)
    assert hit["hits"] == 1
    assert result.returncode == 0, f"one 503 failed the mount: {result.stderr.strip()}"
    m.pid = m.status()["pid"]
    write_file(m.path / "f", b"x")
    m.wait(timeout=30)


@pytest.mark.timeout(240)
def test_remount_after_crash_is_not_held_up_by_a_slow_endpoint(proxy, make_mount):
    """After kill -9 during multipart uploads, the restart aborts the interrupted uploads. Those
    requests must not hold up the mount (FUSE is already mounted in the kernel and unanswered until
    the daemon is ready): with slow aborts the remount still returns promptly and then drains."""
    opts = ("--drain-delay", "0", "--part-size", "5MiB", "--upload-concurrency", "4")
    m = make_mount(endpoint_url=proxy.endpoint_url, options=opts)
    proxy.set_bandwidth(8 * MiB)
    for i in range(2):
        write_file(m.path / f"shard{i}", os.urandom(16 * MiB))
    wait_until(lambda: len(open_uploads(m)) == 2, 30, "two multipart uploads in flight")
    m.kill9()
    proxy.set_bandwidth(None)
    hit = proxy.target(is_abort_multipart, lambda: stall(6), count=2)
    t0 = time.monotonic()
    m.start()
    elapsed = time.monotonic() - t0
    t1 = time.monotonic()
    os.listdir(m.path)
    listing = time.monotonic() - t1
    assert elapsed < 6 and listing < 1, (
        f"remount took {elapsed:.1f}s (listing {listing:.1f}s) with {hit['hits']} slow abort(s) of interrupted uploads")
    m.wait(timeout=90)
    assert_bucket_matches_mount(m)
    wait_until(lambda: open_uploads(m) == [], 30, "interrupted uploads to be aborted")


# ---- renames of durable files that trade places --------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["three_renames", "rename_exchange"])
def test_durable_files_that_swap_names_keep_their_own_bytes(proxy, make_mount, how):
    """`a` and `b` are durable; they swap names (a -> tmp, b -> a, tmp -> b; or RENAME_EXCHANGE).
    Each key must end with the bytes of the file now under that name: a server-side copy must not
    read a source key that an earlier publication in the same pass has already overwritten."""
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0.2"))
    (m.path / "ckpt").mkdir()
    a, b = b"A" * 70_000, b"B" * 50_000
    write_file(m.path / "ckpt" / "a", a)
    write_file(m.path / "ckpt" / "b", b)
    m.wait(timeout=30)
    proxy.set_faults(delay_rate=1.0, delay_s=0.1)  # every request a little slow: copies overlap
    if how == "three_renames":
        os.rename(m.path / "ckpt" / "a", m.path / "ckpt" / "swap")
        os.rename(m.path / "ckpt" / "b", m.path / "ckpt" / "a")
        os.rename(m.path / "ckpt" / "swap", m.path / "ckpt" / "b")
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(-100, os.fsencode(m.path / "ckpt" / "a"), -100, os.fsencode(m.path / "ckpt" / "b"), 2)
        assert rc == 0, os.strerror(ctypes.get_errno())
    assert (m.path / "ckpt" / "a").read_bytes() == b and (m.path / "ckpt" / "b").read_bytes() == a
    m.wait(timeout=60)
    proxy.clear_faults()
    client = m.s3.boto3_client()
    in_bucket = {k: client.get_object(Bucket=m.bucket, Key=f"run/ckpt/{k}")["Body"].read()[:1] for k in "ab"}
    assert in_bucket == {"a": b"B", "b": b"A"}, f"bucket holds {in_bucket} after the swap (namespace: a=B, b=A)"
    assert_bucket_matches_mount(m)


@pytest.mark.timeout(120)
def test_bucket_only_files_that_swap_names_keep_their_own_bytes(make_mount, tmp_path):
    """The same swap on a fresh node, where the two files exist only in the bucket (no local data
    to upload again): their content must survive the swap, in the bucket and through the mount."""
    first = make_mount("first")
    (first.path / "ckpt").mkdir()
    a, b = b"A" * 70_000, b"B" * 50_000
    write_file(first.path / "ckpt" / "a", a)
    write_file(first.path / "ckpt" / "b", b)
    first.wait(timeout=30)
    first.unmount()
    m = make_mount("fresh", cache_dir=tmp_path / "fresh-cache")
    assert m.state("ckpt/a") == "durable"
    os.rename(m.path / "ckpt" / "a", m.path / "ckpt" / "swap")
    os.rename(m.path / "ckpt" / "b", m.path / "ckpt" / "a")
    os.rename(m.path / "ckpt" / "swap", m.path / "ckpt" / "b")
    result = ckptfs_cli("wait", str(m.path), "--timeout", "30", check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    client = m.s3.boto3_client()
    in_bucket = {k: client.get_object(Bucket=m.bucket, Key=f"run/ckpt/{k}")["Body"].read() for k in "ab"}
    assert {k: v[:1] for k, v in in_bucket.items()} == {"a": b"B", "b": b"A"}, "the swap lost a file's content"
    assert in_bucket == {"a": b, "b": a}
    assert (m.path / "ckpt" / "a").read_bytes() == b and (m.path / "ckpt" / "b").read_bytes() == a
    assert_bucket_matches_mount(m)


@pytest.mark.timeout(120)
def test_a_permanently_failing_part_does_not_end_the_daemon(proxy, make_mount):
    """A part refused with 403 fails its upload (an error inside the parts' task group): the file
    stays pending with the error in status, the daemon keeps serving, and it drains once fixed."""
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0", "--part-size", "5MiB"))
    proxy.set_faults(error_rate=1.0, error_statuses=(403,), match=lambda method, path, query: "partNumber" in query)
    data = os.urandom(12 * MiB)
    write_file(m.path / "big", data)
    wait_until(lambda: "403" in (m.status().get("last_error") or "") or "AccessDenied" in (m.status().get("last_error") or ""),
               30, "the part's 403 in status")
    assert m.state("big") != "durable"
    write_file(m.path / "still-served", b"yes")  # the daemon is alive and answering
    assert (m.path / "still-served").read_bytes() == b"yes"
    proxy.clear_faults()
    m.wait(timeout=90)
    assert m.s3.boto3_client().get_object(Bucket=m.bucket, Key="run/big")["Body"].read() == data


def is_upload_part(method, path, query) -> bool:
    return method == "PUT" and "partNumber" in query


@pytest.mark.timeout(120)
def test_a_server_that_stops_reading_a_part_for_seconds_does_not_fail_it(proxy, make_mount):
    """A busy server may not read a request body for several seconds (moto completing a 1 GiB
    upload holds its GIL for 5-25 s). The part's send waits up to the read timeout: it is neither
    failed after 5 s, with most of its bytes already sent, nor retried."""
    m = make_mount(endpoint_url=proxy.endpoint_url,
                   options=("--drain-delay", "0", "--part-size", "8MiB", "--upload-concurrency", "2"))
    hit = proxy.target(is_upload_part, lambda: stall(7), count=1)
    data = os.urandom(16 * MiB)  # a part does not fit in the socket buffers: its send blocks
    write_file(m.path / "big", data)
    m.wait(timeout=90)
    status = m.status()
    assert hit["hits"] == 1 and proxy.stats["stalls"] == 1
    assert status["retries_total"] == 0, status.get("last_error")
    assert_bucket_matches_mount(m)
