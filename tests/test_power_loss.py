"""Power loss of the cache disk: every acknowledged fsync survives byte for byte, the drain converges.

The cache dir is on a loop-mounted ext4. A power loss is simulated with the filesystem shutdown
ioctl without flushing its log (xfstests' `godown`: EXT4_IOC_SHUTDOWN, EXT4_GOING_FLAGS_NOLOGFLUSH):
what was not yet written to the device is lost, as the page cache would be. The kernel's page
cache survives a kill -9; this does not, so an fsync that did nothing fails here.

Per trial: a writer (tests/crash_writer.py: write, fsync, rename, fsyncdir, unlink) runs for a
random moment, the disk is shut down, the daemon is killed, ckptfs and the loop device are
unmounted, the loop device is mounted again (ext4 replays its journal) and ckptfs mounted again.
`make test` runs 12 trials; `--slow` runs 200. Needs root (loop devices).
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.crash_writer import expected_state
from tests.test_crash_kill9 import assert_bucket_equals_namespace, check_trial, start_writer

TRIALS_CI = 12
TRIALS_SLOW = 200
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def power_loss(path: Path) -> None:
    """Shut the filesystem holding `path` down as a power cut would: its unwritten log is lost."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


class LoopDisk:
    """A 512 MiB sparse ext4 image, loop-mounted at `path`."""

    def __init__(self, image: Path, path: Path):
        self.image = image
        self.path = path

    def create(self) -> "LoopDisk":
        subprocess.run(["truncate", "-s", "512M", str(self.image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True)
        self.path.mkdir()
        return self.mount()

    def mount(self) -> "LoopDisk":
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.path)], check=True)
        return self

    def unmount(self) -> None:
        for _ in range(50):
            if subprocess.run(["umount", str(self.path)], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)  # the killed daemon's descriptors are still being closed
        subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def loop_disk(tmp_path):
    """Requested before make_mount, so the ckptfs mount is gone before the disk is unmounted."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 for a loop-mounted ext4")
    disk = LoopDisk(tmp_path / "cache.img", tmp_path / "disk").create()
    yield disk
    if os.path.ismount(disk.path):
        disk.unmount()


def check_power_loss_trial(root: Path, log: Path) -> int:
    """check_trial, and a trial directory may be gone only if nothing in it was ever fsynced (the
    test makes it without fsyncing its parent; the writer's first fsync commits it)."""
    if not root.exists():
        must, _ = expected_state(str(log))
        assert not must, f"{root.name} is gone although files in it were fsynced"
        return 0
    return check_trial(root, log)


def run_power_loss_trials(loop_disk: LoopDisk, make_mount, tmp_path: Path, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    mount = make_mount(cache_dir=loop_disk.path / "cache", options=("--drain-delay", "0", "--part-size", "5MiB"))
    checked = []
    for trial in range(trials):
        root = mount.path / f"trial{trial:03d}"
        log = tmp_path / f"trial{trial:03d}.log"  # outside the disk that loses power
        writer = start_writer(root, log, seed + trial, rng.choice([16 << 10, 256 << 10, 3 << 20]))
        time.sleep(rng.uniform(0.2, 1.2))
        power_loss(loop_disk.path)
        writer.wait(timeout=30)  # its next request fails: the daemon's disk is gone
        mount.kill9()
        loop_disk.unmount()
        loop_disk.mount()
        mount.start()
        checked.append((root, log))
        check_power_loss_trial(root, log)
    total = sum(check_power_loss_trial(root, log) for root, log in checked)  # later power losses lost nothing earlier
    assert total > 0, "the writer never got an fsync acknowledged: the test checked nothing"
    mount.wait(timeout=240)
    assert_bucket_equals_namespace(mount)


def test_power_loss_loses_no_fsynced_data(loop_disk, make_mount, tmp_path):
    run_power_loss_trials(loop_disk, make_mount, tmp_path, TRIALS_CI, seed=20261201)


@pytest.mark.slow
@pytest.mark.timeout(3000)  # 200 trials take ~25-35 min on 2 loaded cores; the default 300 s stopped them
def test_power_loss_loses_no_fsynced_data_long(loop_disk, make_mount, tmp_path):
    run_power_loss_trials(loop_disk, make_mount, tmp_path, TRIALS_SLOW, seed=11)
