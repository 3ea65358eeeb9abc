"""The checkpoint-aware drain on real mounts: newest committed scope first, cancellation of a deleted
pending checkpoint, `wait` covering deletes of old names, multipart copies."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tests.bucket_watch import BucketWatcher
from tests.conftest import ckptfs_cli
from tests.test_drain import write_file
from tests.test_faults import assert_bucket_matches_mount, open_uploads, proxy, wait_until  # noqa: F401

MiB = 1024 * 1024


def first_index(snapshots, predicate) -> int | None:
    return next((i for i, snap in enumerate(snapshots) if predicate(snap)), None)


def test_newest_committed_checkpoint_is_uploaded_first(proxy, make_mount):
    """Orbax-style checkpoints on a slow uplink: 1 is renamed into place and uploads; 2 and 3 are
    renamed while it does. 1 is not preempted, and then the newest (3) becomes complete in the
    bucket before any object of 2 is visible."""
    m = make_mount(endpoint_url=proxy.endpoint_url,
                   options=("--drain-delay", "0.3", "--part-size", "5MiB", "--upload-concurrency", "2"))
    proxy.set_bandwidth(16 * MiB)
    for step in (1, 2, 3):
        tmp = m.path / f"{step}.orbax-checkpoint-tmp-{step}"
        tmp.mkdir()
        for r in range(2):
            write_file(tmp / f"shard{r}", os.urandom(12 * MiB), fsync=False)
    client = m.s3.boto3_client()
    with BucketWatcher(client, m.bucket, "run") as watcher:
        os.rename(m.path / "1.orbax-checkpoint-tmp-1", m.path / "1")
        wait_until(lambda: m.state("1/shard0") == "uploading" or m.state("1/shard1") == "uploading", 30,
                   "checkpoint 1 to start uploading")
        os.rename(m.path / "2.orbax-checkpoint-tmp-2", m.path / "2")
        os.rename(m.path / "3.orbax-checkpoint-tmp-3", m.path / "3")
        m.wait(timeout=120)
    first, newest = {"1/shard0", "1/shard1"}, {"3/shard0", "3/shard1"}
    first_done = first_index(watcher.snapshots, lambda s: first <= s)
    newest_seen = first_index(watcher.snapshots, lambda s: any(k.startswith("3/") for k in s))
    newest_done = first_index(watcher.snapshots, lambda s: newest <= s)
    older_seen = first_index(watcher.snapshots, lambda s: any(k.startswith("2/") for k in s))
    assert None not in (first_done, newest_seen, newest_done, older_seen)
    assert first_done <= newest_seen, "the checkpoint uploading when newer ones were committed must not be preempted"
    assert newest_done <= older_seen, "the newest committed checkpoint must be complete before the older one shows"
    assert not watcher.keys_matching("*orbax-checkpoint-tmp*")
    assert_bucket_matches_mount(m)


def test_a_held_file_in_a_checkpoint_does_not_stall_the_checkpoints_after_it(make_mount):
    """A checkpoint renamed into place, then a file under a temporary name written into it (held
    for the hold limit, an hour): the checkpoints saved after it are uploaded all the same."""
    m = make_mount()
    (m.path / "1.tmp").mkdir()
    write_file(m.path / "1.tmp" / "shard", b"s" * 1000)
    os.rename(m.path / "1.tmp", m.path / "1")
    write_file(m.path / "1" / "extra.tmp", b"held")
    m.wait("1/shard", timeout=30)
    write_file(m.path / "2.tmp", b"the next checkpoint")
    os.rename(m.path / "2.tmp", m.path / "2")
    m.wait("2", timeout=30)
    assert m.keys() == {"1/shard": 1000, "2": len(b"the next checkpoint")}
    assert m.state("1/extra.tmp") == "held"


def test_a_file_that_keeps_failing_does_not_stall_the_checkpoints_after_it(proxy, make_mount):
    """Every PUT of one file of checkpoint 1 is refused (403): its job fails and backs off, and
    meanwhile the checkpoint saved after it is uploaded (the drain does not keep a scope selected
    that cannot move). Once the endpoint takes the file, checkpoint 1 completes too."""
    m = make_mount(endpoint_url=proxy.endpoint_url)
    proxy.set_faults(error_rate=1.0, error_statuses=(403,),
                     match=lambda method, path, query: method == "PUT" and path.endswith("/1/bad"))
    (m.path / "1.tmp").mkdir()
    write_file(m.path / "1.tmp" / "bad", b"refused for now")
    write_file(m.path / "1.tmp" / "good", b"fine")
    os.rename(m.path / "1.tmp", m.path / "1")
    wait_until(lambda: m.status()["errors_total"] >= 2, 30, "retries of 1/bad")
    write_file(m.path / "2.tmp", b"the next checkpoint")
    os.rename(m.path / "2.tmp", m.path / "2")
    m.wait("2", timeout=30)
    assert m.state("1/bad") != "durable"
    proxy.set_faults()
    m.wait(timeout=120)
    assert_bucket_matches_mount(m)


def test_pending_checkpoint_deleted_locally_never_reaches_the_bucket(proxy, make_mount):
    """rmtree of a checkpoint while its multipart upload is in flight: the upload is aborted, no key
    of it is ever visible, and the drain goes on with the next one."""
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0", "--part-size", "5MiB"))
    proxy.set_bandwidth(2 * MiB)
    client = m.s3.boto3_client()
    with BucketWatcher(client, m.bucket, "run") as watcher:
        (m.path / "step_1").mkdir()
        write_file(m.path / "step_1" / "shard", os.urandom(24 * MiB), fsync=False)
        write_file(m.path / "step_1" / "COMMIT", b"{}", fsync=False)
        wait_until(lambda: open_uploads(m) and proxy.stats["bytes_up"] > MiB, 30, "parts of step_1 in flight")
        waits = m.status()["commit_waits"]
        assert [(w["marker"], w["waiting_for_local_files"]) for w in waits] == [("step_1/COMMIT", 1)]
        assert "step_1/COMMIT: 1 local files first" in ckptfs_cli("status", str(m.path)).stdout
        shutil.rmtree(m.path / "step_1")
        wait_until(lambda: not open_uploads(m), 20, "the aborted multipart upload to disappear")
        proxy.set_bandwidth(None)
        (m.path / "step_2").mkdir()
        write_file(m.path / "step_2" / "shard", b"x" * 1000)
        write_file(m.path / "step_2" / "COMMIT", b"{}")
        m.wait(timeout=60)
    # the directory itself was empty (and so had a `step_1/` marker) before the checkpoint was written
    seen = {k for k in watcher.ever_seen() if k.startswith("step_1") and k != "step_1/"}
    assert not seen, f"a cancelled checkpoint was visible: {seen}"
    assert set(m.keys()) == {"step_2/shard", "step_2/COMMIT"}
    assert m.status()["errors_total"] == 0


def test_checkpoint_deleted_marker_first_is_not_taken_for_durable(proxy, make_mount):
    """Retention unlinks COMMIT first, then the rest: while the directory and its data are still
    there, the drain neither logs the checkpoint durable nor resets the newest durable one's age."""
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0", "--part-size", "5MiB"))
    proxy.set_bandwidth(2 * MiB)
    (m.path / "step_1").mkdir()
    write_file(m.path / "step_1" / "shard", os.urandom(24 * MiB), fsync=False)
    write_file(m.path / "step_1" / "COMMIT", b"{}", fsync=False)
    wait_until(lambda: m.status()["commit_waits"], 30, "step_1/COMMIT waiting for its shard")
    age_before = m.status()["newest_durable_checkpoint_age_s"]
    os.unlink(m.path / "step_1" / "COMMIT")
    time.sleep(1.5)  # drain passes with step_1/ and its shard still there
    assert m.status()["newest_durable_checkpoint_age_s"] >= age_before + 1.0
    log_path = Path(m.cache_dir) / "ckptfs.log"
    assert "checkpoint step_1 is durable" not in log_path.read_text()
    shutil.rmtree(m.path / "step_1")
    proxy.set_bandwidth(None)
    m.wait(timeout=60)
    assert "checkpoint step_1 is durable" not in log_path.read_text()
    assert not m.keys(), m.keys()


def test_wait_covers_the_delete_of_an_old_name(proxy, make_mount):
    """`ckptfs wait` returns only once the bucket reflects the namespace, deletes of old names
    included, also right after other checkpoints were written (issue 14's reproduction). DELETEs
    take 0.3 s through the proxy, as on a slow endpoint, so a `wait` that ignores them shows."""
    m = make_mount(endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0"))
    proxy.set_faults(delay_rate=1.0, delay_s=0.3, methods=["DELETE"])
    for trial in range(3):
        for i in range(3):  # other checkpoints just before
            (m.path / f"other{trial}_{i}").mkdir()
            write_file(m.path / f"other{trial}_{i}" / "data", os.urandom(300_000), fsync=False)
        ow, ow2 = m.path / f"ow{trial}", m.path / f"ow{trial}_2"
        ow.mkdir()
        write_file(ow / "x.bin", os.urandom(100_000))
        m.wait()
        write_file(ow / "x.bin", os.urandom(120_000))
        m.wait()
        os.rename(ow, ow2)
        m.wait()
        keys = set(m.keys())
        assert f"ow{trial}/x.bin" not in keys, f"trial {trial}: wait returned while the old name was in the bucket"
        assert f"ow{trial}_2/x.bin" in keys


def test_rename_of_a_large_durable_file_is_a_multipart_copy(make_mount):
    """Above one part, a rename of published content copies with UploadPartCopy (CopyObject stops
    at 5 GiB), and the copy holds the same bytes and metadata."""
    m = make_mount(options=("--drain-delay", "0", "--part-size", "5MiB"))
    data = os.urandom(12 * MiB + 7)
    write_file(m.path / "big", data)
    m.wait()
    os.rename(m.path / "big", m.path / "moved")
    m.wait()
    wait_until(lambda: set(m.keys()) == {"moved"}, 30, "the old name to be deleted")
    obj = m.s3.boto3_client().get_object(Bucket=m.bucket, Key="run/moved")
    assert obj["Body"].read() == data
    assert obj["ETag"].strip('"').endswith("-3"), "three copied parts"
    assert obj["Metadata"]["ckptfs-size"] == str(len(data))
    status = m.status()
    assert status["copied_files_total"] == 1 and status["uploaded_files_total"] == 1
    time.sleep(0.1)
    assert m.state("moved") == "durable"


def test_keep_attribute_pins_a_checkpoint_and_is_the_only_writable_control_attribute(ckptfs_mount):
    m = ckptfs_mount
    (m.path / "step_1").mkdir()
    os.setxattr(m.path / "step_1", "user.ckptfs.keep", b"1")
    assert os.getxattr(m.path / "step_1", "user.ckptfs.keep") == b"1"
    for name in ("user.ckptfs.state", "user.ckptfs.key"):
        try:
            os.setxattr(m.path / "step_1", name, b"x")
        except PermissionError:
            pass
        else:
            raise AssertionError(f"{name} must stay read-only")
    os.removexattr(m.path / "step_1", "user.ckptfs.keep")
    assert "user.ckptfs.keep" not in os.listxattr(m.path / "step_1")
