"""Test-only crash points: die at a named place, exactly as `kill -9` would.

With CKPTFS_TEST_CRASH_AT=<name> in the daemon's environment, `crash_point(<name>)` ends the process
at once (`os._exit(137)`: no clean-up, no journal close), so a test can hit the window between two
steps deterministically (tests/test_crash_windows.py). Nothing sets it outside tests; unset, a crash
point costs one comparison.
"""

from __future__ import annotations

import os

_CRASH_AT = os.environ.get("CKPTFS_TEST_CRASH_AT", "")


def crash_point(name: str) -> None:
    if name == _CRASH_AT:
        os._exit(137)
