"""The order in which ``Consumer.poll()`` serves its partitions: in turn, so none with data starves.

Pure: no lock, socket, clock or thread. The consumer holds ``ready``, an OrderedDict of the partitions that
have buffered records, in the order they will be served, and calls ``take_in_turn`` under its lock.

The rule: a poll takes as many records as it may from the partition at the head, and goes on to the next
only if that one runs out; a partition served that still holds records goes to the end, one that runs out
leaves the rotation, and one that gets data joins at the end. Each poll therefore begins at another
partition than the last one did, and no partition is served twice while another that had data all along
is not served at all: a partition with data is never more than one poll behind another.

What the others do, and why this one. Kafka's Java consumer drains the fetched chunk it is on (up to
``max.partition.fetch.bytes`` of one partition) over as many polls as that takes before it moves to the
next partition's (KIP-41; its fairness is at the fetch, which skips partitions that still have data
buffered), and KAFKA-3932 is the starvation that follows; librdkafka hands out each partition's fetched
message sets in the order they arrived, so it is fair a fetch at a time too. Both keep a poll's records in
long runs of one partition, which is what a handler that batches per partition (a bulk write, a commit
per partition) wants, and neither returns a short poll while records are buffered. We keep both of those
and move on at every poll instead of at every chunk: with 8 MB chunks of 100-byte records that is the
difference between waiting one poll and waiting hundreds. Spreading ``max_records`` over every partition
with data in each poll (KIP-387, a proposal never adopted) would cut a poll into slivers as partitions
grow in number, for no gain in what each partition gets over a round.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)  # what ``ready`` holds: the consumer's TopicPartitions


def take_in_turn(ready: OrderedDict[Key, None], want: int, take: Callable[[Key, int], tuple[int, bool]]) -> int:
    """Serve up to ``want`` items from the keys of ``ready`` in turn; returns how many were taken.

    ``take(key, n)`` hands out up to ``n`` of ``key``'s items and returns ``(taken, more)``: ``more`` says
    whether ``key`` still has items once it returns (looked at then, so an item that arrived meanwhile
    counts). It must take all ``n`` unless it runs out: ``more`` with ``taken < n`` is a broken promise.
    ``ready`` may gain keys while ``take`` runs (another thread adding data, under the caller's protocol);
    the key being served is put at the end when it has more, and dropped when it has none.
    """
    return _serve(ready, want, take, True)


def take_draining(ready: OrderedDict[Key, None], want: int, take: Callable[[Key, int], tuple[int, bool]]) -> int:
    """``take_in_turn``'s baseline: the order before fair polling, each key drained before the next (the key
    being served stays at the head while it has items). Not the consumer's: ``bus bench --drain-order`` puts
    it in a measured consumer's ``_take_order`` to show what fairness costs (docs/benchmarks.md)."""
    return _serve(ready, want, take, False)


def _serve(ready: OrderedDict[Key, None], want: int, take: Callable[[Key, int], tuple[int, bool]], rotate: bool
           ) -> int:
    assert want >= 0
    taken = 0
    while taken < want and ready:
        key = next(iter(ready))
        n, more = take(key, want - taken)
        assert 0 <= n <= want - taken and not (more and n < want - taken), (key, n, more, want - taken)
        taken += n
        if not more:
            ready.pop(key, None)
        elif rotate:
            ready[key] = None  # at the end: served this turn
            ready.move_to_end(key)
    return taken
