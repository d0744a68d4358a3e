"""Checks of what kubelet hands the node side: volume ids and target paths (ValueError with
the reason). mountd applies them (it makes the mounts); the node plugin too, to answer
INVALID_ARGUMENT without a round trip."""

from __future__ import annotations

import os

MAX_VOLUME_ID = 128  # bytes: the CSI spec's limit, and what the controller's ids fit in
MAX_PATH = 4095  # bytes, as PATH_MAX less the NUL
MAX_NAME = 255
# kubelet's target for a CSI persistent volume: <kubelet>/pods/<pod uid>/volumes/
# kubernetes.io~csi/<pv name>/mount (nothing above it: a bind on <kubelet>/pods would hide
# other pods' volumes)
TARGET_SHAPE = ("pods", None, "volumes", "kubernetes.io~csi", None, "mount")


def check_volume_id(volume_id) -> str:
    if not isinstance(volume_id, str) or not volume_id:
        raise ValueError("volume_id is empty")
    size = len(volume_id.encode(errors="surrogatepass"))
    if size > MAX_VOLUME_ID:
        raise ValueError(f"volume_id is {size} bytes long; at most {MAX_VOLUME_ID}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in volume_id):
        raise ValueError(f"volume_id {volume_id!r} contains NUL or control characters")
    if ".." in volume_id.replace(";", "/").split("/"):
        raise ValueError(f"volume_id {volume_id!r} contains a '..' segment")
    return volume_id


def check_path(path) -> str:
    """An absolute path the kernel can take: no NUL, not too long."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValueError(f"{path!r:.80} is not an absolute path")
    encoded = os.fsencode(path)
    if len(encoded) > MAX_PATH or any(len(name) > MAX_NAME for name in encoded.split(b"/")):
        raise ValueError(
            f"path of {len(encoded)} bytes is too long (at most {MAX_PATH}, {MAX_NAME} per name)"
        )
    return path


def check_target_shape(relative: str) -> None:
    """`relative` (below the kubelet dir) must be kubelet's CSI target for one pod's volume."""
    parts = relative.split("/")
    if len(parts) != len(TARGET_SHAPE) or any(
        part in ("", ".", "..") or (want is not None and part != want)
        for part, want in zip(parts, TARGET_SHAPE, strict=True)
    ):
        raise ValueError(
            f"target {relative!r} below the kubelet dir is not "
            "pods/<pod uid>/volumes/kubernetes.io~csi/<pv name>/mount"
        )
