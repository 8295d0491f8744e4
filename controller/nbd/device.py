"""What the NBD server needs of the storage behind it: a small block-device interface.

The server (`controller.nbd.server`) knows exports and byte ranges, nothing of
maps, plans or agents; `controller.volumes` implements this on the controller's
core, and the tests implement it on a bytearray, so the server can be tested and
fuzzed without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from controller.nbd.protocol import ExportInfo
from volkin.blockwire import Data


class Volume(Protocol):
    """One open volume: a fixed-size array of bytes with a durability barrier."""

    @property
    def export(self) -> ExportInfo:
        """The name, size and preferred block size negotiated when it was opened."""
        ...

    def check(self) -> None:
        """Raises NotFound if the volume this was opened on no longer exists (it may have
        been deleted, and another created under its name)."""
        ...

    async def read(self, offset: int, length: int) -> Data:
        """The bytes of [offset, offset + length)."""
        ...

    async def write(self, offset: int, data: Data, fua: bool) -> None:
        """Writes; with `fua` the data is durable before this returns."""
        ...

    async def zero(self, offset: int, length: int, fua: bool, fast: bool = False) -> bool:
        """Makes the range read as zeros, of any length inside the volume. With `fast`,
        only if that is quicker than writing zeros: False (and nothing changed) if not."""
        ...

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Gives back the space of whole blocks inside the range, which then read as
        zeros (a block a snapshot still reads through is preserved first); the rest of
        the range is left as it is, as the protocol allows of a trim."""
        ...

    async def flush(self) -> None:
        """Every write completed before this call is durable when it returns."""
        ...

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation of [offset, offset + length): (length, flags) runs from `offset`
        on, flags of `controller.nbd.protocol` STATE_HOLE and STATE_ZERO; they may cover
        less than `length` (the client asks again for the rest)."""
        ...


class Device(Protocol):
    """The volumes a server exports, and the gate every acknowledgement passes."""

    def exports(self) -> Mapping[str, ExportInfo]:
        """The exports by name; looking one up must not cost the whole list."""
        ...

    def open(self, name: str) -> Volume:
        """The volume `name` as it is now; KeyError if there is none."""
        ...

    async def acknowledge(self, timeout: float) -> None:
        """Returns once an answer may be sent (the controller can prove it still leads);
        raises `controller.fence.Deposed` if it never will, `Unavailable` on timeout."""
        ...
