"""The controller's half of SeaweedFS: the Namespace seam over the filer's HTTP API.

What the filer gives, and what that means here:
- mkdir is `POST /dir/` and answers 409 when the name is taken, so creation is exclusive;
  tags are a second call (`PUT ?tagging`), so a tagged create is NOT atomic: a crash in
  between leaves an untagged directory, which the controller then treats as foreign.
  When the tagging call itself fails, the fresh (empty) directory is removed again.
- Tags are filer extended attributes named `Seaweed-<name>`: the filer keeps them on the
  entry, and `weed mount` does not show them (it shows only `xattr-` attributes), so a
  workload cannot read, forge or strip them through its mount. Header names are
  case-folded by the filer, so tag names are restricted to lower case [a-z0-9._-].
  Values are percent-encoded behind a leading `=` (headers cannot carry control bytes
  or an empty value).
- The filer's move replaces an existing target, so rename checks first: a create of
  `dst` between the check and the move (a race the filer cannot close) is replaced.
  The filer also refuses a move into a directory whose path merely starts with the
  source's; such a rename goes through a temporary name beside the source.
- Quotas are recorded as the tag `trusted.fusecsi.quota-bytes`, never enforced.
- Delete of a missing path answers 204, so rmdir looks the path up first (ENOENT);
  remove_tree of nothing is fine, as the contract says.
"""

from __future__ import annotations

import base64
import errno
import posixpath
import re
import secrets
from collections.abc import Mapping
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes, urlencode

import trio

from fusecsi.engines.base import Cluster, Node
from fusecsi.engines.seaweedfs import addresses, http

QUOTA_TAG = b"trusted.fusecsi.quota-bytes"
_TAG_NAME = re.compile(rb"[a-z0-9][a-z0-9._-]{0,200}")
_DIR_BIT = 1 << 31  # Go's os.ModeDir in the filer's JSON `Mode`
_VALUE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_PAGE = 1000
MAX_TAG_VALUE = 64 * 1024  # encoded; the filer's header limit is 1 MiB for all of them


def _clean(path: str) -> str:
    if (
        not path.startswith("/")
        or "\0" in path
        or "//" in path
        or (path != "/" and path.endswith("/"))
        or posixpath.normpath(path) != path
    ):
        raise OSError(errno.EINVAL, f"seaweedfs: {path!r} is not an absolute clean path")
    return path


def _header_name(name: bytes) -> str:
    if not _TAG_NAME.fullmatch(name):
        raise OSError(errno.EINVAL, f"seaweedfs: tag name {name!r} is not lower-case [a-z0-9._-]")
    # the filer stores header names in Go's canonical form (Title-Case around dashes)
    parts = ("seaweed-" + name.decode()).split("-")
    return "-".join(part[:1].upper() + part[1:] for part in parts)


def encode_value(value: bytes) -> str:
    encoded = "=" + quote_from_bytes(value, safe=_VALUE_SAFE)
    if len(encoded) > MAX_TAG_VALUE:
        raise OSError(errno.EINVAL, f"seaweedfs: a tag value of {len(value)} bytes is too large")
    return encoded


def decode_value(stored: bytes) -> bytes:
    # a value set by hand (without our `=`) reads as it is: the controller's rules then
    # find it is no volume id of theirs and leave the directory alone
    return unquote_to_bytes(stored[1:]) if stored.startswith(b"=") else stored


class FilerNamespace:
    """Directories, tags and recorded quotas of one SeaweedFS cluster, through its filer."""

    quota_enforced = False

    def __init__(self, cluster: Cluster, *, timeout: float) -> None:
        self._filers = [f.http for f in addresses.filers_of(cluster)]
        self._masters = [m.http for m in addresses.masters_of(cluster)]
        self._timeout = timeout
        self._write_key = cluster.secrets.get("jwt-filer-signing-key")
        self._read_key = cluster.secrets.get("jwt-filer-signing-read-key")

    async def __aenter__(self) -> FilerNamespace:
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    # -- the filer calls -------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        trailing_slash: bool = False,
    ) -> http.Response:
        target = quote(path, safe="/")
        if trailing_slash and not target.endswith("/"):
            target += "/"
        if query:
            target += "?" + urlencode(query)
        sent = dict(headers or {})
        key = self._read_key if method in ("GET", "HEAD") else self._write_key
        if key:
            sent["Authorization"] = "Bearer " + http.jwt_hs256(key)
        return await http.request(self._filers, method, target, headers=sent, within=self._timeout)

    @staticmethod
    def _error(response: http.Response, what: str, path: str) -> OSError:
        reason = response.error_text()
        if response.status == 404:
            code = errno.ENOENT
        elif response.status == 409:
            code = errno.EEXIST
        elif response.status in (401, 403):
            code = errno.EACCES
        elif "non-empty" in reason or "not empty" in reason:
            code = errno.ENOTEMPTY
        elif response.status == 400:
            code = errno.EINVAL
        else:
            code = errno.EIO
        return OSError(code, f"seaweedfs filer: {what} {path}: HTTP {response.status} {reason}")

    async def _entry(self, path: str) -> dict | None:
        response = await self._call("GET", _clean(path), {"metadata": "true"})
        if response.status == 404:
            return None
        if response.status != 200:
            raise self._error(response, "stat", path)
        return response.json()

    async def _existing(self, path: str, *, want_dir: bool | None = None) -> dict:
        entry = await self._entry(path)
        if entry is None:
            raise OSError(errno.ENOENT, f"seaweedfs: {path} does not exist")
        is_dir = bool(entry.get("Mode", 0) & _DIR_BIT)
        if want_dir is True and not is_dir:
            raise OSError(errno.ENOTDIR, f"seaweedfs: {path} is not a directory")
        if want_dir is False and is_dir:
            raise OSError(errno.EISDIR, f"seaweedfs: {path} is a directory")
        return entry

    async def _mkdir(self, path: str, mode: int) -> None:
        response = await self._call(
            "POST", path, {"mode": format(mode & 0o7777, "o")}, trailing_slash=True
        )
        if response.status not in (200, 201):
            raise self._error(response, "mkdir", path)

    async def _put_tags(self, path: str, tags: Mapping[bytes, bytes]) -> None:
        headers = {_header_name(name): encode_value(value) for name, value in tags.items()}
        response = await self._call("PUT", path, {"tagging": ""}, headers)
        if response.status not in (200, 201, 202, 204):
            raise self._error(response, "tag", path)

    # -- Namespace -------------------------------------------------------------------------

    async def lookup(self, path: str) -> Node | None:
        entry = await self._entry(path)
        if entry is None:
            return None
        return Node(path, bool(entry.get("Mode", 0) & _DIR_BIT))

    async def listdir(self, path: str) -> list[Node]:
        await self._existing(path, want_dir=True)
        nodes: list[Node] = []
        last = ""
        while True:
            query = {"limit": str(_PAGE)}
            if last:
                query["lastFileName"] = last
            response = await self._call("GET", path, query, trailing_slash=True)
            if response.status != 200:
                raise self._error(response, "list", path)
            page = response.json()
            entries = page.get("Entries") or []
            for entry in entries:
                nodes.append(Node(entry["FullPath"], bool(entry.get("Mode", 0) & _DIR_BIT)))
            if not entries or not page.get("ShouldDisplayLoadMore"):
                return nodes
            last = page.get("LastFileName") or posixpath.basename(entries[-1]["FullPath"])

    async def mkdirs(self, path: str) -> None:
        current = ""
        for part in _clean(path).split("/")[1:]:
            if not part:
                continue
            current += "/" + part
            node = await self.lookup(current)
            if node is None:
                try:
                    await self._mkdir(current, 0o755)
                except FileExistsError:
                    node = await self.lookup(current)  # made meanwhile: fine if a directory
                    if node is None:
                        raise
                else:
                    continue
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, f"seaweedfs: {current} is not a directory")

    async def mkdir_tagged(
        self, path: str, mode: int, tags: Mapping[bytes, bytes], quota_bytes: int | None
    ) -> None:
        if _clean(path) == "/":
            raise OSError(errno.EEXIST, "seaweedfs: / exists")
        all_tags = dict(tags)
        if quota_bytes is not None:
            all_tags[QUOTA_TAG] = str(int(quota_bytes)).encode()
        for name, value in all_tags.items():  # refuse a bad tag before any mkdir
            _header_name(name)
            encode_value(value)
        await self._existing(posixpath.dirname(path), want_dir=True)
        await self._mkdir(path, mode)
        if not all_tags:
            return
        try:
            await self._put_tags(path, all_tags)
        except BaseException:
            # not ours without its tags: take the fresh, still empty directory back
            with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                try:
                    await self._call("DELETE", path)
                except OSError:
                    pass
            raise

    async def get_tag(self, path: str, name: bytes) -> bytes | None:
        header = _header_name(name).lower()
        entry = await self._existing(path)
        for key, value in (entry.get("Extended") or {}).items():
            if key.lower() == header:
                return decode_value(base64.b64decode(value))
        return None

    async def set_tag(self, path: str, name: bytes, value: bytes) -> None:
        await self._put_tags(_clean(path), {name: value})

    async def remove_tag(self, path: str, name: bytes) -> None:
        header = _header_name(name)
        if await self.get_tag(path, name) is None:
            raise OSError(errno.ENODATA, f"seaweedfs: {path} has no tag {name.decode()}")
        # never an empty name: `?tagging=` with nothing removes every tag of the entry
        response = await self._call("DELETE", path, {"tagging": header.removeprefix("Seaweed-")})
        if response.status not in (200, 202, 204):
            raise self._error(response, "untag", path)

    async def get_quota(self, path: str) -> int | None:
        value = await self.get_tag(path, QUOTA_TAG)
        return None if value is None else int(value)

    async def set_quota(self, path: str, max_bytes: int) -> None:
        if max_bytes < 0:
            raise OSError(errno.EINVAL, "seaweedfs: a quota cannot be negative")
        await self.set_tag(path, QUOTA_TAG, str(int(max_bytes)).encode())

    async def rename(self, src: str, dst: str) -> None:
        _clean(src)
        _clean(dst)
        if src == "/" or dst == src or dst.startswith(src + "/"):
            raise OSError(errno.EINVAL, f"seaweedfs: cannot move {src} to {dst}")
        await self._existing(src)
        if await self.lookup(dst) is not None:
            raise OSError(errno.EEXIST, f"seaweedfs: {dst} exists")
        await self._existing(posixpath.dirname(dst), want_dir=True)
        if not posixpath.dirname(dst).startswith(src):
            await self._move(src, dst)
            return
        # the filer refuses a move whose target directory's name merely starts with the
        # source's ("/v/a" -> "/v/archive/a": "a subdirectory of itself"): go through a
        # temporary name beside the source, and back to the source if the second step fails
        step = f"{posixpath.dirname(src).rstrip('/')}/.fusecsi-move-{secrets.token_hex(8)}"
        await self._move(src, step)
        try:
            await self._move(step, dst)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(self._timeout):
                try:
                    await self._move(step, src)
                except OSError:
                    pass
            raise

    async def _move(self, src: str, dst: str) -> None:
        response = await self._call("POST", dst, {"mv.from": src})
        if response.status not in (200, 201, 204):
            raise self._error(response, "move to", dst)

    async def rmdir(self, path: str) -> None:
        if _clean(path) == "/":
            raise OSError(errno.EBUSY, "seaweedfs: will not remove /")
        await self._existing(path, want_dir=True)
        response = await self._call("DELETE", path)
        if response.status not in (200, 202, 204):
            raise self._error(response, "rmdir", path)

    async def remove_tree(self, path: str) -> None:
        """Delete the directory and everything below it; nothing there is fine."""
        if _clean(path) == "/":
            raise OSError(errno.EBUSY, "seaweedfs: will not remove /")
        entry = await self._entry(path)
        if entry is None:
            return
        if not entry.get("Mode", 0) & _DIR_BIT:
            raise OSError(errno.ENOTDIR, f"seaweedfs: {path} is not a directory")
        response = await self._call(
            "DELETE", path, {"recursive": "true", "ignoreRecursiveError": "false"}
        )
        if response.status not in (200, 202, 204):
            raise self._error(response, "remove", path)

    async def sync(self) -> None:
        """Each filer call answers after the filer store has the change: nothing to flush."""

    async def capacity(self, path: str) -> int:
        """Free bytes on the volume servers' disks (the masters list them): raw space,
        before replication, and regardless of the volume-count limit. Without
        `master-addrs` the filer alone cannot tell, so this fails with ENOTSUP. The same
        for every `path` (it need not exist yet): there is no directory quota to cap it."""
        _clean(path)
        if not self._masters:
            raise OSError(
                errno.ENOTSUP,
                "seaweedfs: free capacity needs the StorageClass parameter master-addrs",
            )
        response = await http.request(
            self._masters, "GET", "/dir/status", within=self._timeout, what="master"
        )
        if response.status != 200:
            raise self._error(response, "master status", "/dir/status")
        urls = sorted(
            {
                node["Url"]
                for dc in (response.json().get("Topology") or {}).get("DataCenters") or []
                for rack in dc.get("Racks") or []
                for node in rack.get("DataNodes") or []
            }
        )
        free = 0
        for url in urls:
            host, _, port = url.rpartition(":")
            try:
                status = await http.request(
                    [(host.strip("[]"), int(port))],
                    "GET",
                    "/status",
                    within=self._timeout,
                    what="volume server",
                )
            except OSError:
                continue  # a volume server that does not answer takes no writes either
            if status.status == 200:
                disks = status.json().get("DiskStatuses") or []
                free += sum(int(d.get("free", 0)) for d in disks)
        return free
