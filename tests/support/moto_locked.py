"""Subprocess entry point: moto's S3 server with a race fix applied.

Run as ``python tests/support/moto_locked.py --host 127.0.0.1 --port N``
(or ``python -m tests.support.moto_locked ...``); arguments are those of
``moto.server.main``.

Why the patch: in moto 5.2.x ``FakeKey.etag`` is a lazy property that, on
first access, seeks the key's shared ``_value_buffer`` to 0 and md5s it in
16 MiB blocks -- without taking ``FakeKey.lock``.  The ``value`` getter does
take the lock, but it and every other lazy ``etag`` access share the same file
position.  So a ListObjects/HEAD/GET racing the PUT response (which also reads
``etag``) on an object over 16 MiB can interleave seeks/reads and cache a
wrong ETag forever.  We run the original getter under ``self.lock``.

Deadlock check (moto 5.2.5): ``FakeKey.lock`` is a plain, non-reentrant
``threading.Lock``; the original ``etag`` getter neither takes the lock nor
calls ``self.value`` (it reads ``_value_buffer`` directly); the ``value``
setter takes no lock; nothing in moto calls ``etag`` while holding
``key.lock``.  So wrapping the getter cannot self-deadlock.
"""

from __future__ import annotations

import sys


def patch_fakekey_etag() -> None:
    """Make ``moto.s3.models.FakeKey.etag`` compute under ``FakeKey.lock``."""
    from moto.s3 import models

    prop = models.FakeKey.__dict__["etag"]
    if getattr(prop.fget, "_ckptfs_locked", False):
        return
    original = prop.fget

    def etag(self: models.FakeKey) -> str:
        with self.lock:
            return original(self)

    etag._ckptfs_locked = True  # type: ignore[attr-defined]
    models.FakeKey.etag = property(etag, prop.fset, prop.fdel, prop.__doc__)


def main(argv: list[str] | None = None) -> None:
    """Patch moto, then run its threaded werkzeug server (blocks)."""
    patch_fakekey_etag()
    from moto.server import main as moto_main

    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
