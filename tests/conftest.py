"""Fixtures: a real moto S3 server on 127.0.0.1 and real ckptfs mounts (daemon subprocesses).

Every mount made here is unmounted at teardown, even if its daemon was killed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.cache import data_file_path
from tests.support.s3server import ACCESS_KEY, SECRET_KEY, S3Server

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
_bucket_numbers = itertools.count(1)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the long crash and soak modes")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long mode: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def ckptfs_cli(*args: str, timeout: float = 120, check: bool = True, env: dict | None = None):
    """Run the real `ckptfs` command line in a subprocess."""
    result = subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"ckptfs {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


class Mount:
    """One ckptfs mount of s3://bucket/prefix at `path`, with `cache_dir`, run as a real daemon."""

    def __init__(self, s3: S3Server, bucket: str, prefix: str, path: Path, cache_dir: Path,
                 endpoint_url: str | None = None, options: tuple[str, ...] = ()):
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.path = path
        self.cache_dir = cache_dir
        self.endpoint_url = endpoint_url or s3.endpoint_url
        self.options = options
        self.pid: int | None = None
        path.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def start(self, *extra: str, env: dict | None = None) -> "Mount":
        ckptfs_cli("mount", self.url, str(self.path), "--cache-dir", str(self.cache_dir),
                   "--endpoint-url", self.endpoint_url, *self.options, *extra, env=env)
        self.pid = self.status()["pid"]
        return self

    def status(self) -> dict:
        return json.loads(os.getxattr(self.path, "user.ckptfs.status"))

    def state(self, rel: str) -> str:
        return os.getxattr(self.path / rel, "user.ckptfs.state").decode()

    def wait(self, *paths: str, timeout: float = 120) -> None:
        ckptfs_cli("wait", str(self.path), *paths, "--timeout", str(timeout), timeout=timeout + 30)

    def unmount(self, *extra: str) -> None:
        ckptfs_cli("unmount", str(self.path), *extra, timeout=300)
        self.pid = None

    def kill9(self) -> None:
        """kill -9 the daemon and clear the dead mount, as an operator would."""
        os.kill(self.pid, signal.SIGKILL)
        _wait_gone(self.pid)
        subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
        self.pid = None

    def died(self, timeout: float = 10) -> None:
        """The daemon ended by itself (a test crash point): wait for it and clear the dead mount."""
        _wait_gone(self.pid, timeout)
        subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
        self.pid = None

    def cleanup(self) -> None:
        if os.path.ismount(self.path) or _is_dead_mount(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(self.pid)
            self.pid = None

    def data_file(self, rel: str) -> Path:
        """The cache data file of the file at `rel` in the mount."""
        return data_file_path(self.cache_dir, os.stat(self.path / rel).st_ino)

    def keys(self) -> dict[str, int]:
        """Keys under the prefix (relative) -> size, straight from the bucket."""
        return list_keys(self.s3, self.bucket, self.prefix)


def list_keys(s3: S3Server, bucket: str, prefix: str = "") -> dict[str, int]:
    client = s3.boto3_client()
    full = prefix.strip("/") + "/" if prefix else ""
    keys = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=full):
        for item in page.get("Contents", []):
            keys[item["Key"][len(full):]] = item["Size"]
    return keys


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
        return False
    except OSError as exc:
        return exc.errno == 107  # ENOTCONN


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


@pytest.fixture(scope="session")
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.make_bucket(f"ckptfs-test-{os.getpid()}-{next(_bucket_numbers)}")


TRACEBACK = "Traceback (most recent call last)"


def unexpected_tracebacks(log_text: str, expected: tuple[str, ...]) -> list[str]:
    """Traceback blocks of a daemon log (each from its header to the next log line) that match
    none of the `expected` regular expressions."""
    blocks = []
    for part in log_text.split(TRACEBACK)[1:]:
        lines = part.splitlines()[1:]
        body = [line for line in itertools.takewhile(lambda ln: not re.match(r"\d{4}-\d\d-\d\d ", ln), lines)]
        blocks.append(TRACEBACK + "\n" + "\n".join(body))
    return [b for b in blocks if not any(re.search(pattern, b) for pattern in expected)]


def check_daemon_logs(request, mounts: list["Mount"]) -> None:
    """Fail the test if a daemon it started logged a traceback it did not declare with
    @pytest.mark.expected_tracebacks("regex", ...)."""
    marker = request.node.get_closest_marker("expected_tracebacks")
    expected = tuple(marker.args) if marker else ()
    problems = []
    for mount in mounts:
        log_path = Path(mount.cache_dir) / "ckptfs.log"
        if log_path.exists():
            problems += [f"{log_path}:\n{b}" for b in unexpected_tracebacks(log_path.read_text(errors="replace"),
                                                                          expected)]
    if problems:
        pytest.fail("daemon log has tracebacks nobody expected:\n" + "\n\n".join(problems[:3]), pytrace=False)


@pytest.fixture
def make_mount(request, tmp_path, s3_server, bucket):
    """Factory: make_mount(name='m', prefix='run', options=(...)) -> started Mount.

    At teardown every mount is cleaned up and its daemon log checked for unexpected tracebacks."""
    mounts: list[Mount] = []

    def factory(name: str = "m", prefix: str = "run", *, options: tuple[str, ...] = ("--drain-delay", "0.2"),
                cache_dir: Path | None = None, endpoint_url: str | None = None, bucket_name: str | None = None,
                start: bool = True) -> Mount:
        mount = Mount(s3_server, bucket_name or bucket, prefix, tmp_path / name,
                      cache_dir or tmp_path / f"{name}-cache", endpoint_url, options)
        mounts.append(mount)
        return mount.start() if start else mount

    yield factory
    for mount in mounts:
        mount.cleanup()
    check_daemon_logs(request, mounts)


@pytest.fixture
def ckptfs_mount(make_mount) -> Mount:
    """A started mount of a fresh bucket's `run` prefix (drain delay 0.2 s)."""
    return make_mount()
