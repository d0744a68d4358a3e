"""The master's namespace: inodes, entries, attributes, xattrs, quotas and file block maps.

All of it lives in memory. A change is made in two steps: a `plan_*` method validates the
request against the current state and returns a record (a msgpack-able list holding
everything needed to redo the change, inode numbers and timestamps included); `apply(record)`
makes the change and never fails for a planned record. The journal stores the records, so
replaying them rebuilds exactly the same state.

Every directory carries the usage of its whole subtree (bytes of file sizes, number of
entries), kept up to date along the ancestor chain on every change, so quota checks and
renames across quota boundaries cost one walk up the tree.
"""

from __future__ import annotations

import errno
import stat
from bisect import bisect_left
from typing import Any

from fusecsi.cluster.checks import check_int, fail, opt_int

ROOT_INO = 1
MAX_NAME = 255
MAX_SYMLINK = 4096
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 << 10
MAX_READDIR = 10000
DIR_SIZE = 4096
MAX_RDEV = (1 << 32) - 1  # FUSE carries device numbers in 32 bits
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2


def check_name(name: Any) -> bytes:
    if not isinstance(name, bytes):
        raise fail(errno.EINVAL, "a name must be bytes")
    if len(name) > MAX_NAME:
        raise fail(errno.ENAMETOOLONG, f"name longer than {MAX_NAME} bytes")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise fail(errno.EINVAL, f"invalid name {name!r}")
    return name


class Inode:
    __slots__ = (
        "ino",
        "mode",
        "nlink",
        "uid",
        "gid",
        "size",
        "atime",
        "mtime",
        "ctime",
        "parent",  # directories: the one parent
        "links",  # other inodes: {parent ino: number of entries there}
        "entries",  # directories: {name: ino}
        "order",  # directories: DirOrder (stable readdir cookies)
        "target",  # symlinks
        "rdev",  # character and block devices: the device number (the kernel does their I/O)
        "xattrs",
        "blocks",  # regular files: {block index: [block id, [worker ids]]}
        "used",  # directories: [bytes, inodes] of the whole subtree
        "quota",  # directories: [max bytes | None, max inodes | None] or None
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, ts: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = 0
        self.atime = self.mtime = self.ctime = ts
        self.parent = 0
        self.links: dict[int, int] | None = None
        self.entries: dict[bytes, int] | None = None
        self.order: DirOrder | None = None
        self.target: bytes | None = None
        self.rdev = 0
        self.xattrs: dict[bytes, bytes] | None = None
        self.blocks: dict[int, list] | None = None
        self.used: list[int] | None = None
        self.quota: list | None = None
        if stat.S_ISDIR(mode):
            self.nlink = 2
            self.entries = {}
            self.order = DirOrder()
            self.used = [0, 0]
            self.size = DIR_SIZE
        else:
            self.nlink = 0
            self.links = {}
            if stat.S_ISREG(mode):
                self.blocks = {}

    @property
    def is_dir(self) -> bool:
        return self.entries is not None

    def attr(self) -> list:
        row = [
            self.ino,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.size,
            self.atime,
            self.mtime,
            self.ctime,
        ]
        if self.rdev:  # only devices carry a tenth field: older clients read every other attr
            row.append(self.rdev)
        return row

    def contribution(self) -> tuple[int, int]:
        """(bytes, inodes) one entry naming this inode adds to its parent's subtree."""
        if self.used is not None:
            return self.used[0], self.used[1] + 1
        if self.blocks is not None:
            return self.size, 1
        return 0, 1


class DirOrder:
    """Entries in creation order with a sequence number each: cookies survive deletions."""

    __slots__ = ("seqs", "names", "seq_of", "next_seq", "holes")

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.names: list[bytes | None] = []
        self.seq_of: dict[bytes, int] = {}
        self.next_seq = 1
        self.holes = 0

    def add(self, name: bytes) -> None:
        seq = self.next_seq
        self.next_seq += 1
        self.seqs.append(seq)
        self.names.append(name)
        self.seq_of[name] = seq

    def remove(self, name: bytes) -> None:
        seq = self.seq_of.pop(name)
        self.names[bisect_left(self.seqs, seq)] = None
        self.holes += 1
        if self.holes > 64 and self.holes * 2 > len(self.seqs):
            keep = [i for i, n in enumerate(self.names) if n is not None]
            self.seqs = [self.seqs[i] for i in keep]
            self.names = [self.names[i] for i in keep]
            self.holes = 0

    def page(self, cookie: int, limit: int) -> list[tuple[bytes, int]]:
        """Up to `limit` (name, next cookie) pairs starting at `cookie`."""
        out = []
        i = bisect_left(self.seqs, cookie)
        seqs, names = self.seqs, self.names
        while i < len(seqs) and len(out) < limit:
            name = names[i]
            if name is not None:
                out.append((name, seqs[i] + 1))
            i += 1
        return out


class Namespace:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.inodes: dict[int, Inode] = {}
        self.workers: dict[str, str] = {}  # worker id -> address, journaled
        # block ids a worker reported holding data: a lost one reads EIO, not as a hole
        self.holding: set[int] = set()
        self.next_id = ROOT_INO + 1  # inode numbers and block ids share one counter
        self.id_limit = ROOT_INO + 1  # ids below this are durably reserved
        self.quotas = 0
        root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 0)
        root.parent = ROOT_INO
        self.inodes[ROOT_INO] = root
        self._apply = {
            "mk": self._apply_mk,
            "mkvol": self._apply_mkvol,
            "batch": self._apply_batch,
            "rm": self._apply_rm,
            "rmtree": self._apply_rmtree,
            "mv": self._apply_mv,
            "ln": self._apply_ln,
            "attr": self._apply_attr,
            "xset": self._apply_xset,
            "xrm": self._apply_xrm,
            "quota": self._apply_quota,
            "alloc": self._apply_alloc,
            "commit": self._apply_commit,
            "ids": self._apply_ids,
            "worker": self._apply_worker,
            "drop": self._apply_drop,
            "data": self._apply_data,
        }

    # ------------------------------------------------------------ lookups

    def get(self, ino: Any) -> Inode:
        if not isinstance(ino, int) or isinstance(ino, bool):
            raise fail(errno.EINVAL, f"an inode number must be an integer, not {ino!r}")
        node = self.inodes.get(ino)
        if node is None:
            raise fail(errno.ENOENT, f"no inode {ino!r}")
        return node

    def dir(self, ino: Any) -> Inode:
        node = self.get(ino)
        if node.entries is None:
            raise fail(errno.ENOTDIR, f"inode {ino} is not a directory")
        return node

    def file(self, ino: Any) -> Inode:
        node = self.get(ino)
        if node.blocks is None:
            raise fail(errno.EISDIR if node.is_dir else errno.EINVAL, f"inode {ino} is not a file")
        return node

    def child(self, parent: Any, name: Any) -> Inode:
        d = self.dir(parent)
        ino = d.entries.get(check_name(name))
        if ino is None:
            raise fail(errno.ENOENT, f"no entry {name!r} in {parent}")
        return self.inodes[ino]

    def readdir(self, ino: Any, cookie: Any, limit: Any) -> list:
        d = self.dir(ino)
        check_int(cookie, "cookie")
        limit = min(check_int(limit, "limit", 1), MAX_READDIR)
        entries, inodes = d.entries, self.inodes
        return [[n, inodes[entries[n]].attr(), c] for n, c in d.order.page(cookie, limit)]

    def resolve(self, path: Any) -> Inode:
        if not isinstance(path, str) or not path.startswith("/"):
            raise fail(errno.EINVAL, "a path must be absolute")
        node = self.inodes[ROOT_INO]
        for part in path.split("/"):
            if part:
                node = self.child(node.ino, part.encode())
        return node

    def ancestors(self, dir_ino: int) -> list[int]:
        out = []
        node = self.inodes[dir_ino]
        while True:
            out.append(node.ino)
            if node.ino == ROOT_INO:
                return out
            node = self.inodes[node.parent]

    def nearest_quota(self, ino: Any) -> Inode:
        node = self.get(ino)
        if not node.is_dir:
            node = self.inodes[next(iter(node.links))] if node.links else None
        while node is not None:
            if node.quota is not None:
                return node
            if node.ino == ROOT_INO:
                break
            node = self.inodes[node.parent]
        raise fail(errno.ENODATA, f"no quota applies to inode {ino}")

    def quota_info(self, node: Inode) -> list:
        return [node.ino, node.quota[0], node.quota[1], node.used[0], node.used[1]]

    def statfs_inodes(self) -> int:
        return len(self.inodes)

    # ------------------------------------------------------------ usage and quotas

    def _charge(self, dir_ino: int, dbytes: int, dinodes: int) -> None:
        inodes = self.inodes
        node = inodes[dir_ino]
        while True:
            used = node.used
            used[0] += dbytes
            used[1] += dinodes
            if node.ino == ROOT_INO:
                return
            node = inodes[node.parent]

    def _check(self, dir_ino: int, dbytes: int, dinodes: int, stop: set | None = None) -> None:
        if not self.quotas or (dbytes <= 0 and dinodes <= 0):
            return
        node = self.inodes[dir_ino]
        while stop is None or node.ino not in stop:
            q = node.quota
            if q is not None:
                if dbytes > 0 and q[0] is not None and node.used[0] + dbytes > q[0]:
                    raise fail(errno.EDQUOT, f"byte quota of inode {node.ino} exceeded")
                if dinodes > 0 and q[1] is not None and node.used[1] + dinodes > q[1]:
                    raise fail(errno.EDQUOT, f"inode quota of inode {node.ino} exceeded")
            if node.ino == ROOT_INO:
                return
            node = self.inodes[node.parent]

    def headroom(self, node: Inode) -> int | None:
        """Bytes a file may still grow by under every quota above it (None: no limit)."""
        if not self.quotas:
            return None
        room = None
        for parent, count in node.links.items():
            d = self.inodes[parent]
            while True:
                q = d.quota
                if q is not None and q[0] is not None:
                    left = max(0, q[0] - d.used[0]) // count
                    room = left if room is None else min(room, left)
                if d.ino == ROOT_INO:
                    break
                d = self.inodes[d.parent]
        return room

    def _check_growth(self, node: Inode, dbytes: int) -> None:
        for parent in node.links:
            self._check(parent, dbytes * node.links[parent], 0)

    def _charge_file(self, node: Inode, dbytes: int) -> None:
        for parent, count in node.links.items():
            self._charge(parent, dbytes * count, 0)

    # ------------------------------------------------------------ plans

    def plan_mk(self, parent, name, ino, mode, uid, gid, ts, target=None, rdev=0) -> list:
        d = self.dir(parent)
        name = check_name(name)
        check_int(uid, "uid", 0, 1 << 32)
        check_int(gid, "gid", 0, 1 << 32)
        check_int(mode, "mode", 0, 0o177777)
        check_int(rdev, "rdev", 0, MAX_RDEV)
        if target is not None and (not isinstance(target, bytes) or not target):
            raise fail(errno.EINVAL, "a symlink target must be non-empty bytes")
        if target is not None and len(target) > MAX_SYMLINK:
            raise fail(errno.ENAMETOOLONG, "symlink target too long")
        if name in d.entries:
            raise fail(errno.EEXIST, f"{name!r} exists")
        self._check(d.ino, 0, 1)
        record = ["mk", d.ino, name, ino, mode, uid, gid, ts, target]
        return [*record, rdev] if rdev else record

    def plan_mkvol(self, parent, name, ino, mode, ts, xattrs, max_bytes) -> list:
        """A directory born with xattrs and a byte quota (the controller's volumes)."""
        if not stat.S_ISDIR(mode):
            raise fail(errno.EINVAL, "a volume is a directory")
        if not isinstance(xattrs, dict):
            raise fail(errno.EINVAL, "xattrs must be a map of names to values")
        for xname, value in xattrs.items():
            self._check_xattr(xname, value)
        opt_int(max_bytes, "max_bytes")
        record = self.plan_mk(parent, name, ino, mode, 0, 0, ts)
        return ["mkvol", *record[1:8], list(xattrs.items()), max_bytes]

    def plan_batch(self, parent, names, first_ino, mode, uid, gid, ts) -> list:
        d = self.dir(parent)
        if not isinstance(names, list):
            raise fail(errno.EINVAL, "names must be a list")
        seen = set()
        for name in names:
            check_name(name)
            if name in d.entries or name in seen:
                raise fail(errno.EEXIST, f"{name!r} exists")
            seen.add(name)
        self._check(d.ino, 0, len(names))
        return ["batch", d.ino, names, first_ino, mode, uid, gid, ts]

    def plan_rm(self, parent, name, want_dir: bool, ts: int) -> list:
        node = self.child(parent, name)
        if want_dir:
            if not node.is_dir:
                raise fail(errno.ENOTDIR, f"{name!r} is not a directory")
            if node.entries:
                raise fail(errno.ENOTEMPTY, f"{name!r} is not empty")
        elif node.is_dir:
            raise fail(errno.EISDIR, f"{name!r} is a directory")
        return ["rm", parent, name, ts]

    def plan_rmtree(self, parent, name, ts) -> list:
        self.child(parent, name)
        return ["rmtree", parent, name, ts]

    def _inside(self, node: Inode, dir_ino: int) -> bool:
        """Whether directory `dir_ino` is `node` or lies below it."""
        return node.is_dir and node.ino in self.ancestors(dir_ino)

    def plan_mv(self, parent, name, new_parent, new_name, flags, ts) -> list:
        check_int(flags, "flags")
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == 3:
            raise fail(errno.EINVAL, f"bad rename flags {flags}")
        src = self.child(parent, name)
        nd = self.dir(new_parent)
        new_name = check_name(new_name)
        dst_ino = nd.entries.get(new_name)
        dst = self.inodes[dst_ino] if dst_ino is not None else None
        if self._inside(src, new_parent):
            raise fail(errno.EINVAL, "cannot move a directory below itself")
        if flags == RENAME_EXCHANGE:
            if dst is None:
                raise fail(errno.ENOENT, f"no entry {new_name!r} to exchange with")
            if self._inside(dst, parent):
                raise fail(errno.EINVAL, "cannot move a directory below itself")
        elif dst is not None:
            if flags == RENAME_NOREPLACE:
                raise fail(errno.EEXIST, f"{new_name!r} exists")
            if dst is src:
                return ["mv", parent, name, new_parent, new_name, flags, ts]
            if src.is_dir and not dst.is_dir:
                raise fail(errno.ENOTDIR, f"{new_name!r} is not a directory")
            if dst.is_dir and not src.is_dir:
                raise fail(errno.EISDIR, f"{new_name!r} is a directory")
            if dst.is_dir and dst.entries:
                raise fail(errno.ENOTEMPTY, f"{new_name!r} is not empty")
        if parent != new_parent and self.quotas:
            cb, ci = src.contribution()
            rb, ri = dst.contribution() if dst is not None else (0, 0)
            old_chain = set(self.ancestors(parent))
            new_chain = set(self.ancestors(new_parent))
            if flags == RENAME_EXCHANGE:
                self._check(new_parent, cb - rb, ci - ri, old_chain)
                self._check(parent, rb - cb, ri - ci, new_chain)
            else:
                self._check(new_parent, cb - rb, ci - ri, old_chain)
        return ["mv", parent, name, new_parent, new_name, flags, ts]

    def plan_ln(self, ino, new_parent, new_name, ts) -> list:
        node = self.get(ino)
        if node.is_dir:
            raise fail(errno.EPERM, "cannot hard-link a directory")
        nd = self.dir(new_parent)
        new_name = check_name(new_name)
        if new_name in nd.entries:
            raise fail(errno.EEXIST, f"{new_name!r} exists")
        self._check(nd.ino, node.contribution()[0], 1)
        return ["ln", node.ino, nd.ino, new_name, ts]

    def plan_attr(self, ino, mode, uid, gid, size, atime, mtime, ts) -> list:
        node = self.get(ino)
        opt_int(mode, "mode")
        opt_int(uid, "uid")
        opt_int(gid, "gid")
        opt_int(atime, "atime_ns")
        opt_int(mtime, "mtime_ns")
        if size is not None:
            check_int(size, "size")
            if node.blocks is None:
                raise fail(errno.EISDIR if node.is_dir else errno.EINVAL, "size of a non-file")
            if size > node.size:
                self._check_growth(node, size - node.size)
        return ["attr", node.ino, mode, uid, gid, size, atime, mtime, ts]

    def plan_xset(self, ino, name, value, flags, ts) -> list:
        node = self.get(ino)
        self._check_xattr(name, value)
        check_int(flags, "flags")
        present = node.xattrs is not None and name in node.xattrs
        if flags & XATTR_CREATE and present:
            raise fail(errno.EEXIST, f"xattr {name!r} exists")
        if flags & XATTR_REPLACE and not present:
            raise fail(errno.ENODATA, f"no xattr {name!r}")
        return ["xset", node.ino, name, value, ts]

    def plan_xrm(self, ino, name, ts) -> list:
        node = self.get(ino)
        self._check_xattr_name(name)
        if node.xattrs is None or name not in node.xattrs:
            raise fail(errno.ENODATA, f"no xattr {name!r}")
        return ["xrm", node.ino, name, ts]

    @classmethod
    def _check_xattr(cls, name, value) -> None:
        cls._check_xattr_name(name)
        if not isinstance(value, bytes):
            raise fail(errno.EINVAL, "an xattr value must be bytes")
        if len(value) > MAX_XATTR_VALUE:
            raise fail(errno.E2BIG, "xattr value too large")

    @staticmethod
    def _check_xattr_name(name) -> None:
        if not isinstance(name, bytes) or not name or b"\0" in name:
            raise fail(errno.EINVAL, "an xattr name must be non-empty bytes")
        if len(name) > MAX_XATTR_NAME:
            raise fail(errno.ERANGE, "xattr name too long")

    def getxattr(self, ino, name) -> bytes:
        node = self.get(ino)
        self._check_xattr_name(name)
        if node.xattrs is None or name not in node.xattrs:
            raise fail(errno.ENODATA, f"no xattr {name!r}")
        return node.xattrs[name]

    def plan_quota(self, ino, max_bytes, max_inodes) -> list:
        self.dir(ino)
        opt_int(max_bytes, "max_bytes")
        opt_int(max_inodes, "max_inodes")
        return ["quota", ino, max_bytes, max_inodes]

    def plan_commit(self, ino, size, mtime, ts) -> list:
        node = self.file(ino)
        check_int(size, "size")
        opt_int(mtime, "mtime_ns")
        if size > node.size:
            self._check_growth(node, size - node.size)
        return ["commit", node.ino, size, mtime, ts]

    # ------------------------------------------------------------ apply

    def apply(self, record: list) -> Any:
        return self._apply[record[0]](*record[1:])

    def _link(self, d: Inode, name: bytes, node: Inode) -> None:
        d.entries[name] = node.ino
        d.order.add(name)
        if node.is_dir:
            node.parent = d.ino
            d.nlink += 1
        else:
            node.links[d.ino] = node.links.get(d.ino, 0) + 1
            node.nlink += 1
        cb, ci = node.contribution()
        self._charge(d.ino, cb, ci)

    def _unlink(self, d: Inode, name: bytes) -> Inode:
        node = self.inodes[d.entries.pop(name)]
        d.order.remove(name)
        cb, ci = node.contribution()
        self._charge(d.ino, -cb, -ci)
        if node.is_dir:
            d.nlink -= 1
        else:
            self._drop_link(node, d.ino)
        return node

    @staticmethod
    def _drop_link(node: Inode, parent: int) -> None:
        node.nlink -= 1
        left = node.links[parent] - 1
        if left:
            node.links[parent] = left
        else:
            del node.links[parent]

    def _forget(self, node: Inode, freed: list) -> None:
        """Drop an inode that no entry names any more; collect its blocks."""
        if node.is_dir:
            if node.quota is not None:
                self.quotas -= 1
        elif node.nlink > 0:
            return
        if node.blocks:
            freed.extend(node.blocks.values())
            self.holding.difference_update(b[0] for b in node.blocks.values())
        del self.inodes[node.ino]

    def _touch(self, d: Inode, ts: int) -> None:
        d.mtime = d.ctime = ts

    def _take(self, ino: int) -> None:
        if ino >= self.next_id:
            self.next_id = ino + 1
        if self.next_id > self.id_limit:
            self.id_limit = self.next_id

    def _apply_mk(self, parent, name, ino, mode, uid, gid, ts, target, rdev=0) -> list:
        d = self.inodes[parent]
        node = Inode(ino, mode, uid, gid, ts)
        node.target = target
        node.rdev = rdev
        if target is not None:
            node.size = len(target)
        self.inodes[ino] = node
        self._take(ino)
        self._link(d, name, node)
        self._touch(d, ts)
        return node.attr()

    def _apply_mkvol(self, parent, name, ino, mode, uid, gid, ts, xattrs, max_bytes) -> list:
        self._apply_mk(parent, name, ino, mode, uid, gid, ts, None)
        node = self.inodes[ino]
        node.xattrs = dict(xattrs) if xattrs else None
        if max_bytes is not None:
            self._apply_quota(ino, max_bytes, None)
        return node.attr()

    def _apply_batch(self, parent, names, first_ino, mode, uid, gid, ts) -> int:
        d = self.inodes[parent]
        for i, name in enumerate(names):
            node = Inode(first_ino + i, mode, uid, gid, ts)
            self.inodes[node.ino] = node
            self._link(d, name, node)
        self._take(first_ino + len(names) - 1)
        self._touch(d, ts)
        return len(names)

    def _apply_rm(self, parent, name, ts) -> list:
        d = self.inodes[parent]
        node = self._unlink(d, name)
        node.ctime = ts
        self._touch(d, ts)
        freed: list = []
        self._forget(node, freed)
        return freed

    def _apply_rmtree(self, parent, name, ts) -> list:
        d = self.inodes[parent]
        top = self._unlink(d, name)
        self._touch(d, ts)
        freed: list = []
        stack = [top]
        while stack:
            node = stack.pop()
            if node.is_dir:
                for child_name, child_ino in list(node.entries.items()):
                    child = self.inodes[child_ino]
                    if child.is_dir:
                        stack.append(child)
                    else:
                        # no charging: the whole subtree's usage left with `top`
                        self._drop_link(child, node.ino)
                        self._forget(child, freed)
                    del node.entries[child_name]
            self._forget(node, freed)
        return freed

    def _apply_mv(self, parent, name, new_parent, new_name, flags, ts) -> list:
        d = self.inodes[parent]
        nd = self.inodes[new_parent]
        src = self.inodes[d.entries[name]]
        freed: list = []
        dst_ino = nd.entries.get(new_name)
        if dst_ino == src.ino:
            return freed
        if flags == RENAME_EXCHANGE:
            dst = self._unlink(nd, new_name)
            self._unlink(d, name)
            self._link(d, name, dst)
            self._link(nd, new_name, src)
            dst.ctime = ts
        else:
            if dst_ino is not None:
                dst = self._unlink(nd, new_name)
                dst.ctime = ts
                self._forget(dst, freed)
            self._unlink(d, name)
            self._link(nd, new_name, src)
        src.ctime = ts
        self._touch(d, ts)
        self._touch(nd, ts)
        return freed

    def _apply_ln(self, ino, new_parent, new_name, ts) -> list:
        node = self.inodes[ino]
        d = self.inodes[new_parent]
        self._link(d, new_name, node)
        node.ctime = ts
        self._touch(d, ts)
        return node.attr()

    def _apply_attr(self, ino, mode, uid, gid, size, atime, mtime, ts) -> list:
        node = self.inodes[ino]
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if atime is not None:
            node.atime = atime
        if mtime is not None:
            node.mtime = mtime
        freed: list = []
        if size is not None:
            keep = min(size, node.size)
            bs = self.block_size
            for index in [i for i in node.blocks if i * bs >= keep]:
                freed.append(node.blocks.pop(index))
                self.holding.discard(freed[-1][0])
            if size != node.size:
                self._charge_file(node, size - node.size)
                node.size = size
                if mtime is None:
                    node.mtime = ts
        node.ctime = ts
        return freed

    def _apply_xset(self, ino, name, value, ts) -> None:
        node = self.inodes[ino]
        if node.xattrs is None:
            node.xattrs = {}
        node.xattrs[name] = value
        node.ctime = ts

    def _apply_xrm(self, ino, name, ts) -> None:
        node = self.inodes[ino]
        del node.xattrs[name]
        node.ctime = ts

    def _apply_quota(self, ino, max_bytes, max_inodes) -> list:
        node = self.inodes[ino]
        had = node.quota is not None
        if max_bytes is None and max_inodes is None:
            node.quota = None
        else:
            node.quota = [max_bytes, max_inodes]
        self.quotas += (node.quota is not None) - had
        return [ino, max_bytes, max_inodes, node.used[0], node.used[1]]

    def _apply_alloc(self, ino, blocks) -> None:
        node = self.inodes.get(ino)
        if node is None:  # not expected: allocate checks the file and commits at once
            return
        for index, block_id, workers in blocks:
            node.blocks[index] = [block_id, workers]
            self._take(block_id)

    def _apply_drop(self, ino, index, worker_ids) -> None:
        node = self.inodes.get(ino)
        block = node.blocks.get(index) if node is not None else None
        if block is not None:
            block[1] = [w for w in block[1] if w not in worker_ids]

    def _apply_data(self, block_ids) -> None:
        self.holding.update(block_ids)

    def _apply_commit(self, ino, size, mtime, ts) -> list:
        node = self.inodes[ino]
        if size > node.size:
            self._charge_file(node, size - node.size)
            node.size = size
        node.mtime = ts if mtime is None else mtime
        node.ctime = ts
        return node.attr()

    def _apply_ids(self, limit) -> None:
        self.id_limit = max(self.id_limit, limit)

    def _apply_worker(self, worker_id, address) -> None:
        self.workers[worker_id] = address

    # ------------------------------------------------------------ checkpoints

    def dump(self) -> dict:
        nodes = []
        holding = []  # only blocks still allocated: a late report of a freed one is dropped
        for n in self.inodes.values():
            if n.order is not None:
                o = n.order
                listing = [
                    [nm, n.entries[nm], s] for s, nm in zip(o.seqs, o.names, strict=True) if nm
                ]
                extra = [n.parent, listing, o.next_seq, n.used, n.quota]
            else:
                blocks = None if n.blocks is None else [[i, *b] for i, b in n.blocks.items()]
                if n.blocks:
                    holding += [b[0] for b in n.blocks.values() if b[0] in self.holding]
                extra = [list(n.links.items()), n.target, blocks]
                if n.rdev:
                    extra.append(n.rdev)
            xattrs = None if n.xattrs is None else list(n.xattrs.items())
            nodes.append([*n.attr()[:9], xattrs, extra])  # rdev is in extra
        return {
            "block_size": self.block_size,
            "next_id": self.next_id,
            "id_limit": self.id_limit,
            "workers": self.workers,
            "inodes": nodes,
            "holding": holding,
        }

    @classmethod
    def load(cls, data: dict) -> Namespace:
        ns = cls(data["block_size"])
        ns.next_id = data["next_id"]
        ns.id_limit = data["id_limit"]
        ns.workers = dict(data["workers"])
        ns.holding = set(data.get("holding", ()))  # absent in checkpoints made before it
        ns.inodes.clear()
        new = Inode.__new__
        for ino, mode, nlink, uid, gid, size, atime, mtime, ctime, xattrs, extra in data["inodes"]:
            n = new(Inode)
            n.ino, n.mode, n.nlink, n.uid, n.gid, n.size = ino, mode, nlink, uid, gid, size
            n.atime, n.mtime, n.ctime = atime, mtime, ctime
            n.xattrs = None if xattrs is None else dict(xattrs)
            n.target = n.blocks = None
            n.rdev = 0
            if stat.S_ISDIR(mode):
                n.parent, listing, next_seq, n.used, n.quota = extra
                n.links = None
                order = n.order = DirOrder()
                order.seqs = [row[2] for row in listing]
                order.names = [row[0] for row in listing]
                order.seq_of = dict(zip(order.names, order.seqs, strict=True))
                order.next_seq = next_seq
                n.entries = {row[0]: row[1] for row in listing}
                ns.quotas += n.quota is not None
            else:
                links, n.target, blocks, *rdev = extra  # rdev: devices only
                n.rdev = rdev[0] if rdev else 0
                n.parent, n.entries, n.order, n.used, n.quota = 0, None, None, None, None
                n.links = dict(links)
                if blocks is not None:
                    n.blocks = {i: [b, w] for i, b, w in blocks}
            ns.inodes[ino] = n
        return ns
