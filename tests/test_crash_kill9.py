"""kill -9 of the gateway at random moments: every acknowledged fsync survives, the bucket converges.

CI runs 10 trials; `--slow` runs 100. (The 12 power-loss trials of test_power_loss.py also end in a
kill -9 of the daemon, after the cache disk lost power.)
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.crash_writer import expected_state

TRIALS_CI = 10
TRIALS_SLOW = 100


def start_writer(root: Path, log: Path, seed: int, max_size: int) -> subprocess.Popen:
    root.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "tests.crash_writer", str(root), str(log), str(seed), str(max_size)],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def check_trial(root: Path, log: Path) -> int:
    """Every acknowledged create is there with its exact bytes; every acknowledged unlink is gone."""
    must, uncertain = expected_state(str(log))
    present = {p.name for p in root.iterdir()}
    for name, sha in must.items():
        if name in uncertain:
            continue  # an unlink of it was in flight when the daemon died
        assert name in present, f"{root.name}/{name} was fsynced but is missing after the crash"
        actual = hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert actual == sha, f"{root.name}/{name}: content differs from what was fsynced"
    for name in present - set(must):
        base = name.removesuffix(".tmp")
        assert base in uncertain or name in uncertain, f"{root.name}/{name} exists but was never acknowledged"
    return len(must)


def run_trials(make_mount, tmp_path: Path, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    mount = make_mount(options=("--drain-delay", "0", "--part-size", "5MiB"))
    checked = []
    for trial in range(trials):
        root = mount.path / f"trial{trial:03d}"
        log = tmp_path / f"trial{trial:03d}.log"
        writer = start_writer(root, log, seed + trial, rng.choice([64 << 10, 1 << 20, 12 << 20]))
        time.sleep(rng.uniform(0.2, 1.5))
        mount.kill9()
        writer.wait(timeout=30)
        mount.start()
        checked.append((mount.path / f"trial{trial:03d}", log))
        check_trial(*checked[-1])  # asserts inside; the count is summed below
    total = sum(check_trial(root, log) for root, log in checked)  # earlier crashes lost nothing either
    assert total > 0, "the writer never got an fsync acknowledged: the test checked nothing"
    mount.wait(timeout=240)
    assert_bucket_equals_namespace(mount)


def assert_bucket_equals_namespace(mount) -> None:
    keys = mount.keys()
    local = {}
    for dirpath, dirnames, filenames in os.walk(mount.path):
        rel = os.path.relpath(dirpath, mount.path)
        for name in filenames:
            path = os.path.join(dirpath, name)
            local[os.path.normpath(os.path.join(rel, name))] = os.path.getsize(path)
        if not dirnames and not filenames and rel != ".":
            local[rel + "/"] = 0
    tmp_keys = [k for k in keys if k.endswith(".tmp")]
    assert not tmp_keys, f"temporary names reached the bucket: {tmp_keys[:5]}"
    files_in_bucket = {k: v for k, v in keys.items()}
    assert files_in_bucket == {k: v for k, v in local.items() if not k.endswith(".tmp")}


def test_kill9_loses_no_fsynced_data(make_mount, tmp_path):
    run_trials(make_mount, tmp_path, TRIALS_CI, seed=20261124)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 100 trials outlast the default 300 s
def test_kill9_loses_no_fsynced_data_long(make_mount, tmp_path):
    run_trials(make_mount, tmp_path, TRIALS_SLOW, seed=7)
