"""Directory quotas through the mount: EDQUOT in the application, usage in the xattr."""

from __future__ import annotations

import errno
import json
import os

import pytest

MiB = 1 << 20


async def _set_quota(client, path, max_bytes, max_inodes):
    attr = await client.mkdirs(path)
    return await client.set_quota(attr.ino, max_bytes, max_inodes)


def test_write_past_quota_fails_with_edquot(make_mount, fs_path, on_cluster):
    on_cluster(_set_quota, fs_path + "/vol", 4 * MiB, None)
    mnt = make_mount(fs_path)
    with pytest.raises(OSError) as caught:
        with open(mnt / "vol" / "big", "wb") as f:
            for _ in range(64):
                f.write(b"q" * MiB)
                f.flush()
    assert caught.value.errno == errno.EDQUOT
    # like ext4, the bytes that fit stay; room made, writing works again
    assert (mnt / "vol" / "big").read_bytes() == b"q" * (4 * MiB)
    (mnt / "vol" / "big").unlink()
    (mnt / "vol" / "small").write_bytes(b"s" * 1000)
    assert (mnt / "vol" / "small").read_bytes() == b"s" * 1000


def test_quota_xattr_shows_usage(make_mount, fs_path, on_cluster):
    on_cluster(_set_quota, fs_path + "/vol", 100 * MiB, 1000)
    mnt = make_mount(fs_path)
    (mnt / "vol" / "sub").mkdir()
    (mnt / "vol" / "sub" / "f").write_bytes(b"u" * (3 * MiB))
    for where in (mnt / "vol", mnt / "vol" / "sub"):  # the nearest quota, from below too
        info = json.loads(os.getxattr(where, "user.fusecsi.quota"))
        assert info["max_bytes"] == 100 * MiB and info["max_inodes"] == 1000
        assert info["used_bytes"] >= 3 * MiB and info["used_inodes"] >= 2
    assert "user.fusecsi.quota" in os.listxattr(mnt / "vol")
    with pytest.raises(PermissionError):
        os.setxattr(mnt / "vol", "user.fusecsi.quota", b"{}")
    with pytest.raises(OSError) as caught:
        os.getxattr(mnt.path, "user.fusecsi.quota")  # above the quota: none applies
    assert caught.value.errno == errno.ENODATA
