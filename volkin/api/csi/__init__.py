"""Stubs generated from proto/csi/v1 (see proto/generate)."""
