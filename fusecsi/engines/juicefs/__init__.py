"""JuiceFS: an existing JuiceFS filesystem, named by its metadata URL (from the CSI secret).

- node (mountd): one foreground `juicefs mount --subdir <fs-path>` per key (node.py);
- controller: directories and tags through a private mount, quotas through
  `juicefs quota` (namespace.py, privmount.py).

The operator's side (format, secret, StorageClass, options) is docs/engines/juicefs.md.
"""

from __future__ import annotations

from fusecsi.engines.base import Cluster, Namespace
from fusecsi.engines.juicefs.node import JuiceFSNode

NODE = JuiceFSNode()


def open_namespace(cluster: Cluster, *, timeout: float) -> Namespace:
    from fusecsi.engines.juicefs.namespace import JuiceFSNamespace

    return JuiceFSNamespace(cluster, timeout=timeout)
