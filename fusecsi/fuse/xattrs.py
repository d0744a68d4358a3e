"""Extended attribute rules of the mount.

- `user.fusecsi.quota` is virtual and read-only: the nearest directory quota as JSON, for
  NodeGetVolumeStats. It exists on directories only (ENODATA when no quota applies).
- Names under `trusted.fusecsi.` are fusecsi's own tags (for example "created by fusecsi
  for volume X"): applications can neither see nor touch them.
"""

from __future__ import annotations

import errno
import json

from pyfuse3 import FUSEError

QUOTA = b"user.fusecsi.quota"
RESERVED_PREFIX = b"trusted.fusecsi."
ENOATTR = errno.ENODATA
# The kernel reads this before every write (to drop file capabilities). File capabilities
# are not supported, so it is answered at once and cannot be set.
CAPABILITY = b"security.capability"


def check_writable(name: bytes) -> None:
    """Refuse set/remove of names the application may not change."""
    if name == QUOTA or name.startswith(RESERVED_PREFIX):
        raise FUSEError(errno.EPERM)
    if name == CAPABILITY:
        raise FUSEError(errno.ENOTSUP)


def check_readable(name: bytes) -> None:
    if name.startswith(RESERVED_PREFIX):
        raise FUSEError(errno.EPERM)


def visible(names) -> list[bytes]:
    return [n for n in names if not n.startswith(RESERVED_PREFIX) and n != QUOTA]


def quota_json(quota) -> bytes:
    return json.dumps(
        {
            "max_bytes": quota.max_bytes,
            "max_inodes": quota.max_inodes,
            "used_bytes": quota.used_bytes,
            "used_inodes": quota.used_inodes,
        },
        separators=(",", ":"),
    ).encode()
