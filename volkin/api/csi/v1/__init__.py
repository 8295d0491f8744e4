"""Generated from proto/csi/v1/csi.proto by proto/generate: do not edit."""
