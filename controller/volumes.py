"""The controller's volumes as block devices: the NBD server's view of the core.

`CoreDevice` implements `controller.nbd.device.Device` on `controller.core.Core`:
exports are looked up one at a time in the engine (a volume being created is not
shown until it is stored), an open volume is bound to the volume's unique id, and
an acknowledgement waits for the term's fence.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from controller.core import Core
from controller.nbd import protocol as p
from controller.nbd.protocol import ExportInfo
from volkin.blockwire import Data


class Exports(Mapping[str, ExportInfo]):
    """The volumes as NBD exports, looked up one at a time: a client's NBD_OPT_GO must
    not build the list of 10,000 volumes (only NBD_OPT_LIST walks them)."""

    def __init__(self, core: Core) -> None:
        self._core = core

    def __getitem__(self, name: str) -> ExportInfo:
        volume = self._core.engine.graph.volumes.get(name)
        if volume is None or name in self._core.hidden:
            raise KeyError(name)
        return ExportInfo(name, volume.size_blocks * volume.block_size, volume.block_size)

    def __iter__(self) -> Iterator[str]:
        return (n for n in sorted(self._core.engine.graph.volumes) if n not in self._core.hidden)

    def __len__(self) -> int:
        return len(self._core.engine.graph.volumes) - len(self._core.hidden)


class CoreVolume:
    def __init__(self, core: Core, export: ExportInfo, uid: int) -> None:
        self._core = core
        self._export = export
        self._uid = uid

    @property
    def export(self) -> ExportInfo:
        return self._export

    def check(self) -> None:
        self._core.require(self._export.name, self._uid)

    async def read(self, offset: int, length: int) -> Data:
        self._core.foreground_at = time.monotonic()
        return await self._core.read(self._export.name, offset, length)

    async def write(self, offset: int, data: Data, fua: bool) -> None:
        self._core.foreground_at = time.monotonic()
        await self._core.write(self._export.name, offset, data, fua)

    async def zero(self, offset: int, length: int, fua: bool, fast: bool = False) -> bool:
        self._core.foreground_at = time.monotonic()
        return await self._core.zero(self._export.name, offset, length, fua, fast)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self._core.foreground_at = time.monotonic()
        await self._core.zero(self._export.name, offset, length, fua, punch=True)

    async def flush(self) -> None:
        self._core.foreground_at = time.monotonic()
        await self._core.flush(self._export.name)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(n, p.STATE_HOLE | p.STATE_ZERO if hole else 0)
                for n, hole in await self._core.allocation(self._export.name, offset, length)]


class CoreDevice:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._exports = Exports(core)

    def exports(self) -> Mapping[str, ExportInfo]:
        return self._exports

    def open(self, name: str) -> CoreVolume:
        export = self._exports[name]
        uid, _ = self.core.identity(name)
        return CoreVolume(self.core, export, uid)

    async def acknowledge(self, timeout: float) -> None:
        await self.core.fence.ready(timeout)
