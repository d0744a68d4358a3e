"""Directory quotas through the mount: EDQUOT in the application, usage in the xattr."""

from __future__ import annotations

import errno
import json
import os
import subprocess

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


def test_df_in_a_volume_shows_its_quota(make_mount, fs_path, on_cluster, tmp_path):
    on_cluster(_set_quota, fs_path + "/vol", 10 * MiB, 100)
    mnt = make_mount(fs_path)
    (mnt / "vol" / "sub").mkdir()
    (mnt / "vol" / "sub" / "f").write_bytes(b"d" * (3 * MiB))
    pod = tmp_path / "pod"  # a pod sees its volume through a bind mount of the directory
    pod.mkdir()
    subprocess.run(["mount", "--bind", str(mnt / "vol"), str(pod)], check=True)
    try:
        for where in (mnt / "vol", mnt / "vol" / "sub", mnt / "vol" / "sub" / "f", pod):
            st = os.statvfs(where)
            assert st.f_blocks * st.f_frsize == 10 * MiB, where
            assert st.f_bavail * st.f_frsize == st.f_bfree * st.f_frsize == 7 * MiB, where
            assert (st.f_files, st.f_ffree) == (100, 98), where  # sub and f
        df = subprocess.run(["df", "-B1", str(pod)], capture_output=True, text=True, check=True)
        assert df.stdout.split("\n")[1].split()[1:4] == [str(n * MiB) for n in (10, 3, 7)]
    finally:
        subprocess.run(["umount", str(pod)], check=False)
    outside = os.statvfs(mnt.path)  # above the quota: the cluster's totals
    assert outside.f_blocks * outside.f_frsize > 10 * MiB and outside.f_files > 100
