"""The log-check fixture's matcher: tracebacks in a daemon log fail a test unless declared."""

from __future__ import annotations

from tests.conftest import unexpected_tracebacks

LOG = """2026-12-01 09:00:00,000 INFO gateway.daemon: mounted
2026-12-01 09:00:01,000 ERROR gateway.fs: write(3, 0) failed unexpectedly
Traceback (most recent call last):
  File "/x/gateway/fs.py", line 40, in wrapper
    return await handler(self, *args)
ValueError: boom
2026-12-01 09:00:02,000 ERROR gateway.drain: drain: unexpected error syncing a
Traceback (most recent call last):
  File "/x/gateway/drain.py", line 1, in _sync_inode
KeyError: 7
2026-12-01 09:00:03,000 INFO gateway.daemon: unmounted
"""


def test_every_traceback_is_reported_with_its_exception():
    found = unexpected_tracebacks(LOG, ())
    assert len(found) == 2
    assert found[0].endswith("ValueError: boom") and found[1].endswith("KeyError: 7")


def test_declared_tracebacks_are_allowed():
    assert [b.splitlines()[-1] for b in unexpected_tracebacks(LOG, (r"ValueError: boom",))] == ["KeyError: 7"]
    assert unexpected_tracebacks(LOG, (r"ValueError", r"KeyError")) == []
    assert unexpected_tracebacks("2026-12-01 09:00:00,000 INFO gateway.daemon: mounted\n", ()) == []
