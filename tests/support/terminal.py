"""Run the real ckptfs command line on a pseudo-terminal (python's pty), as a user's shell would."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_on_pty(*args: str, timeout: float = 120, on_poll=None) -> tuple[int, str]:
    """Run the real CLI with stdin/stdout/stderr on a pseudo-terminal; (exit code, what it drew)."""
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="160", LINES="40")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, stdin=slave,
                            stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if on_poll is not None:
                on_poll()
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return rc, out.decode(errors="replace")
