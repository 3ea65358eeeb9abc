"""pjdfstest's core groups on a real ckptfs mount: the POSIX conformance rate, printed and asserted.

The suite (tests/conformance/) is built once per machine; every .t file is bounded by the runner and
the whole run by PJDFSTEST_TOTAL_TIMEOUT_S, so a hang counts as failures instead of stalling `make test`.
After the run the mount must still drain to a bucket without the suite's (deleted) files.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONFORMANCE = Path(__file__).resolve().parent / "conformance"
PJDFSTEST_DIR = Path(os.environ.get("CKPTFS_PJDFSTEST_DIR", "/var/tmp/pjdfstest"))
CORE_GROUPS = ("open", "rename", "unlink", "mkdir", "rmdir", "truncate", "ftruncate", "symlink", "utimensat")
GOAL = 0.99                    # issue 14: at least 99 % of the core groups' assertions
FILE_TIMEOUT_S = 90              # one .t file; the slowest (rename/09.t, 2,353 assertions) takes about 30 s
PJDFSTEST_TOTAL_TIMEOUT_S = 300  # all core groups: 170-210 s on this machine shared at load 9-15 (docs/PERFORMANCE.md)
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.MULTILINE)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pjdfstest switches uids: run as root (make test)")


def built_pjdfstest() -> Path:
    """Build pjdfstest from the vendored tarball unless it is there (a lock serialises parallel sessions)."""
    PJDFSTEST_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(PJDFSTEST_DIR.parent / ".pjdfstest-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (PJDFSTEST_DIR / "pjdfstest").exists():
            subprocess.run([str(CONFORMANCE / "build_pjdfstest.sh"), str(PJDFSTEST_DIR)], check=True,
                           capture_output=True, timeout=600)
    assert (PJDFSTEST_DIR / "pjdfstest").exists(), "pjdfstest did not build"
    return PJDFSTEST_DIR


def run_pjdfstest(suite: Path, target: Path, log_dir: Path) -> tuple[int, int, str]:
    env = dict(os.environ, PJDFSTEST_LOG_DIR=str(log_dir), PJDFSTEST_FILE_TIMEOUT=str(FILE_TIMEOUT_S),
               PJDFSTEST_TOTAL_TIMEOUT=str(PJDFSTEST_TOTAL_TIMEOUT_S))
    result = subprocess.run([str(CONFORMANCE / "pjdfstest.sh"), str(suite), str(target), *CORE_GROUPS],
                            capture_output=True, text=True, env=env, timeout=PJDFSTEST_TOTAL_TIMEOUT_S + 60,
                            check=False)  # exit 1 when anything failed: the rate decides
    summary = SUMMARY.findall(result.stdout)
    assert summary, f"pjdfstest.sh gave no summary (rc {result.returncode}): {result.stderr[-2000:]}"
    passed, failed = map(int, summary[-1])
    return passed, failed, result.stdout


def failure_causes(log_dir: Path) -> str:
    result = subprocess.run([sys.executable, str(CONFORMANCE / "pjdfstest_failures.py"),
                             str(log_dir / "failures.txt")], capture_output=True, text=True, timeout=60, check=False)
    return result.stdout


def suite_keys(m) -> list[str]:
    """Keys in the bucket under the suite's work directory (pjdfstest.sh removes it at the end)."""
    listed = m.keys()
    return [k for k in listed if k.startswith("pjdfstest-run")]


@pytest.mark.timeout(PJDFSTEST_TOTAL_TIMEOUT_S + 200)
def test_pjdfstest_core_groups(make_mount, tmp_path, capsys):
    suite = built_pjdfstest()
    m = make_mount(options=("--allow-other", "--drain-delay", "0.2"))
    started = time.monotonic()
    passed, failed, table = run_pjdfstest(suite, m.path, tmp_path / "pjdfstest-logs")
    elapsed = time.monotonic() - started
    rate = passed / (passed + failed)
    with capsys.disabled():
        print(f"\npjdfstest core groups on ckptfs: {passed} of {passed + failed} assertions pass "
              f"({100 * rate:.2f} %) in {elapsed:.0f}s")
    assert passed > 6000, f"the core groups have about 6,250 assertions; only {passed} passed:\n{table}"
    assert rate >= GOAL, (f"{100 * rate:.2f} % < {100 * GOAL:.0f} %:\n{table}\n"
                          f"{failure_causes(tmp_path / 'pjdfstest-logs')}")

    # The mount survived the suite, FIFOs/sockets/devices never became pending, and the bucket holds
    # nothing of the suite's work directory (removed at its end).
    m.wait(timeout=120)
    deadline = time.monotonic() + 60
    while suite_keys(m) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert suite_keys(m) == []
    assert m.status()["pending_files"] == 0
    log = (m.cache_dir / "ckptfs.log").read_text()
    assert "Traceback" not in log, log[-4000:]
