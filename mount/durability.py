"""What the gateway says about a path: the `user.ckptfs.*` xattrs.

The gateway publishes each file's and directory's drain state as the xattr
`user.ckptfs.state` (issue 6, "Contract with the gateway"): b"dirty", b"queued",
b"uploading" or b"durable" on a file; b"durable" or b"pending" on a directory,
durable only when everything below it is in the bucket. A plain local directory
has no such xattr; there a locally committed file is as durable as it gets, so
the probe answers True.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

STATE_XATTR = "user.ckptfs.state"
STATUS_XATTR = "user.ckptfs.status"
KEEP_XATTR = "user.ckptfs.keep"  # written by the checkpointer: the gateway uploads this one even if newer ones exist

#: A durability probe: True when the path and everything below it is durable.
DurabilityProbe = Callable[[str], bool]

# The errnos meaning "this filesystem has no ckptfs xattrs" rather than "broken".
_NO_XATTR = {errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP}


def read_state(path: str | os.PathLike) -> str | None:
    """Return the gateway state of `path` ("durable", "pending", ...).

    Returns None when the filesystem does not publish the xattr (no gateway).
    Raises FileNotFoundError when the path is missing, and any other OSError
    (EIO from a gateway in failsafe, ENOTCONN from a dead mount) as is.
    """
    try:
        return os.getxattr(path, STATE_XATTR).decode("ascii", "replace")
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return None
        raise


def is_durable(path: str | os.PathLike) -> bool:
    """True when `path` exists and is durable in the bucket (or there is no gateway)."""
    try:
        state = read_state(path)
    except FileNotFoundError:
        return False
    return state is None or state == "durable"


def mount_root(path: str | os.PathLike) -> str:
    """The mount point that holds `path` (the nearest existing ancestor that is one)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def gateway_status(path: str | os.PathLike) -> dict | None:
    """The gateway's status record for the mount holding `path`, or None without a gateway.

    It is the JSON object the gateway publishes as `user.ckptfs.status` on the
    mount root (keys such as `dirty_bytes` and `drain_rate_bps`); informational only.
    """
    root = mount_root(path)
    try:
        raw = os.getxattr(root, STATUS_XATTR)
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return None
        log.debug("reading %s on %s failed: %s", STATUS_XATTR, root, exc)
        return None
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("unreadable %s on %s: %r", STATUS_XATTR, root, raw[:200])
        return None
