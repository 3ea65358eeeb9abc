"""A real moto S3 server in a subprocess on 127.0.0.1, for tests."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
_ENTRY = Path(__file__).with_name("moto_locked.py")


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def boto3_s3_client(endpoint_url: str, *, config: Any = None, max_attempts: int | None = None):
    """A plain boto3 S3 client for ``endpoint_url`` (us-east-1, testing/testing, path style).

    ``max_attempts=1`` disables retries; ``config`` (a botocore Config) is merged on top.
    """
    import boto3
    from botocore.config import Config

    base = Config(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=60)
    if max_attempts is not None:
        base = base.merge(Config(retries={"total_max_attempts": max_attempts, "mode": "standard"}))
    if config is not None:
        base = base.merge(config)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=base,
    )


class S3Server:
    """moto S3 server subprocess (``moto_locked.py``) with logs in a temp dir.

    State is in-memory: ``restart()`` and ``kill()`` + ``start()`` come back on the
    same port with an EMPTY store (no buckets, no objects).
    """

    def __init__(self, port: int | None = None, *, startup_timeout: float = 20.0):
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="ckptfs-moto-"))
        self.log_path = self.workdir / "moto.log"
        self._proc: subprocess.Popen | None = None
        self._log: Any = None

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> "S3Server":
        """Spawn the server and wait until it answers HTTP; raises RuntimeError if not."""
        if self.is_running():
            return self
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_DEFAULT_REGION=REGION, TMPDIR=str(self.workdir), MOTO_PORT=str(self.port))
        self._proc = subprocess.Popen(
            [sys.executable, str(_ENTRY), "--host", "127.0.0.1", "--port", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto exited with {self._proc.returncode}:\n{self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"moto did not answer on {self.endpoint_url} within {self.startup_timeout}s:\n"
            f"{self.log_tail()}")

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/")
            return conn.getresponse().status < 500
        except OSError:
            return False
        finally:
            conn.close()

    def is_running(self) -> bool:
        """True while the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL immediately (a crash)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._close_log()

    def restart(self) -> None:
        """Stop and start again on the same port; the store comes back empty."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its temp dir (logs included)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------
    def reset(self) -> None:
        """Wipe all moto state without restarting (POST /moto-api/reset)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/moto-api/reset")
            conn.getresponse().read()
        finally:
            conn.close()

    def log_tail(self, n: int = 4000) -> str:
        """Last ``n`` characters of the server log."""
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def boto3_client(self, endpoint_url: str | None = None, *, config: Any = None,
                     max_attempts: int | None = None):
        """boto3 S3 client for this server, or for ``endpoint_url`` (e.g. a FaultProxy)."""
        return boto3_s3_client(endpoint_url or self.endpoint_url, config=config,
                               max_attempts=max_attempts)

    def make_bucket(self, name: str) -> str:
        """Create ``name`` directly on the server (not via any proxy); return it."""
        self.boto3_client().create_bucket(Bucket=name)
        return name
