"""The checks and rules of CSI requests that need no I/O: capabilities and capacity."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from volkin import config
from volkin.api.csi.v1 import csi_pb2
from volkin.csi import PARAM_BLOCK_SIZE
from volkin.errors import InvalidArgument, OutOfRange

Mode = csi_pb2.VolumeCapability.AccessMode
# A volkin volume is one NBD export that one node attaches: every mode that keeps the
# volume on a single node. Several writers on one node share the node's one attachment.
SINGLE_NODE_MODES = frozenset({Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                               Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER})
FILE_SYSTEMS = ("ext4", "xfs")
DEFAULT_FS = "ext4"
# The size of a volume whose request names no capacity.
DEFAULT_SIZE = 1 << 30


def capability_problem(cap: csi_pb2.VolumeCapability) -> str:
    """Why volkin cannot serve this capability, or "" if it can."""
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        return "a volume capability needs an access mode"
    if cap.access_mode.mode not in SINGLE_NODE_MODES:
        return (f"access mode {Mode.Mode.Name(cap.access_mode.mode)} is not supported: a volkin "
                "volume is attached on one node at a time (use a SINGLE_NODE_* mode)")
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "a volume capability needs an access type, block or mount"
    if kind == "mount" and cap.mount.fs_type and cap.mount.fs_type not in FILE_SYSTEMS:
        return (f"file system {cap.mount.fs_type!r} is not supported: use "
                f"{' or '.join(FILE_SYSTEMS)}")
    return ""


def check_capabilities(caps: Iterable[csi_pb2.VolumeCapability]) -> None:
    """Raises InvalidArgument unless there is at least one capability and volkin serves all."""
    caps = list(caps)
    if not caps:
        raise InvalidArgument("volume_capabilities is required")
    for cap in caps:
        problem = capability_problem(cap)
        if problem:
            raise InvalidArgument(problem)


def block_size(parameters: Mapping[str, str], default: int) -> int:
    """The block size a CreateVolume's parameters ask for (`blockSize`), else `default`."""
    unknown = sorted(set(parameters) - {PARAM_BLOCK_SIZE})
    # The CO's own keys (csi.storage.k8s.io/…) are passed through by the provisioner.
    unknown = [k for k in unknown if not k.startswith("csi.storage.k8s.io/")]
    if unknown:
        raise InvalidArgument(f"unknown parameters {unknown}: volkin takes {PARAM_BLOCK_SIZE}")
    raw = parameters.get(PARAM_BLOCK_SIZE)
    if raw is None:
        return default
    try:
        size = int(raw)
    except ValueError:
        raise InvalidArgument(f"parameter {PARAM_BLOCK_SIZE}={raw!r} is not a number of "
                              "bytes") from None
    config.check_block_size(size)
    return size


@dataclass(frozen=True)
class Capacity:
    """A CSI capacity range: 0 means unset."""

    required: int
    limit: int

    @classmethod
    def of(cls, request_range: csi_pb2.CapacityRange | None) -> Capacity:
        if request_range is None:
            return cls(0, 0)
        required, limit = request_range.required_bytes, request_range.limit_bytes
        if required < 0 or limit < 0:
            raise InvalidArgument("capacity_range must not be negative")
        if limit and required > limit:
            raise InvalidArgument(f"capacity_range asks for at least {required} bytes and at "
                                  f"most {limit}")
        return cls(required, limit)

    def fits(self, size: int) -> bool:
        return size >= self.required and (not self.limit or size <= self.limit)

    def size(self, block: int) -> int:
        """The volume size to create: the required bytes rounded up to whole blocks (a
        default when none are asked for), never past the limit."""
        wanted = self.required or min(DEFAULT_SIZE, self.limit or DEFAULT_SIZE)
        size = -(-wanted // block) * block
        if self.limit and size > self.limit:
            size = self.limit // block * block
        if size == 0 or not self.fits(size):
            raise OutOfRange(f"no whole number of {block}-byte blocks lies in the capacity "
                             f"range [{self.required}, {self.limit or 'no limit'}]")
        return size
