"""volkin-csi: the Kubernetes CSI driver, a thin shim on the controller's admin API.

One module per CSI service (`identity`, `controller`, `node`); the servicers only convert
between CSI messages and admin API calls. `attach` gives the node a block device for a
volume's NBD export, `mounts` makes and mounts its file system, `names` maps CSI names to
volkin names and pages lists, `requests` holds the rules of requests (capacity,
capabilities).
"""

from __future__ import annotations

# The names the deployment uses too (deploy/): keep them in one place.
DRIVER_NAME = "csi.volkin.io"
TOPOLOGY_KEY = "topology.csi.volkin.io/node"
# StorageClass parameter: the new volume's block size in bytes (optional).
PARAM_BLOCK_SIZE = "blockSize"
