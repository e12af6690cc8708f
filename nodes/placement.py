"""Placement of a new topic's partitions over the live nodes. Pure.

Each partition goes to the live node holding the fewest partitions so far (ties to the lowest id), so
topics created one after another still spread evenly over the cluster. Placement names one owner per
partition today; replication will turn each entry into a replica list with the owner first.
"""

from __future__ import annotations


def place(partition_count: int, live_node_ids: list[int], load: dict[int, int]) -> list[int]:
    """Owners for partitions 0..partition_count-1. ``load``: partitions each node already owns."""
    assert partition_count > 0 and live_node_ids
    counts = {node_id: load.get(node_id, 0) for node_id in live_node_ids}
    owners = []
    for _ in range(partition_count):
        node_id = min(counts, key=lambda n: (counts[n], n))
        owners.append(node_id)
        counts[node_id] += 1
    return owners


def node_load(topics: dict) -> dict[int, int]:
    load: dict[int, int] = {}
    for topic in topics.values():
        for owner in topic["partitions"]:
            load[owner] = load.get(owner, 0) + 1
    return load
