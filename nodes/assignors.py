"""Partition assignors for consumer groups: pure functions from members and partitions to a target assignment.

This module owns the three assignors a group may name ("range", "roundrobin", "sticky") and the checks that
every assignment they return is valid. It must never read a clock, draw a random number, touch I/O, or let
dict/set iteration order or ``hash()`` decide anything: the coordinator recomputes targets after a restart
and must get the same answer from the same input, so every choice below is made over sorted sequences.

Inputs (all assignors):
- ``members``: member_id -> frozenset of subscribed topic names (patterns already resolved by the caller).
- ``topic_partitions``: topic -> partition count. Subscribed topics missing here have no partitions yet.
- ``current``: member_id -> partitions the member holds in the previous target (only ``sticky`` reads it).

Output: member_id -> frozenset of (topic, partition), with an entry (possibly empty) for every member.

Guarantees, checked by ``_check_assignment`` on the way out and by tests/test_assignors.py:
- every partition of a topic that at least one member subscribes to goes to exactly one member, and that
  member subscribes to the topic;
- when every member subscribes to the same topics, member sizes differ by at most one;
- ``sticky`` keeps every partition whose holder is still eligible unless balance needs it elsewhere, so one
  join or one leave moves at most ceil(P / N) partitions (P partitions, N members after the change).
"""

from __future__ import annotations

from typing import Callable, Mapping

TopicPartition = tuple[str, int]
Members = Mapping[str, frozenset]
Assignment = dict[str, frozenset]

RANGE = "range"
ROUNDROBIN = "roundrobin"
STICKY = "sticky"
ASSIGNOR_NAMES = (RANGE, ROUNDROBIN, STICKY)


def assign(
    name: str,
    members: Members,
    topic_partitions: Mapping[str, int],
    current: Mapping[str, object] | None = None,
) -> Assignment:
    """The target assignment computed by the assignor called ``name``; ValueError for an unknown name."""
    if name not in _ASSIGNORS:
        raise ValueError(f"unknown assignor {name!r}; expected one of {', '.join(ASSIGNOR_NAMES)}")
    _check_inputs(members, topic_partitions)
    result = _ASSIGNORS[name](members, topic_partitions, current or {})
    _check_assignment(members, topic_partitions, result)
    return result


def subscribed_partitions(members: Members, topic_partitions: Mapping[str, int]) -> list[TopicPartition]:
    """Every partition of every topic that at least one member subscribes to, in (topic, partition) order."""
    wanted = set()
    for topics in members.values():
        wanted |= topics
    return [(topic, p) for topic in sorted(wanted & topic_partitions.keys()) for p in range(topic_partitions[topic])]


def range_assign(members: Members, topic_partitions: Mapping[str, int], current=None) -> Assignment:
    """Per topic, contiguous partition ranges over the topic's subscribers in member-id order.

    Kafka's range assignor gives each topic's leftover partitions to the first members every time, so a
    member can end up many partitions ahead across topics. Here the leftovers of each topic go to the
    subscribers that hold the fewest partitions so far, which keeps members with equal subscriptions within
    one partition of each other. The price: topics with equal counts are co-partitioned only when the count
    divides evenly by the number of subscribers.
    """
    ids = sorted(members)
    out: dict[str, list[TopicPartition]] = {m: [] for m in ids}
    for topic in sorted(topic_partitions):
        subscribers = [m for m in ids if topic in members[m]]
        if not subscribers:
            continue
        count = topic_partitions[topic]
        base, leftover = divmod(count, len(subscribers))
        gets_leftover = set(sorted(subscribers, key=lambda m: (len(out[m]), m))[:leftover])
        start = 0
        for m in subscribers:  # member-id order keeps each member's range contiguous
            size = base + (1 if m in gets_leftover else 0)
            out[m].extend((topic, p) for p in range(start, start + size))
            start += size
        assert start == count, (topic, start, count)
    return {m: frozenset(tps) for m, tps in out.items()}


def roundrobin_assign(members: Members, topic_partitions: Mapping[str, int], current=None) -> Assignment:
    """All subscribed partitions in (topic, partition) order, dealt cyclically over members in id order.

    A member not subscribed to a partition's topic is skipped; the cursor then continues after the member
    that took it, so members with equal subscriptions are dealt alternately and stay within one partition.
    """
    ids = sorted(members)
    out: dict[str, list[TopicPartition]] = {m: [] for m in ids}
    cursor = 0
    for tp in subscribed_partitions(members, topic_partitions):
        for step in range(len(ids)):
            m = ids[(cursor + step) % len(ids)]
            if tp[0] in members[m]:
                out[m].append(tp)
                cursor = (cursor + step + 1) % len(ids)
                break
        else:
            raise AssertionError(f"no subscriber for {tp}")  # subscribed_partitions only lists subscribed topics
    return {m: frozenset(tps) for m, tps in out.items()}


def sticky_assign(members: Members, topic_partitions: Mapping[str, int], current: Mapping[str, object]) -> Assignment:
    """Keep what members already hold, place the rest on the least loaded, then even out one move at a time.

    1. Keep: each member keeps the partitions of ``current`` that still exist and that it still subscribes
       to (a partition claimed by two members goes to the first in id order).
    2. Place: each remaining partition, the most constrained first (fewest eligible members), goes to the
       eligible member holding the fewest partitions.
    3. Balance: while some member holds two or more partitions more than an eligible member, move one
       partition from the most loaded to the least loaded. Each move lowers the sum of squared sizes, so
       the loop ends; with equal subscriptions it ends with sizes within one of each other.

    Only members above the balanced size give partitions and only members below it receive, so after one
    join only the newcomer receives (at most ceil(P / N) partitions), and after one leave only the
    leaver's partitions move.
    """
    ids = sorted(members)
    out: dict[str, set[TopicPartition]] = {m: set() for m in ids}
    holder: dict[TopicPartition, str] = {}

    def eligible(m: str, tp: TopicPartition) -> bool:
        topic, partition = tp
        return topic in members[m] and topic in topic_partitions and 0 <= partition < topic_partitions[topic]

    for m in ids:
        for tp in sorted(current.get(m, ())):
            if eligible(m, tp) and tp not in holder:
                holder[tp] = m
                out[m].add(tp)

    subscribers = {topic: [m for m in ids if topic in members[m]] for topic in sorted(topic_partitions)}
    unplaced = [tp for tp in subscribed_partitions(members, topic_partitions) if tp not in holder]
    unplaced.sort(key=lambda tp: (len(subscribers[tp[0]]), tp))
    for tp in unplaced:
        m = min(subscribers[tp[0]], key=lambda m: (len(out[m]), m))
        holder[tp] = m
        out[m].add(tp)

    # Bounded: each move lowers sum(size^2) by at least 2, and that sum starts below P^2 + 1.
    moves_max = len(holder) ** 2 + 1
    for _ in range(moves_max):
        if not _sticky_balance_step(ids, members, out):
            break
    else:
        raise AssertionError("sticky balance did not converge")
    return {m: frozenset(tps) for m, tps in out.items()}


def _sticky_balance_step(ids: list[str], members: Members, out: dict[str, set]) -> bool:
    """Move one partition from the most loaded member to the least loaded eligible one; False if none can move."""
    for giver in sorted(ids, key=lambda m: (-len(out[m]), m)):
        size = len(out[giver])
        receivers = sorted((m for m in ids if len(out[m]) <= size - 2), key=lambda m: (len(out[m]), m))
        for receiver in receivers:
            movable = [tp for tp in out[giver] if tp[0] in members[receiver]]
            if movable:
                tp = max(movable)
                out[giver].remove(tp)
                out[receiver].add(tp)
                return True
    return False


_ASSIGNORS: dict[str, Callable[..., Assignment]] = {
    RANGE: range_assign,
    ROUNDROBIN: roundrobin_assign,
    STICKY: sticky_assign,
}


def _check_inputs(members: Members, topic_partitions: Mapping[str, int]) -> None:
    for m, topics in members.items():
        if not isinstance(m, str):
            raise TypeError(f"member id must be str, got {m!r}")
        if not isinstance(topics, (frozenset, set)):
            raise TypeError(f"subscription of {m!r} must be a set of topic names, got {type(topics).__name__}")
    for topic, count in topic_partitions.items():
        if not isinstance(topic, str) or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"bad partition count {topic!r}: {count!r}")


def _check_assignment(members: Members, topic_partitions: Mapping[str, int], result: Assignment) -> None:
    """Every subscribed partition to exactly one subscribing member, nothing else, every member present."""
    if set(result) != set(members):
        raise AssertionError("assignment must name exactly the members")
    seen: set[TopicPartition] = set()
    for m, tps in result.items():
        for tp in tps:
            if tp in seen:
                raise AssertionError(f"{tp} assigned twice")
            if tp[0] not in members[m]:
                raise AssertionError(f"{tp} assigned to {m!r}, which does not subscribe to {tp[0]!r}")
            seen.add(tp)
    expected = set(subscribed_partitions(members, topic_partitions))
    if seen != expected:
        raise AssertionError(f"unassigned {sorted(expected - seen)[:5]}, unknown {sorted(seen - expected)[:5]}")
