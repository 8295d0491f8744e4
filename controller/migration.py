"""Moves a cluster written by the previous layout of etcd keys to records.

The previous layout kept the whole graph in one value (`Keys.topology`: volumes,
nodes, intervals, reference points, every map's size and default) and the whole
placement in another (`Keys.placement`); map segments had the keys they still
have. The first controller of this version that takes over such a prefix writes
one record per volume, node, map, reference point and released memory, and one
placement record per memory, in transactions of at most `BATCH` keys (etcd's
default limit is 128 operations), all guarded by its term's fence; then one last
transaction stores the layout marker and deletes the two old values. A crash
before that last transaction leaves the old values in place and the next
controller migrates again from them (the records are rewritten with the same
values); after it, nothing is left to do.
"""

from __future__ import annotations

import json
import logging
import zlib

from controller.guarded import GuardedEtcd
from controller.mapstore import LAYOUT
from controller.placement import single_extent_record
from volkin.engine import records
from volkin.engine.persist import EngineState, load
from volkin.keys import Keys
from volkin.log import event

_log = logging.getLogger("controller.migration")
BATCH = 100


async def migrate(etcd: GuardedEtcd, keys: Keys) -> bool:
    """Migrates the prefix if it holds the previous layout; returns whether it did."""
    raw = etcd.etcd
    if await raw.get(keys.layout) is not None:
        return False
    topology = await raw.get(keys.topology)
    placement = await raw.get(keys.placement)
    if topology is None and placement is None:
        return False
    put: dict[str, bytes] = {}
    volumes = 0
    if topology is not None:
        old = json.loads(topology)
        state = EngineState(old["topology"], {m: (int(size), bool(default))
                                              for m, (size, default) in old["maps"].items()})
        for key, value in (await raw.get_prefix(keys.maps)).items():
            map_id, _, index = key[len(keys.maps):].rpartition("/")
            state.segments[(map_id, int(index))] = zlib.decompress(value)
        graph = load(state).graph
        volumes = len(graph.volumes)
        for (kind, name), record in records.records(graph).items():
            put[keys.record(kind, name)] = json.dumps(record, sort_keys=True).encode()
    extents = 0
    if placement is not None:
        for memory, (node_id, extent_id) in json.loads(placement)["extents"].items():
            put[keys.extent(memory)] = single_extent_record(str(node_id), str(extent_id))
            extents += 1
    items = sorted(put.items())
    for start in range(0, len(items), BATCH):
        await etcd.txn(dict(items[start:start + BATCH]))
    await etcd.txn({keys.layout: json.dumps({"layout": LAYOUT}).encode()},
                   [k for k, v in ((keys.topology, topology), (keys.placement, placement))
                    if v is not None])
    event(_log, "etcd.migrated", prefix=keys.prefix, layout=LAYOUT, volumes=volumes,
          extents=extents, keys=len(put))
    return True
