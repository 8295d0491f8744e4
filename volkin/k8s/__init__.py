"""Kubernetes side of volkin that is not the CSI driver: the VolumeRefresh operator.

`decision` is the pure core (what a VolumeRefresh needs next), `resource` converts the
custom resource's dicts to and from it, `volkin_state` and `kube` read the admin API and
the Kubernetes API, and `operator` wires them into kopf handlers.
"""

GROUP = "volkin.io"
VERSION = "v1alpha1"
PLURAL = "volumerefreshes"
KIND = "VolumeRefresh"
# Must match the CSI driver's name (volkin-csi) and the CSIDriver object in deploy/.
CSI_DRIVER = "csi.volkin.io"
