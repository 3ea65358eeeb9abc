"""The drain against a real S3 endpoint: layout, temp names, commit order, deletes and renames."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import xxhash

from tests.bucket_watch import BucketWatcher
from tests.support.latencyproxy import LatencyProxy
from tests.test_crash_kill9 import assert_bucket_equals_namespace


def write_file(path, data: bytes, fsync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def save_like_torch(directory, name: str, data: bytes) -> None:
    """torch.save to a temp name, fsync, rename into place (what the shim and many scripts do)."""
    write_file(directory / f"{name}.tmp", data)
    os.rename(directory / f"{name}.tmp", directory / name)


def test_bucket_equals_namespace_with_digests(ckptfs_mount):
    m = ckptfs_mount
    (m.path / "a" / "b").mkdir(parents=True)
    (m.path / "empty").mkdir()
    write_file(m.path / "a" / "small", b"small")
    big = os.urandom(23 * 1024 * 1024 + 5)  # multipart with the default 16 MiB parts
    write_file(m.path / "a" / "b" / "big", big)
    os.symlink("b/big", m.path / "a" / "link")
    m.wait()
    keys = m.keys()
    assert keys == {"a/small": 5, "a/b/big": len(big), "a/link": len("b/big"), "empty/": 0}
    client = m.s3.boto3_client()
    obj = client.get_object(Bucket=m.bucket, Key="run/a/b/big")
    body = obj["Body"].read()
    assert body == big
    assert obj["Metadata"]["ckptfs-xxh3"] == xxhash.xxh3_128_hexdigest(big)
    assert obj["Metadata"]["ckptfs-size"] == str(len(big))
    assert os.getxattr(m.path / "a" / "b" / "big", "user.ckptfs.digest").decode() == xxhash.xxh3_128_hexdigest(big)
    assert os.getxattr(m.path / "a" / "b" / "big", "user.ckptfs.key") == b"run/a/b/big"


def test_single_put_files_are_read_into_part_buffers_from_one_mib(ckptfs_mount):
    """Files up to a part's size go in one PUT: from 1 MiB on the body is read into a reused part
    buffer (no fresh allocation per file), below that into its own bytes; both arrive intact."""
    m = ckptfs_mount
    bodies = {f"pooled/{i}": os.urandom((1 << 20) + 4096 * i) for i in range(4)}
    bodies["small"] = os.urandom((1 << 20) - 1)
    for name, body in bodies.items():
        (m.path / name).parent.mkdir(exist_ok=True)
        write_file(m.path / name, body)
    m.wait()
    client = m.s3.boto3_client()
    for name, body in bodies.items():
        obj = client.get_object(Bucket=m.bucket, Key=f"run/{name}")
        assert obj["Body"].read() == body
        assert obj["Metadata"]["ckptfs-xxh3"] == xxhash.xxh3_128_hexdigest(body)
        assert "-" not in obj["ETag"]  # one PUT, not a multipart upload
    assert 1 <= m.status()["part_buffers_allocated_total"] <= 4


def test_state_xattr_follows_the_file(ckptfs_mount):
    m = ckptfs_mount
    f = open(m.path / "f", "wb")
    f.write(b"x" * 1000)
    f.flush()
    assert m.state("f") == "dirty"
    assert m.state(".") == "pending"
    f.close()
    m.wait("f")
    assert m.state("f") == "durable"
    assert m.state(".") == "durable"
    with open(m.path / "f", "ab") as g:
        g.write(b"more")
    assert m.state("f") in ("dirty", "queued", "uploading")
    m.wait("f")
    assert m.keys()["f"] == 1004


def test_overwrite_uploads_new_content(ckptfs_mount):
    m = ckptfs_mount
    write_file(m.path / "f", b"one")
    m.wait()
    write_file(m.path / "f", b"two-two")
    m.wait()
    body = m.s3.boto3_client().get_object(Bucket=m.bucket, Key="run/f")["Body"].read()
    assert body == b"two-two"


def test_unlink_and_rmtree_delete_objects(ckptfs_mount):
    m = ckptfs_mount
    (m.path / "step_1" / "sub").mkdir(parents=True)
    for i in range(5):
        write_file(m.path / "step_1" / "sub" / f"s{i}", os.urandom(100_000))
    write_file(m.path / "keep", b"k")
    m.wait()
    assert len(m.keys()) == 6
    shutil.rmtree(m.path / "step_1")
    m.wait()
    deadline = time.monotonic() + 30
    while m.keys() != {"keep": 1} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m.keys() == {"keep": 1}


def test_a_delete_leaves_an_object_another_writer_put_at_the_key_since(ckptfs_mount):
    """The drain deletes a removed file's object only while it still holds this gateway's upload
    (If-Match on its ETag): what another writer put there since stays."""
    m = ckptfs_mount
    (m.path / "d").mkdir()
    for name in ("mine", "theirs"):
        write_file(m.path / "d" / name, name.encode() * 1000)
    m.wait()
    client = m.s3.boto3_client()
    client.put_object(Bucket=m.bucket, Key=f"{m.prefix}/d/theirs", Body=b"another writer's")
    os.unlink(m.path / "d" / "mine")
    os.unlink(m.path / "d" / "theirs")
    m.wait()
    deadline = time.monotonic() + 30
    while "d/mine" in m.keys() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "d/mine" not in m.keys() and m.keys()["d/theirs"] == len(b"another writer's")
    body = client.get_object(Bucket=m.bucket, Key=f"{m.prefix}/d/theirs")["Body"].read()
    assert body == b"another writer's"
    assert "d/theirs was rewritten since this gateway published it" in (m.cache_dir / "ckptfs.log").read_text()
    assert m.status()["stale_objects"] == 0


@pytest.fixture
def slow_answers(s3_server):
    """A latency proxy (0.25 s each way) in front of moto, requested before make_mount so that it
    outlives the mounts at teardown."""
    with LatencyProxy(s3_server.endpoint_url, 0.25) as proxy:
        yield proxy


def test_an_upload_the_server_stored_before_its_unlink_leaves_no_object(slow_answers, make_mount):
    """The unlink cancels a PUT the server has stored but not yet answered: the delete that follows
    is not made conditional on the ETag of the upload before, so it does not take the object it
    left for another writer's and keep it."""
    m = make_mount(options=("--drain-delay", "0"), endpoint_url=slow_answers.endpoint_url)
    client = m.s3.boto3_client()  # straight to moto, past the proxy
    write_file(m.path / "f", b"first")
    m.wait()
    write_file(m.path / "f", b"second, in flight")
    deadline = time.monotonic() + 30
    while client.get_object(Bucket=m.bucket, Key=f"{m.prefix}/f")["Body"].read() != b"second, in flight":
        assert time.monotonic() < deadline, "the second upload never reached the server"
        time.sleep(0.01)
    os.unlink(m.path / "f")  # its answer is still 0.25 s away
    m.wait()
    deadline = time.monotonic() + 30
    while m.keys() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m.keys() == {}
    assert m.status()["stale_objects"] == 0


def test_rmtree_while_uploading_leaves_nothing(make_mount):
    m = make_mount(options=("--drain-delay", "0", "--part-size", "5MiB"))
    (m.path / "ckpt").mkdir()
    for i in range(4):
        write_file(m.path / "ckpt" / f"shard{i}", os.urandom(12 * 1024 * 1024), fsync=False)
    time.sleep(0.3)  # uploads are in flight now
    shutil.rmtree(m.path / "ckpt")
    write_file(m.path / "after", b"a")
    m.wait()
    deadline = time.monotonic() + 60
    while m.keys() != {"after": 1} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert m.keys() == {"after": 1}
    uploads = m.s3.boto3_client().list_multipart_uploads(Bucket=m.bucket).get("Uploads", [])
    assert uploads == []


def test_rename_of_durable_file_and_directory(ckptfs_mount):
    m = ckptfs_mount
    (m.path / "d").mkdir()
    data = os.urandom(300_000)
    write_file(m.path / "d" / "x", data)
    write_file(m.path / "f", b"file")
    m.wait()
    assert m.status()["uploaded_files_total"] == 2
    os.rename(m.path / "f", m.path / "g")
    os.rename(m.path / "d", m.path / "e")
    m.wait()
    deadline = time.monotonic() + 30
    while set(m.keys()) != {"g", "e/x"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m.keys() == {"g": 4, "e/x": 300_000}
    status = m.status()
    assert status["copied_files_total"] == 2, "a rename of durable data is a server-side copy, not a re-upload"
    assert status["uploaded_files_total"] == 2
    assert m.s3.boto3_client().get_object(Bucket=m.bucket, Key="run/e/x")["Body"].read() == data


def test_temp_names_never_reach_the_bucket_and_markers_come_last(ckptfs_mount):
    """torch, DCP, Orbax and TensorStore shaped saves while a watcher lists the bucket."""
    m = ckptfs_mount
    client = m.s3.boto3_client()
    with BucketWatcher(client, m.bucket, "run") as watcher:
        for step in range(3):
            # torch.save style: tmp + rename
            save_like_torch(m.path, f"model_{step}.pt", os.urandom(2_000_000))
            # DCP style: shards, then .metadata.tmp renamed to .metadata
            d = m.path / f"dcp_{step}"
            d.mkdir()
            for r in range(3):
                write_file(d / f"__{r}_0.distcp", os.urandom(1_500_000 + r))
            save_like_torch(d, ".metadata", b"metadata")
            # Orbax style: everything in a tmp dir, renamed into place, then the commit marker
            tmp = m.path / f"{step}.orbax-checkpoint-tmp-{step}"
            (tmp / "state").mkdir(parents=True)
            write_file(tmp / "state" / "array.__lock", b"")
            for r in range(3):
                write_file(tmp / "state" / f"chunk{r}", os.urandom(1_000_000))
            os.unlink(tmp / "state" / "array.__lock")
            write_file(tmp / "_CHECKPOINT_METADATA", b"{}")
            os.rename(tmp, m.path / f"{step}")
            write_file(m.path / f"{step}" / "commit_success.txt", b"ok")
        m.wait()
        time.sleep(0.3)
    seen = watcher.ever_seen()
    assert len(watcher.snapshots) > 20, "the watcher must have listed many times during the saves"
    assert not watcher.keys_matching("*.tmp", "*orbax-checkpoint-tmp*", "*.__lock"), "a temporary name was visible"
    for step in range(3):
        assert f"model_{step}.pt" in seen
        dcp_data = {f"dcp_{step}/__{r}_0.distcp" for r in range(3)}
        assert not watcher.marker_violations(f"dcp_{step}/.metadata", dcp_data)
        orbax_data = {f"{step}/state/chunk{r}" for r in range(3)} | {f"{step}/_CHECKPOINT_METADATA"}
        assert not watcher.marker_violations(f"{step}/commit_success.txt", orbax_data)
        # and the marker became visible at all
        assert any(f"{step}/commit_success.txt" in s for s in watcher.snapshots)
    assert_bucket_equals_namespace(m)


def test_marker_waits_for_its_scope_and_nothing_else_waits(make_mount):
    """A commit marker closed after large shards is never visible before them; a file outside any
    scope is not held back by an unrelated large upload (no global order)."""
    m = make_mount(options=("--drain-delay", "0", "--part-size", "5MiB"))
    client = m.s3.boto3_client()
    with BucketWatcher(client, m.bucket, "run") as watcher:
        for i in range(3):
            (m.path / f"ckpt{i}").mkdir()
            write_file(m.path / f"ckpt{i}" / "shard", os.urandom(20 * 1024 * 1024), fsync=False)
            write_file(m.path / f"ckpt{i}" / "commit_success.txt", b"done", fsync=False)
            write_file(m.path / f"note{i}", b"small", fsync=False)
        m.wait()
        time.sleep(0.2)
    for i in range(3):
        assert not watcher.marker_violations(f"ckpt{i}/commit_success.txt", {f"ckpt{i}/shard"})
        assert any(f"ckpt{i}/commit_success.txt" in s for s in watcher.snapshots)
    assert any("note0" in s and "ckpt2/shard" not in s for s in watcher.snapshots), \
        "a small file outside any scope must not wait for earlier large uploads"


def test_held_file_is_uploaded_after_hold_limit(make_mount):
    m = make_mount(options=("--drain-delay", "0", "--hold-limit", "1"))
    write_file(m.path / "orphan.tmp", b"never renamed")
    assert m.state("orphan.tmp") == "held"
    m.wait("orphan.tmp", timeout=30)
    assert m.keys() == {"orphan.tmp": 13}


def test_rename_into_place_does_not_restart_the_drain_delay(make_mount):
    """The delay counts from the last change of content: a file quiet for longer than the delay
    under its temporary name is uploaded as soon as it is renamed into place."""
    m = make_mount(options=("--drain-delay", "3"))
    write_file(m.path / "model.pt.tmp", b"weights")
    time.sleep(3.2)
    assert m.state("model.pt.tmp") == "held"
    os.rename(m.path / "model.pt.tmp", m.path / "model.pt")
    renamed = time.monotonic()
    while m.state("model.pt") != "durable" and time.monotonic() - renamed < 1.8:
        time.sleep(0.05)
    assert m.state("model.pt") == "durable", "the rename restarted the 3 s drain delay"
    assert m.keys() == {"model.pt": len(b"weights")}


def test_rename_to_a_temporary_name_is_held_anew(make_mount):
    """A file renamed *to* a temporary name is held for the hold limit from the rename, however long
    ago its content changed."""
    m = make_mount(options=("--drain-delay", "0", "--hold-limit", "2"))
    write_file(m.path / "model.pt", b"weights")
    m.wait("model.pt")
    time.sleep(2.2)  # the content is older than the hold limit now
    os.rename(m.path / "model.pt", m.path / "model.pt.tmp")
    time.sleep(0.5)
    assert m.state("model.pt.tmp") == "held"
    assert "model.pt.tmp" not in m.keys()
    m.wait("model.pt.tmp", timeout=30)  # then the hold limit ends, as for any held file
    assert m.keys() == {"model.pt.tmp": len(b"weights")}


def test_a_burst_of_creates_costs_passes_per_drain_delay_not_per_file(make_mount):
    """Each scheduler pass reads every pending row: a pass per created file made a burst of small
    files quadratic (issue 13). A change now only brings the next pass forward to its drain delay."""
    m = make_mount(options=("--drain-delay", "3"))
    before = m.status()["scheduler_passes_total"]
    t0 = time.monotonic()
    for i in range(100):
        write_file(m.path / f"f{i:03d}", b"x", fsync=False)
    elapsed = time.monotonic() - t0
    status = m.status()
    passes = status["scheduler_passes_total"] - before
    if elapsed < 2.5:  # a pass comes at the latest every 0.5 s (TICK_S), and none is due before 3 s
        assert passes <= 2 + elapsed / 0.5, f"{passes} passes for 100 creates in {elapsed:.2f}s"
        assert status["uploaded_files_total"] == 0, "nothing is uploaded inside its drain delay"
    m.wait(timeout=60)  # the files become startable 3 s after their close: the drain passes then
    assert len(m.keys()) == 100


def test_wait_without_paths_ignores_held_files(ckptfs_mount):
    m = ckptfs_mount
    write_file(m.path / "lock.__lock", b"")
    write_file(m.path / "real", b"data")
    m.wait(timeout=30)
    assert m.keys() == {"real": 4}
    assert m.status()["held_files"] == 1


def test_unmount_drains_pending_then_remount_shows_files(make_mount):
    m = make_mount(options=("--drain-delay", "5"))
    write_file(m.path / "late", os.urandom(1000))
    assert m.keys() == {}
    m.unmount()
    assert m.keys() == {"late": 1000}, "unmount waits for the drain (up to --drain-timeout)"
    m.start()
    assert (m.path / "late").stat().st_size == 1000


def test_unmount_no_drain_keeps_work_journaled(make_mount):
    m = make_mount(options=("--drain-delay", "30"))
    write_file(m.path / "late", b"x" * 10)
    m.unmount("--no-drain")
    assert m.keys() == {}
    m.start("--drain-delay", "0")
    m.wait(timeout=30)
    assert m.keys() == {"late": 10}


def test_verify_command_detects_a_changed_object(ckptfs_mount):
    from tests.conftest import ckptfs_cli

    m = ckptfs_mount
    write_file(m.path / "a", os.urandom(100_000))
    write_file(m.path / "b", os.urandom(6_000_000))
    m.wait()
    ok = ckptfs_cli("verify", str(m.path))
    assert "verified 2 objects: 0 problems" in ok.stdout
    m.s3.boto3_client().put_object(Bucket=m.bucket, Key="run/b", Body=b"tampered")
    bad = ckptfs_cli("verify", str(m.path), "b", check=False)
    assert bad.returncode == 1 and "digest mismatch" in bad.stdout


def test_recorded_digest_matches_content_for_every_write_pattern(ckptfs_mount):
    """The digest is taken while a file is written front to back, else by re-reading it: either
    way the object's ckptfs-xxh3 must be the digest of its bytes."""
    m = ckptfs_mount
    block = os.urandom(300_000)
    write_file(m.path / "sequential", block * 4)
    m.wait()
    assert m.status()["digest_passes_total"] == 0, "a file written front to back is hashed on the way"
    with open(m.path / "backwards", "wb") as f:       # written out of order
        f.seek(len(block))
        f.write(block)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        f.write(block[::-1])
    write_file(m.path / "appended", block)
    with open(m.path / "appended", "ab") as f:        # reopened: the earlier bytes were not hashed
        f.write(block)
    with open(m.path / "truncated", "wb") as f:       # truncated to zero, then written again
        f.write(block)
        f.flush()
        f.truncate(0)
        f.seek(0)
        f.write(block[:1000])
    with open(m.path / "overwritten", "wb") as f:     # an earlier range rewritten
        f.write(block)
        f.flush()
        os.fsync(f.fileno())  # the first write reaches the daemon before the overwrite
        f.seek(10)
        f.write(b"xyz")
    m.wait()
    assert m.status()["digest_passes_total"] >= 3  # backwards, appended, overwritten were re-read
    client = m.s3.boto3_client()
    for name in ("sequential", "backwards", "appended", "truncated", "overwritten"):
        local = (m.path / name).read_bytes()
        obj = client.get_object(Bucket=m.bucket, Key=f"run/{name}")
        assert obj["Body"].read() == local, name
        assert obj["Metadata"]["ckptfs-xxh3"] == xxhash.xxh3_128_hexdigest(local), name


def test_durable_names_renamed_to_temporary_names_leave_the_bucket(ckptfs_mount):
    """Found by the model test: a durable directory (and file) renamed to a held name must not
    stay in the bucket under its old name; renamed back, it is published again."""
    m = ckptfs_mount
    (m.path / "a").mkdir()
    write_file(m.path / "f", b"content")
    m.wait()
    assert m.keys() == {"a/": 0, "f": 7}
    os.rename(m.path / "a", m.path / "d")
    os.rename(m.path / "d", m.path / "c.tmp")
    os.rename(m.path / "f", m.path / "f.tmp")
    m.wait()
    deadline = time.monotonic() + 30
    while m.keys() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m.keys() == {}
    os.rename(m.path / "f.tmp", m.path / "g")
    m.wait()
    assert m.keys() == {"g": 7}
