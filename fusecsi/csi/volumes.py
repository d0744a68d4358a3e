"""Volume ids, StorageClass parameters and the paths they produce.

A volume id is self-describing, so DeleteVolume and ControllerExpandVolume need nothing but
the id (and the request's secrets), at most 128 bytes, `%` and `;` percent-escaped:

- version 3, any engine: `3;<engine>;<d|r|a>;<name digest>;<address>;<fs-path>;<subpath>`
  (`address`: the engine's public name of its cluster, never a secret);
- version 2, the embedded cluster: `2;<d|r|a>;<name digest>;<master-addrs>;<fs-path>;<subpath>`;
- version 1, the embedded cluster, made before name digests:
  `1;<d|r|a>;<master-addrs>;<fs-path>;<subpath>` (names only a path).

The embedded cluster keeps getting version 2 ids: its default directory name is shortened
to what the id leaves room for, so a longer id format would give a CreateVolume retried
across an upgrade another directory than the first attempt made. The version says the
engine as surely as a field would. The name digest (8 hex digits of sha256 over the
CreateVolume name, which is unique per PVC) tells apart two volumes that were given the same
directory one after the other (a PVC deleted and re-created under the same name). Every path
that leaves this module has been checked to stay inside its fs-path: no `.`/`..`, no empty or
absolute pieces, no over-long names.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from fusecsi import mount_options
from fusecsi.engines import DEFAULT as DEFAULT_ENGINE
from fusecsi.engines import NAMES as ENGINE_NAMES

DEFAULT_PORT = 8995
MAX_VOLUME_ID = 128
MAX_NAME_BYTES = 255
MAX_SUBPATH_SEGMENTS = 8
MAX_FS_PATH_BYTES = 4096
ID_VERSION_ENGINE = "3"
ID_VERSION = "2"
ID_VERSION_PATH_ONLY = "1"
# the engine whose ids keep the version 2 (and 1) form, with no engine field
EMBEDDED = "embedded"
NAME_DIGEST_CHARS = 8

# volume context keys (a static PV carries the same keys in volumeAttributes)
CTX_ENGINE = "engine"
CTX_MASTER_ADDRS = "master-addrs"
CTX_FS_PATH = "fs-path"
CTX_SUBPATH = "subpath"
CTX_OPTIONS = "options"

# StorageClass parameters of our own; FUSE options are the keys of mount_options.OPTIONS
P_ENGINE = "engine"
P_MASTER_ADDRS = "master-addrs"
P_FS_PATH = "fs-path"
P_PATH_PATTERN = "path-pattern"
P_ON_DELETE = "on-delete"
# external-provisioner's keys: --extra-create-metadata sends the three below; the whole
# prefix is consumed here and never passed on
RESERVED_PREFIX = "csi.storage.k8s.io/"
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PV_NAME = "csi.storage.k8s.io/pv/name"

ON_DELETE_CODES = {"delete": "d", "retain": "r", "archive": "a"}
_ON_DELETE_NAMES = {code: name for name, code in ON_DELETE_CODES.items()}

_HOST_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ESCAPE = {"%": "%25", ";": "%3B"}
_ESCAPED = re.compile(r"%(25|3[bB])")
_DIGEST = re.compile(rf"^[0-9a-f]{{{NAME_DIGEST_CHARS}}}$")


def name_digest(name: str) -> str:
    """What a volume id keeps of the CreateVolume name: enough to tell two volumes apart."""
    return hashlib.sha256(name.encode()).hexdigest()[:NAME_DIGEST_CHARS]


def normalize_master_addrs(text: str) -> str:
    """`host:port[,host:port]` with the default port filled in, hosts lower-cased,
    duplicates dropped, sorted. ValueError on anything else."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("master-addrs is empty (expected host:port[,host:port])")
    addrs = {_normalize_addr(item.strip()) for item in text.split(",")}
    return ",".join(sorted(addrs))


def _normalize_addr(item: str) -> str:
    if not item:
        raise ValueError("master-addrs has an empty entry")
    if item.startswith("["):  # [v6] or [v6]:port
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"master address {item!r}: bad [IPv6] form")
        port_text = rest[1:] if rest else None
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"master address {item!r}: {host!r} is not an IPv6 address") from None
        return f"[{ip.compressed}]:{_port(item, port_text)}"
    host, sep, port_text = item.rpartition(":")
    if not sep:
        host, port_text = item, None
    elif ":" in host:
        raise ValueError(f"master address {item!r}: write IPv6 addresses as [addr]:port")
    host = host.lower()
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.split(".")):
            raise ValueError(f"master address {item!r}: {host!r} is not a host name") from None
    return f"{host}:{_port(item, port_text)}"


def _port(item: str, text: str | None) -> int:
    if text is None:
        return DEFAULT_PORT
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"master address {item!r}: port must be 1-65535")
    return int(text)


def validate_name(name: str) -> str:
    """One path segment: not empty, `.` or `..`, no `/`, NUL or control characters,
    at most 255 bytes of UTF-8."""
    if not isinstance(name, str) or not name:
        raise ValueError("empty path segment")
    if name in (".", ".."):
        raise ValueError(f"path segment {name!r} is not allowed")
    if "/" in name:
        raise ValueError(f"path segment {name!r} contains '/'")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise ValueError(f"path segment {name!r} contains control characters")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ValueError(f"path segment {name!r} is not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise ValueError(f"path segment of {size} bytes is longer than {MAX_NAME_BYTES}")
    return name


def normalize_fs_path(text: str) -> str:
    """Absolute, no `.`/`..`/empty segments; one trailing `/` is dropped; `/` is the root."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError(f"fs-path {text!r} must be an absolute path")
    if text == "/":
        return "/"
    body = text[1:-1] if text.endswith("/") else text[1:]
    try:
        for segment in body.split("/"):
            validate_name(segment)
    except ValueError as exc:
        raise ValueError(f"fs-path {text!r}: {exc}") from None
    if len(body.encode()) + 1 > MAX_FS_PATH_BYTES:
        raise ValueError(f"fs-path is longer than {MAX_FS_PATH_BYTES} bytes")
    return "/" + body


def validate_subpath(text: str) -> str:
    """A relative path of 1-8 valid segments (the volume's directory below fs-path)."""
    if not isinstance(text, str) or not text:
        raise ValueError("subpath is empty")
    if text.startswith("/"):
        raise ValueError(f"subpath {text!r} must be relative")
    segments = text.split("/")
    if len(segments) > MAX_SUBPATH_SEGMENTS:
        raise ValueError(f"subpath {text!r} has more than {MAX_SUBPATH_SEGMENTS} segments")
    try:
        for segment in segments:
            validate_name(segment)
    except ValueError as exc:
        raise ValueError(f"subpath {text!r}: {exc}") from None
    return text


def join(fs_path: str, subpath: str) -> str:
    return f"{fs_path.rstrip('/')}/{subpath}"


def _escape(text: str) -> str:
    return "".join(_ESCAPE.get(ch, ch) for ch in text)


def _unescape(text: str) -> str:
    if "%" in _ESCAPED.sub("", text):
        raise ValueError("stray '%' in volume id")
    return _ESCAPED.sub(lambda m: "%" if m.group(1) == "25" else ";", text)


def validate_address(engine: str, text: str) -> str:
    """An engine's public cluster address as a volume id carries it: the embedded cluster's
    master-addrs normalised; any other engine's address as its engine wrote it."""
    if engine not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINE_NAMES)})")
    if engine == EMBEDDED:
        return normalize_master_addrs(text)
    if not isinstance(text, str) or not text:
        raise ValueError(f"{engine} cluster address is empty")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise ValueError(f"{engine} cluster address contains control characters")
    return text


@dataclass(frozen=True)
class VolumeRef:
    """Where a volume lives (which engine, which cluster, which directory), what
    DeleteVolume does with it and (`name_digest`, empty in version 1 ids) which CreateVolume
    made it. `address` is the engine's public name of the cluster (for the embedded one its
    master-addrs)."""

    address: str
    fs_path: str
    subpath: str
    on_delete: str = "delete"
    name_digest: str = ""
    engine: str = EMBEDDED

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", validate_address(self.engine, self.address))
        object.__setattr__(self, "fs_path", normalize_fs_path(self.fs_path))
        validate_subpath(self.subpath)
        if self.on_delete not in ON_DELETE_CODES:
            raise ValueError(f"on-delete {self.on_delete!r}: expected one of delete|retain|archive")
        if self.name_digest and not _DIGEST.match(self.name_digest):
            raise ValueError(f"name digest {self.name_digest!r}: expected {NAME_DIGEST_CHARS} hex")
        if self.engine != EMBEDDED and not self.name_digest:
            raise ValueError(f"a {self.engine} volume id needs a name digest")

    @property
    def master_addrs(self) -> str:
        """The embedded cluster's name for `address` (its masters)."""
        return self.address

    @property
    def path(self) -> str:
        """The volume's directory from the cluster root."""
        return join(self.fs_path, self.subpath)

    @property
    def parent_path(self) -> str:
        return self.path.rsplit("/", 1)[0] or "/"

    @property
    def name(self) -> str:
        """The directory's own name (the last segment of subpath)."""
        return self.subpath.rsplit("/", 1)[-1]

    def volume_id(self) -> str:
        text = _id_text(
            self.on_delete, self.name_digest, self.address, self.fs_path, self.subpath, self.engine
        )
        size = len(text.encode())
        if size > MAX_VOLUME_ID:
            raise ValueError(
                f"volume id would be {size} bytes, more than {MAX_VOLUME_ID}: "
                "shorten the cluster address, fs-path or the directory name"
            )
        return text

    @classmethod
    def from_volume_id(cls, text: str) -> VolumeRef:
        """The volume an id names; ValueError unless it is one CreateVolume could have
        answered (which includes: its canonical form fits in 128 bytes)."""
        parts = text.split(";") if isinstance(text, str) else []
        engine = EMBEDDED
        if parts[:1] == [ID_VERSION_ENGINE] and len(parts) == 7:
            engine = _unescape(parts.pop(1))
            if engine == EMBEDDED:  # its ids are version 2: no second spelling of one id
                raise ValueError(f"not a fusecsi volume id: {text!r}")
            parts[0] = ID_VERSION
        if parts[:1] == [ID_VERSION_PATH_ONLY]:
            parts.insert(2, "")  # no name digest
        elif parts[:1] != [ID_VERSION] or len(parts) < 3 or not parts[2]:
            raise ValueError(f"not a fusecsi volume id: {text!r}")
        if len(parts) != 6:
            raise ValueError(f"not a fusecsi volume id: {text!r}")
        on_delete = _ON_DELETE_NAMES.get(parts[1])
        if on_delete is None:
            raise ValueError(f"volume id {text!r}: unknown on-delete code {parts[1]!r}")
        address, fs_path, subpath = (_unescape(p) for p in parts[3:])
        ref = cls(address, fs_path, subpath, on_delete, parts[2], engine)
        ref.volume_id()  # one CreateVolume could not have answered: ValueError
        return ref

    def same_but_digest(self, other: VolumeRef) -> bool:
        """The same directory and policy, whichever CreateVolume made it."""
        return replace(other, name_digest=self.name_digest) == self

    def context(self, options: mount_options.MountOptions | None) -> dict[str, str]:
        """What the node needs besides another engine's own StorageClass parameters
        (`options`: the embedded daemon's, None for other engines)."""
        context = {CTX_ENGINE: self.engine}
        if self.engine == EMBEDDED:
            context[CTX_MASTER_ADDRS] = self.address
        context.update({CTX_FS_PATH: self.fs_path, CTX_SUBPATH: self.subpath})
        if options is not None:
            context[CTX_OPTIONS] = options.to_arg()
        return context


def _id_text(
    on_delete: str,
    digest: str,
    address: str,
    fs_path: str,
    subpath: str,
    engine: str = EMBEDDED,
) -> str:
    code = ON_DELETE_CODES[on_delete]
    if engine != EMBEDDED:
        version = [ID_VERSION_ENGINE, _escape(engine), code, digest]
    elif digest:
        version = [ID_VERSION, code, digest]
    else:
        version = [ID_VERSION_PATH_ONLY, code]
    return ";".join([*version, *map(_escape, (address, fs_path, subpath))])


def default_subpath(
    name: str, address: str, fs_path: str, on_delete: str, engine: str = EMBEDDED
) -> str:
    """The directory for a volume without a path-pattern: its (PV) name, shortened with a
    hash of the whole name when the volume id would not fit otherwise (names may be longer
    than the id allows; Kubernetes' pvc-<uuid> names always fit)."""
    validate_name(name)
    room = _id_text(on_delete, "0" * NAME_DIGEST_CHARS, address, fs_path, "", engine)
    budget = MAX_VOLUME_ID - len(room.encode())
    if len(_escape(name).encode()) <= budget:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    keep = budget - len(digest) - 1
    if keep < 1:
        raise ValueError("the cluster address and fs-path leave no room for a directory name")
    prefix = ""
    for ch in name:
        if len(_escape(prefix + ch).encode()) > keep:
            break
        prefix += ch
    return f"{prefix}-{digest}"


# path-pattern: ${pvc.metadata.namespace}, ${pvc.metadata.name}, ${pv.metadata.name},
# ${pvc.metadata.labels.KEY}, ${pvc.metadata.annotations.KEY}
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_METADATA_KEYS = {
    "pvc.metadata.namespace": PVC_NAMESPACE,
    "pvc.metadata.name": PVC_NAME,
    "pv.metadata.name": PV_NAME,
}
_LOOKUPS = ("pvc.metadata.labels.", "pvc.metadata.annotations.")


@dataclass(frozen=True)
class PathPattern:
    text: str
    placeholders: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        if not text:
            raise ValueError("path-pattern is empty")
        names = _PLACEHOLDER.findall(text)
        if "${" in _PLACEHOLDER.sub("", text):
            raise ValueError(f"path-pattern {text!r}: unclosed '${{'")
        for name in names:
            lookup = next((p for p in _LOOKUPS if name.startswith(p)), None)
            if name not in _METADATA_KEYS and not (lookup and len(name) > len(lookup)):
                raise ValueError(
                    f"path-pattern {text!r}: unknown placeholder ${{{name}}} (known: "
                    "pvc.metadata.namespace, pvc.metadata.name, pv.metadata.name, "
                    "pvc.metadata.labels.KEY, pvc.metadata.annotations.KEY)"
                )
        return cls(text, tuple(names))

    @property
    def needs_api(self) -> bool:
        """True when labels or annotations must be read from the Kubernetes API."""
        return any(name.startswith(_LOOKUPS) for name in self.placeholders)

    def expand(
        self,
        metadata: Mapping[str, str],
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> str:
        """The subpath this pattern produces; ValueError if a value is missing or the
        result is not a valid relative path inside fs-path."""

        def value(match: re.Match) -> str:
            name = match.group(1)
            if name in _METADATA_KEYS:
                found = metadata.get(_METADATA_KEYS[name])
                if not found:
                    raise ValueError(
                        f"path-pattern uses ${{{name}}} but the request has no "
                        f"{_METADATA_KEYS[name]} (run external-provisioner with "
                        "--extra-create-metadata)"
                    )
                return found
            kind, key = name[len("pvc.metadata.") :].split(".", 1)
            table = (labels if kind == "labels" else annotations) or {}
            if key not in table:
                raise ValueError(
                    f"path-pattern uses ${{{name}}} but the PVC has no such {kind[:-1]}"
                )
            return table[key]

        produced = _PLACEHOLDER.sub(value, self.text)
        try:
            return validate_subpath(produced)
        except ValueError as exc:
            raise ValueError(
                f"path-pattern {self.text!r} produced an invalid path: {exc}"
            ) from None


@dataclass(frozen=True)
class VolumeParams:
    """StorageClass parameters (or a PV's volumeAttributes), validated.

    For the embedded engine `master_addrs` names the cluster; any other engine's cluster is
    named by `engine_params` (every parameter that is not fusecsi's own, handed to that
    engine's `parse_cluster` as they are, which refuses what it does not know).
    """

    master_addrs: str | None
    fs_path: str = "/"
    on_delete: str = "delete"
    pattern: PathPattern | None = None
    # the embedded FUSE daemon's options (None for another engine: its own parameters)
    options: mount_options.MountOptions | None = mount_options.DEFAULTS
    # what external-provisioner sent under csi.storage.k8s.io/ (consumed, never passed on)
    metadata: dict[str, str] = field(default_factory=dict)
    engine: str = EMBEDDED
    engine_params: dict[str, str] = field(default_factory=dict)
    # another engine's mount options, canonical `k=v,...` (see fusecsi/engines/options.py)
    engine_options: str = ""

    @property
    def cluster_params(self) -> dict[str, str]:
        """The parameters that name the cluster (what `parse_cluster` gets)."""
        if self.engine == EMBEDDED:
            return {} if self.master_addrs is None else {P_MASTER_ADDRS: self.master_addrs}
        return dict(self.engine_params)

    def subpath_for(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        *,
        address: str | None = None,
    ) -> str:
        """The volume's directory below fs-path; `address` is the cluster's (default: the
        master-addrs), which a default directory name must leave room for in the id."""
        if self.pattern is None:
            if address is None:
                address = self.master_addrs or ""
            return default_subpath(name, address, self.fs_path, self.on_delete, self.engine)
        metadata = {PV_NAME: name, **self.metadata}
        return self.pattern.expand(metadata, labels, annotations)

    def ref(self, subpath: str, name: str, *, address: str | None = None) -> VolumeRef:
        """The volume CreateVolume `name` makes at `subpath` (on the cluster at `address`;
        default: the master-addrs)."""
        if address is None:
            if self.master_addrs is None:
                raise ValueError(f"{P_MASTER_ADDRS} is required")
            address = self.master_addrs
        return VolumeRef(
            address, self.fs_path, subpath, self.on_delete, name_digest(name), self.engine
        )

    def context(self, ref: VolumeRef) -> dict[str, str]:
        """The volume context for the node: the engine's own parameters, then ours."""
        context = {**self.engine_params, **ref.context(self.options)}
        if self.engine_options:
            context[CTX_OPTIONS] = self.engine_options
        return context


def parse_parameters(
    params: Mapping[str, str], *, require_master: bool = True, node_engine=None
) -> VolumeParams:
    """Validate CreateVolume/GetCapacity parameters; ValueError names the offending key.
    `require_master`: the embedded engine's master-addrs must be there; `node_engine`: the
    registry's lookup (the controller passes its own)."""
    ours = {k: v for k, v in params.items() if not k.startswith(RESERVED_PREFIX)}
    metadata = {k: v for k, v in params.items() if k.startswith(RESERVED_PREFIX)}
    engine = ours.pop(P_ENGINE, DEFAULT_ENGINE)
    if engine not in ENGINE_NAMES:
        raise ValueError(
            f"parameter {P_ENGINE}={engine!r}: unknown engine (known: {', '.join(ENGINE_NAMES)})"
        )
    fs_path = normalize_fs_path(ours.pop(P_FS_PATH, "/"))
    on_delete = ours.pop(P_ON_DELETE, "delete")
    if on_delete not in ON_DELETE_CODES:
        raise ValueError(f"parameter {P_ON_DELETE}={on_delete!r}: expected delete|retain|archive")
    pattern_text = ours.pop(P_PATH_PATTERN, None)
    pattern = None if pattern_text is None else PathPattern.parse(pattern_text)
    if engine != EMBEDDED:
        # the rest is the engine's: what names its cluster (its parse_cluster checks that)
        # and its mount options, checked here so a typo is refused before any pod needs it
        from fusecsi import engines
        from fusecsi.engines.options import split_parameters

        cluster, options = split_parameters((node_engine or engines.node_engine)(engine), ours)
        return VolumeParams(
            None,
            fs_path,
            on_delete,
            pattern,
            None,
            metadata,
            engine=engine,
            engine_params=cluster,
            engine_options=options,
        )
    addrs_text = ours.pop(P_MASTER_ADDRS, None)
    if addrs_text is None and require_master:
        raise ValueError(f"parameter {P_MASTER_ADDRS} is required (host:port[,host:port])")
    master_addrs = None if addrs_text is None else normalize_master_addrs(addrs_text)
    unknown = sorted(k for k in ours if k not in mount_options.OPTIONS)
    if unknown:
        allowed = [
            P_ENGINE,
            P_MASTER_ADDRS,
            P_FS_PATH,
            P_PATH_PATTERN,
            P_ON_DELETE,
            *mount_options.OPTIONS,
        ]
        raise ValueError(f"unknown parameter {unknown[0]!r} (allowed: {', '.join(allowed)})")
    options = mount_options.parse(ours)
    return VolumeParams(master_addrs, fs_path, on_delete, pattern, options, metadata)
