"""The oracle: what every read must return, by the plainest possible definition.

Every volume is a plain list of blocks. A snapshot is a full copy made at that
instant; so is a refresh (the target's blocks are replaced by the source's).
No maps, no sharing, no background copy: if the engine ever disagrees with
this model about a read, the engine is wrong.
"""

from __future__ import annotations


class ReferenceModel:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.volumes: dict[str, list[bytes]] = {}

    def create_volume(self, name: str, size_blocks: int) -> None:
        self.volumes[name] = [bytes(self.block_size)] * size_blocks

    def create_snapshot(self, source: str, name: str) -> None:
        self.volumes[name] = list(self.volumes[source])

    def refresh(self, target: str, source: str) -> None:
        self.volumes[target] = list(self.volumes[source])

    def resize(self, name: str, size_blocks: int) -> None:
        """A volume grows: its new blocks hold zeros."""
        blocks = self.volumes[name]
        blocks.extend([bytes(self.block_size)] * (size_blocks - len(blocks)))

    def delete(self, name: str) -> None:
        del self.volumes[name]

    def write(self, name: str, block: int, offset: int, data: bytes) -> None:
        old = self.volumes[name][block]
        self.volumes[name][block] = old[:offset] + data + old[offset + len(data):]

    def read(self, name: str, block: int) -> bytes:
        return self.volumes[name][block]
