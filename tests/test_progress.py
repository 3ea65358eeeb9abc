"""Issue 12: progress of `ckptfs wait` and `ckptfs unmount` on a terminal, silence elsewhere.

A real mount drains through the fault proxy throttled to 1 MiB/s, so each wait lasts seconds. The
real CLI runs on a pseudo-terminal (python's pty) or on pipes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from gateway import progress
from gateway.control import DRAIN_STATUS_FILE
from tests.conftest import ckptfs_cli
from tests.support import FaultProxy
from tests.support.terminal import run_on_pty

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")),
                                 reason="FUSE is not available")]
MiB = 1 << 20


@pytest.fixture
def slow_mount(make_mount, s3_server):
    with FaultProxy(s3_server.endpoint_url, seed=1) as proxy:
        mount = make_mount(prefix="run", endpoint_url=proxy.endpoint_url, options=("--drain-delay", "0.1"))
        proxy.set_bandwidth(1 * MiB)
        yield mount
        proxy.set_bandwidth(None)


def test_wait_is_quiet_off_a_terminal_and_keeps_its_exit_codes(slow_mount):
    (slow_mount.path / "a.bin").write_bytes(os.urandom(3 * MiB))
    late = ckptfs_cli("wait", str(slow_mount.path), "--timeout", "0.5", check=False)
    assert late.returncode == 1 and late.stdout == ""
    assert len(late.stderr.splitlines()) == 1 and late.stderr.startswith("ckptfs wait: timed out; still pending:")
    done = ckptfs_cli("wait", str(slow_mount.path), "--timeout", "120", check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    gone = ckptfs_cli("wait", str(slow_mount.path / "nope"), check=False)
    assert gone.returncode == 2 and "does not exist" in gone.stderr


def test_wait_draws_progress_on_a_terminal(slow_mount):
    (slow_mount.path / "b.bin").write_bytes(os.urandom(3 * MiB))
    rc, drawn = run_on_pty("wait", str(slow_mount.path), "--timeout", "120")
    assert rc == 0, drawn
    assert "wait" in drawn and " left, " in drawn and "ETA " in drawn, drawn
    assert "1 file, 3.0 MiB left" in drawn  # while b.bin is pending
    assert "0 files, 0 B left" in drawn  # the last frame
    assert slow_mount.state("b.bin") == "durable"

    (slow_mount.path / "c.bin").write_bytes(os.urandom(2 * MiB))
    rc, drawn = run_on_pty("wait", str(slow_mount.path), "c.bin", "--timeout", "120")
    assert rc == 0 and "1 path, " in drawn, drawn

    (slow_mount.path / "d.bin").write_bytes(os.urandom(2 * MiB))
    rc, drawn = run_on_pty("wait", str(slow_mount.path), "--quiet", "--timeout", "120")
    assert (rc, drawn) == (0, "")
    rc, drawn = run_on_pty("wait", str(slow_mount.path), "--timeout", "0")  # nothing pending: no error
    assert rc == 0


def test_unmount_draws_the_drain_on_a_terminal(slow_mount, s3_server):
    (slow_mount.path / "big.bin").write_bytes(os.urandom(4 * MiB))
    status_file = slow_mount.cache_dir / DRAIN_STATUS_FILE
    published = []

    def watch():
        try:
            published.append(json.loads(status_file.read_text()))
        except (OSError, ValueError):
            pass

    rc, drawn = run_on_pty("unmount", str(slow_mount.path), on_poll=watch)
    slow_mount.pid = None
    assert rc == 0, drawn
    assert "unmount: draining" in drawn and " left, " in drawn, drawn
    assert published and all(s["pid"] == published[0]["pid"] for s in published)
    assert any(s["dirty_bytes"] > 0 for s in published)  # published while the daemon drained
    assert not status_file.exists()  # removed when the drain is over
    assert slow_mount.keys().get("big.bin") == 4 * MiB


def test_unmount_off_a_terminal_is_quiet(slow_mount):
    (slow_mount.path / "x.bin").write_bytes(os.urandom(1 * MiB))
    result = ckptfs_cli("unmount", str(slow_mount.path), check=False)
    slow_mount.pid = None
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert slow_mount.keys().get("x.bin") == 1 * MiB


def test_eta_and_summary_text():
    assert progress.eta(0, 0) == "0:00:00"
    assert progress.eta(10, 0) == "-:--:--"
    assert progress.eta(3600 * 5 + 61, 1) == "5:01:01"
    assert progress.summary(2, 3 * MiB, MiB) == "2 files, 3.0 MiB left, 1.0 MiB/s, ETA 0:00:03"
    assert progress.summary(1, 0, 0, "path") == "1 path, 0 B left, 0 B/s, ETA 0:00:00"


def test_durable_after_attribute_blocks_until_the_generation_is_in_the_bucket(slow_mount):
    """`ckptfs wait` blocks in the daemon instead of polling: getxattr of
    user.ckptfs.durable_after.G.MS answers once generation G is durable, or after MS ms with the
    generation durable then; a malformed name is ENODATA."""
    (slow_mount.path / "e.bin").write_bytes(os.urandom(2 * MiB))  # ~2 s through the throttle
    target = slow_mount.status()["generation"]
    name = f"user.ckptfs.durable_after.{target}"
    assert int(os.getxattr(slow_mount.path, f"{name}.0")) < target  # answered at once: not yet
    assert int(os.getxattr(slow_mount.path, f"{name}.200")) < target  # after 0.2 s: still not
    durable = target - 1
    for _ in range(30):  # each call blocks up to 1 s in the daemon
        durable = int(os.getxattr(slow_mount.path, f"{name}.1000"))
        if durable >= target:
            break
    assert durable >= target
    assert slow_mount.state("e.bin") == "durable"
    assert slow_mount.status()["durable_through_generation"] >= target
    for bad in (name, f"{name}.x", "user.ckptfs.durable_after."):
        with pytest.raises(OSError) as err:
            os.getxattr(slow_mount.path, bad)
        assert err.value.errno == errno.ENODATA
