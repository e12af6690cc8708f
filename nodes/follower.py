"""A node's fetches from the leaders of the partitions it follows: one DEALER and at most one replica fetch
out per leader (as Kafka's replica fetcher threads, in the node's one loop).

This module owns the connections and what is in flight; the node owns the logs and decides what a reply
means (nodes/node.py ``_replica_fetched``). A link sends as soon as it has no fetch out, so a follower's
next fetch, which reports its new log end to the leader, leaves right after it stored the last one.
"""

from __future__ import annotations

import time

import zmq

from bus import wire
from bus.connection import Connection, next_request_id

REPLICA_FETCH_WAIT_MS = 500  # how long a leader holds a follower's fetch that finds nothing new
REPLICA_FETCH_BYTES_MAX = 16 << 20  # per request
REPLICA_FETCH_PART_BYTES_MAX = 8 << 20  # per partition
REPLICA_FETCH_TIMEOUT_MS = 3_000  # beyond the wait: a fetch unanswered this long is sent again
RETRY_BACKOFF_MS = 100  # after an error from a leader, before asking it again


class Link:
    __slots__ = ("leader", "connection", "tps", "outstanding", "not_before_s")

    def __init__(self, leader: int, connection: Connection):
        self.leader = leader
        self.connection = connection
        self.tps: set[tuple] = set()  # partitions followed from this leader
        self.outstanding = None  # (request id, deadline_s) of the fetch in flight
        self.not_before_s = 0.0  # back-off after an error


class FollowerLinks:
    def __init__(self, context: zmq.Context, node_id: int, instance: str):
        self.context = context
        self.node_id = node_id
        self.instance = instance
        self.links: dict[int, Link] = {}

    def follow(self, wanted: dict[tuple, int], addresses: dict[int, str]) -> None:
        """Follow each partition of ``wanted`` ({tp: leader node id}) from its leader, and nothing else."""
        by_leader: dict[int, set] = {}
        for tp, leader in wanted.items():
            by_leader.setdefault(leader, set()).add(tp)
        for leader in list(self.links):
            link = self.links[leader]
            if leader not in by_leader or addresses.get(leader) != link.connection.address:
                link.connection.close()
                del self.links[leader]
        for leader, tps in by_leader.items():
            address = addresses.get(leader)
            if address is None:
                continue  # not yet known: the next placement brings it
            link = self.links.get(leader)
            if link is None:
                link = self.links[leader] = Link(leader, Connection(self.context, address))
            if link.tps != tps:
                link.tps = tps
                link.outstanding = None  # ask again at once with the new set (a late reply is dropped by id)

    def sockets(self) -> list:
        return [link.connection.socket for link in self.links.values()]

    def send_due(self, now_s: float, parts_for) -> None:
        """Send a fetch on every link with none out; ``parts_for(tps)`` gives its parts, in wire form."""
        for link in self.links.values():
            if link.outstanding is not None and link.outstanding[1] > now_s:
                continue
            if not link.tps or now_s < link.not_before_s:
                continue
            parts = parts_for(sorted(link.tps))
            if not parts:
                continue
            request_id = next_request_id()
            args = {"replica_id": self.node_id, "incarnation": self.instance, "max_wait_ms": REPLICA_FETCH_WAIT_MS,
                    "max_bytes": REPLICA_FETCH_BYTES_MAX, "parts": parts}
            try:
                link.connection.send(wire.REPLICA_FETCH, args, request_id=request_id)
            except zmq.ZMQError:
                link.not_before_s = now_s + RETRY_BACKOFF_MS / 1000
                continue
            link.outstanding = (request_id, now_s + (REPLICA_FETCH_WAIT_MS + REPLICA_FETCH_TIMEOUT_MS) / 1000)

    def replies(self, ready) -> list:
        """(link, error, result, bulk) for each reply to a fetch still out, on the sockets in ``ready``."""
        out = []
        for link in list(self.links.values()):
            socket = link.connection.socket
            if socket not in ready:
                continue
            while socket.poll(0):
                try:
                    request_id, error, result, bulk = link.connection.recv()
                except Exception:
                    continue  # undecodable: the fetch times out and is sent again
                if link.outstanding is None or link.outstanding[0] != request_id:
                    continue  # a reply to a fetch given up on, or sent for an older set of partitions
                link.outstanding = None
                out.append((link, error, result, bulk))
        return out

    def back_off(self, link: Link) -> None:
        link.not_before_s = time.monotonic() + RETRY_BACKOFF_MS / 1000

    def next_deadline_s(self, now_s: float) -> float | None:
        """When a link next has something to do on its own: a fetch to give up on, a back-off ending."""
        times = [link.outstanding[1] for link in self.links.values() if link.outstanding is not None]
        times += [link.not_before_s for link in self.links.values() if link.tps and link.not_before_s > now_s]
        return min(times, default=None)

    def close(self) -> None:
        for link in self.links.values():
            link.connection.close()
        self.links.clear()
