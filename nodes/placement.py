"""Placement of a new topic's partition replicas over the live nodes. Pure.

Each partition's leader is the live node leading the fewest partitions so far, then holding the fewest
replicas (ties to the lowest id); its followers are the other live nodes holding the fewest replicas,
ties going to the nodes next after the leader in id order. So topics created one after another spread
leaders and replicas evenly, and a node's failure moves its leaderships to different nodes.
"""

from __future__ import annotations


def place(partition_count: int, replication_factor: int, live_node_ids: list[int],
          leader_load: dict[int, int], replica_load: dict[int, int]) -> list[list[int]]:
    """Replica lists (leader first) for partitions 0..partition_count-1. The loads count what each node
    already leads and holds."""
    live = sorted(live_node_ids)
    assert partition_count > 0 and 1 <= replication_factor <= len(live)
    leads = {n: leader_load.get(n, 0) for n in live}
    holds = {n: replica_load.get(n, 0) for n in live}
    out = []
    for _ in range(partition_count):
        leader = min(live, key=lambda n: (leads[n], holds[n], n))
        at = live.index(leader)
        ring = live[at + 1:] + live[:at]  # the others, in id order after the leader
        followers = sorted(ring, key=lambda n: (holds[n], ring.index(n)))[:replication_factor - 1]
        replicas = [leader, *followers]
        leads[leader] += 1
        for n in replicas:
            holds[n] += 1
        out.append(replicas)
    return out


def loads(topics: dict) -> tuple[dict[int, int], dict[int, int]]:
    """(partitions each node leads, replicas each node holds) over ``topics``."""
    leader_load: dict[int, int] = {}
    replica_load: dict[int, int] = {}
    for topic in topics.values():
        for partition in topic["partitions"]:
            replicas = partition["replicas"]
            leader_load[replicas[0]] = leader_load.get(replicas[0], 0) + 1
            for n in replicas:
                replica_load[n] = replica_load.get(n, 0) + 1
    return leader_load, replica_load
