"""Run one script as several processes (one per rank) and collect each one's JSON result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_processes(script: str, argvs: list[list[str]], outs: list[Path], timeout: float) -> list[dict]:
    """`python script *argv` for each argv, all at once; every one must exit 0 and write its out file."""
    procs = [subprocess.Popen([sys.executable, script, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for argv in argvs]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{logs[rank][-4000:]}"
    return [json.loads(o.read_text()) for o in outs]
