"""Consumer groups as a pure state machine: membership, cooperative reconciliation, committed offsets.

This module owns every decision the coordinator makes about consumer groups: who is a member, each
group's epoch and target assignment (computed by nodes/assignors.py), which partitions each member may
own right now, evictions and their reasons, and committed offsets. It must never touch sockets, clocks,
threads, randomness or disk: time arrives as ``now_ms`` arguments, and what must be made durable leaves
as records for the shell (nodes/group_service.py) to write.

Calling convention (one ``Groups`` object holds every group of a coordinator):
- Every request method either returns an ``Outcome`` or raises ``GroupError(code, message)``. A raised
  request changed nothing at all, not even due evictions.
- ``Outcome.records`` are ``("put", key: bytes, value)`` / ``("delete", key: bytes)``; ``value`` is a
  plain msgpack-able object (store/meta_store.py packs it). The shell must write them all, in one
  transaction, BEFORE it sends ``Outcome.reply``. ``Outcome.evictions`` lists members removed by this
  call, each with its reason, for logging and metrics.
- A request is judged against the group as it stands at ``now_ms``: a member whose session expired is
  already unknown even if ``tick`` has not run yet. An accepted request first applies the due evictions.
- Time never runs backwards here: ``now_ms`` below the latest accepted one is raised to it.
- ``next_deadline_ms()`` is when ``tick`` next has work; the shell sleeps until then at most.

The cooperative protocol (after KIP-848). Any change of membership, subscription or subscribed topic
metadata bumps the group epoch and recomputes the target assignment. A member then reconciles on its
own heartbeats: the coordinator asks it to revoke what left its target; once its heartbeat no longer
reports those partitions as owned, the member moves to the group epoch and is granted those partitions
of its target that no other member still holds. ``assigned`` (granted and not yet given back) is the
ownership the coordinator vouches for; it is disjoint across members at all times.

Decisions worth knowing:
- Commits never lower a committed offset. A lower offset in a commit is ignored for that partition and
  listed in ``CommitReply.ignored`` (so a late duplicate commit cannot rewind a group); only
  ``reset_offsets`` on an empty group moves offsets backwards.
- A heartbeat may carry the member's previous epoch if what it owns (of partitions that still exist) is
  a subset of what it was granted (the reply that bumped its epoch was lost); any other epoch is
  FENCED_MEMBER_EPOCH.
- Commits need the member's current epoch exactly, and only name partitions it holds (``assigned``,
  which includes those it is revoking, so it can commit them before giving them back).
- ``leave`` is accepted at any epoch not above the member's: a member id names one incarnation, and a
  fenced member must still be able to hand its partitions back at once.
- Member ids are ``<client_id>-<seq>`` from a persisted counter, never reused; a client may instead
  pass its own unique id (uuid4) to ``join``, which makes a retried join idempotent.
- Static membership: a join naming the ``group_instance_id`` of a live member replaces it under a new
  member id, with its epoch and assignment; the old id is gone (UNKNOWN_MEMBER_ID). As in Kafka, the
  old process is trusted to be dead or about to learn it was fenced.
- Partitions of deleted topics drop out of assignments at once; committed offsets are only ever
  removed by ``delete_group``, so a partial metadata view can never wipe them.

Persisted layout (keys start with ``group:`` in the coordinator's MetaStore; ``\\x00`` separates parts,
which group ids, client ids and topic names may not contain):
- ``group:seq``                           -> int, the last member sequence number handed out
- ``group:g\\x00<group>``                  -> {"epoch": int, "assignor": str, "view": {topic: count},
                                              "target": {member_id: [[topic, partition], ...]}}
- ``group:m\\x00<group>\\x00<member_id>``   -> {"client_id", "instance_id", "topics": [str]|None,
                                              "pattern": str|None, "session_timeout_ms", "epoch",
                                              "previous_epoch", "assigned": [[topic, partition], ...]}
- ``group:o\\x00<group>\\x00<topic>\\x00`` + partition as 4 bytes big-endian
                                          -> {"offset": int, "metadata": str|None}
Heartbeat times are not persisted: ``Groups.restore`` gives every member a fresh session.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import msgpack

from .assignors import ASSIGNOR_NAMES, STICKY, TopicPartition, assign

# Error codes: the wire strings of bus/errors.py (GROUP_FULL and INCONSISTENT_ASSIGNOR have no class
# there yet; ``error_for`` surfaces them as a plain BusError with that code).
UNKNOWN_GROUP = "UNKNOWN_GROUP"
UNKNOWN_MEMBER_ID = "UNKNOWN_MEMBER_ID"
FENCED_MEMBER_EPOCH = "FENCED_MEMBER_EPOCH"
NOT_ASSIGNED = "NOT_ASSIGNED"
GROUP_NOT_EMPTY = "GROUP_NOT_EMPTY"
GROUP_FULL = "GROUP_FULL"
INCONSISTENT_ASSIGNOR = "INCONSISTENT_ASSIGNOR"
INVALID_CONFIG = "INVALID_CONFIG"
INVALID_REQUEST = "INVALID_REQUEST"

# Eviction reasons.
SESSION_TIMEOUT = "session_timeout"
LEFT = "left"
MAX_POLL_INTERVAL = "max_poll_interval"
FENCED_BY_STATIC_REPLACEMENT = "fenced_by_static_replacement"
LEAVE_REASONS = (LEFT, MAX_POLL_INTERVAL)

# Limits.
NAME_CHARS_MAX = 249
PATTERN_CHARS_MAX = 1_000
SUBSCRIBED_TOPICS_MAX = 10_000
SESSION_TIMEOUT_MS_MAX = 30 * 60 * 1000
MEMBERS_PER_GROUP_MAX = 1_000
COMMIT_PARTITIONS_MAX = 100_000
OFFSET_MAX = (1 << 63) - 1
OFFSET_METADATA_CHARS_MAX = 4_096
PARTITIONS_PER_TOPIC_MAX = 1 << 20
EVICTION_HISTORY_MAX = 1_000
HEARTBEAT_INTERVAL_DIVISOR = 3  # a member heartbeats this many times per session timeout

PUT = "put"
DELETE = "delete"
KEY_PREFIX = b"group:"
KEY_MEMBER_SEQ = KEY_PREFIX + b"seq"

NO_EPOCH = -1  # previous_epoch of a member whose epoch never moved


class GroupError(Exception):
    """A rejected request: ``code`` is one of the constants above; nothing was changed."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_wire(self) -> list:
        return [self.code, self.message]


class InvariantViolation(AssertionError):
    """The group state broke a rule that must always hold; the coordinator must stop, not limp on."""


def _invariant(ok: bool, message: str) -> None:
    if not ok:  # not an ``assert``: it must hold under ``python -O`` too
        raise InvariantViolation(message)


def _tps_to_wire(tps: Iterable[TopicPartition]) -> list[list]:
    return [[topic, partition] for topic, partition in sorted(tps)]


def _tps_from_wire(items: Iterable) -> frozenset[TopicPartition]:
    return frozenset((str(topic), int(partition)) for topic, partition in items)


# -- replies and effects -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Eviction:
    group_id: str
    member_id: str
    group_instance_id: str | None
    reason: str  # SESSION_TIMEOUT, LEFT, MAX_POLL_INTERVAL or FENCED_BY_STATIC_REPLACEMENT
    at_ms: int

    def to_wire(self) -> dict:
        return {"group_id": self.group_id, "member_id": self.member_id,
                "group_instance_id": self.group_instance_id, "reason": self.reason, "at_ms": self.at_ms}


@dataclass(frozen=True)
class MemberReply:
    """Answer to join and heartbeat: the member's epoch, what it may own now, and what it must give back."""

    group_id: str
    member_id: str
    member_epoch: int
    group_epoch: int
    assignment: frozenset  # partitions the member may own now (granted and still in its target)
    revoke: frozenset  # partitions it must stop consuming and stop reporting as owned
    heartbeat_interval_ms: int

    def to_wire(self) -> dict:
        return {"group_id": self.group_id, "member_id": self.member_id, "member_epoch": self.member_epoch,
                "group_epoch": self.group_epoch, "assignment": _tps_to_wire(self.assignment),
                "revoke": _tps_to_wire(self.revoke), "heartbeat_interval_ms": self.heartbeat_interval_ms}


@dataclass(frozen=True)
class CommitReply:
    committed: dict  # (topic, partition) -> the offset now committed, for every partition of the request
    ignored: frozenset  # partitions whose requested offset was below the committed one

    def to_wire(self) -> dict:
        return {"committed": [[t, p, o] for (t, p), o in sorted(self.committed.items())],
                "ignored": _tps_to_wire(self.ignored)}


@dataclass(frozen=True)
class Outcome:
    reply: object  # MemberReply / CommitReply / None
    records: tuple  # ("put", key, value) | ("delete", key): persist in one transaction before replying
    evictions: tuple  # Eviction, in the order they happened


# -- state --------------------------------------------------------------------------------------------


@dataclass
class _Member:
    member_id: str
    client_id: str
    instance_id: str | None  # static membership id, unique among a group's members
    topics: frozenset | None  # explicit subscription, or None when subscribed by pattern
    pattern: str | None  # re.fullmatch pattern over topic names, or None
    session_timeout_ms: int  # evicted at now_ms > last_heartbeat_ms + session_timeout_ms
    member_epoch: int  # the group epoch this member has reconciled to
    previous_epoch: int  # its epoch before the last move, accepted once more after a lost reply
    assigned: set  # partitions granted and not yet confirmed given back
    last_heartbeat_ms: int  # soft state; reset to the restore time after a restart
    regex: re.Pattern | None = field(default=None, repr=False)  # compiled ``pattern``

    def __post_init__(self):
        if self.pattern is not None and self.regex is None:
            self.regex = re.compile(self.pattern)

    def deadline_ms(self) -> int:
        """The last instant the member is still alive; it is evicted at any now_ms after it."""
        return self.last_heartbeat_ms + self.session_timeout_ms

    def expired(self, now_ms: int) -> bool:
        return now_ms > self.deadline_ms()

    def subscribes(self, topic: str) -> bool:
        if self.topics is not None:
            return topic in self.topics
        return self.regex.fullmatch(topic) is not None

    def to_record(self) -> dict:
        return {"client_id": self.client_id, "instance_id": self.instance_id,
                "topics": None if self.topics is None else sorted(self.topics), "pattern": self.pattern,
                "session_timeout_ms": self.session_timeout_ms, "epoch": self.member_epoch,
                "previous_epoch": self.previous_epoch, "assigned": _tps_to_wire(self.assigned)}


@dataclass
class _Group:
    group_id: str
    group_epoch: int = 0  # bumped on every change of the target assignment's inputs
    assignor: str = STICKY  # fixed while the group has members
    view: dict = field(default_factory=dict)  # subscribed topic -> partition count the target was built from
    target: dict = field(default_factory=dict)  # member_id -> frozenset of partitions
    members: dict = field(default_factory=dict)  # member_id -> _Member
    offsets: dict = field(default_factory=dict)  # (topic, partition) -> (offset, metadata | None)
    input_key: tuple | None = None  # the target's inputs, to tell whether they changed; derived, not stored

    def to_record(self) -> dict:
        return {"epoch": self.group_epoch, "assignor": self.assignor, "view": dict(sorted(self.view.items())),
                "target": {mid: _tps_to_wire(tps) for mid, tps in sorted(self.target.items())}}

    def state(self) -> str:
        if not self.members:
            return "empty"
        for m in self.members.values():
            if m.member_epoch != self.group_epoch or m.assigned != self.target.get(m.member_id, frozenset()):
                return "reconciling"
        return "stable"


def _group_key(group_id: str) -> bytes:
    return KEY_PREFIX + b"g\x00" + group_id.encode()


def _member_key(group_id: str, member_id: str) -> bytes:
    return KEY_PREFIX + b"m\x00" + group_id.encode() + b"\x00" + member_id.encode()


def _offset_key(group_id: str, tp: TopicPartition) -> bytes:
    return KEY_PREFIX + b"o\x00" + group_id.encode() + b"\x00" + tp[0].encode() + b"\x00" + tp[1].to_bytes(4, "big")


# -- validation ---------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_name(what: str, value, *, empty_ok: bool = False) -> None:
    if not isinstance(value, str) or (not value and not empty_ok) or len(value) > NAME_CHARS_MAX or "\x00" in value:
        raise GroupError(INVALID_CONFIG, f"{what} must be a string of 1..{NAME_CHARS_MAX} chars without NUL, "
                                         f"got {value!r}")


def _check_tp(tp) -> TopicPartition:
    if (not isinstance(tp, tuple) or len(tp) != 2 or not isinstance(tp[0], str) or not _is_int(tp[1])
            or tp[1] < 0 or tp[1] >= PARTITIONS_PER_TOPIC_MAX or "\x00" in tp[0] or not tp[0]):
        raise GroupError(INVALID_REQUEST, f"a partition must be (topic, partition), got {tp!r}")
    return tp


def _check_subscription(topics, pattern) -> tuple[frozenset | None, re.Pattern | None]:
    """Exactly one of ``topics`` (a non-empty list of names) or ``pattern`` (a regular expression), as
    (the topic set or None, the compiled pattern or None); GroupError(INVALID_CONFIG) otherwise."""
    if (topics is None) == (pattern is None):
        raise GroupError(INVALID_CONFIG, "subscribe with exactly one of topics or pattern")
    if topics is not None:
        if isinstance(topics, str) or not isinstance(topics, (list, tuple, set, frozenset)) or not topics:
            raise GroupError(INVALID_CONFIG, f"topics must be a non-empty list of names, got {topics!r}")
        if len(topics) > SUBSCRIBED_TOPICS_MAX:
            raise GroupError(INVALID_CONFIG, f"at most {SUBSCRIBED_TOPICS_MAX} topics per subscription")
        for topic in topics:
            _check_name("topic", topic)
        return frozenset(topics), None
    if not isinstance(pattern, str) or not pattern or len(pattern) > PATTERN_CHARS_MAX:
        raise GroupError(INVALID_CONFIG, f"pattern must be a string of 1..{PATTERN_CHARS_MAX} chars")
    try:
        return None, re.compile(pattern)
    except re.error as exc:
        raise GroupError(INVALID_CONFIG, f"pattern {pattern!r} does not compile: {exc}") from None


def _check_owned(owned) -> frozenset:
    if not isinstance(owned, (set, frozenset, list, tuple)):
        raise GroupError(INVALID_REQUEST, f"owned must be a set of (topic, partition), got {type(owned).__name__}")
    return frozenset(_check_tp(tuple(tp) if isinstance(tp, list) else tp) for tp in owned)


def _check_epoch(value) -> int:
    if not _is_int(value) or value < 0:
        raise GroupError(INVALID_REQUEST, f"member_epoch must be an int >= 0, got {value!r}")
    return value


# -- the state machine --------------------------------------------------------------------------------


class Groups:
    """Every consumer group of one coordinator. See the module docstring for the calling convention."""

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}
        self._topic_partitions: dict[str, int] = {}  # the cluster's topics, as last given to metadata()
        self._member_seq = 0  # last sequence number used in a generated member id; never reused
        self._now_ms = 0  # latest accepted now_ms
        self._dirty_groups: set[str] = set()
        self._dirty_members: set[tuple[str, str]] = set()
        self._dirty_offsets: set[tuple[str, TopicPartition]] = set()
        self._dirty_seq = False
        self._evictions: list[Eviction] = []
        self.recent_evictions: deque[Eviction] = deque(maxlen=EVICTION_HISTORY_MAX)

    # -- requests -------------------------------------------------------------------------------

    def join(self, group_id: str, client_id: str, *, group_instance_id: str | None = None,
             topics: list[str] | None = None, pattern: str | None = None, session_timeout_ms: int,
             assignor: str = STICKY, member_id: str | None = None, now_ms: int) -> Outcome:
        """Add a member (or replace the live static member with the same instance id).

        ``member_id`` may be passed by a client that generates its own unique id (uuid4): a retried join
        whose reply was lost then finds its member instead of leaving an orphan holding partitions.
        """
        now_ms = self._clock(now_ms)
        _check_name("group_id", group_id)
        _check_name("client_id", client_id, empty_ok=True)
        if group_instance_id is not None:
            _check_name("group_instance_id", group_instance_id)
        if member_id is not None:
            _check_name("member_id", member_id)
        topic_set, regex = _check_subscription(topics, pattern)
        if not _is_int(session_timeout_ms) or not 0 < session_timeout_ms <= SESSION_TIMEOUT_MS_MAX:
            raise GroupError(INVALID_CONFIG, f"session_timeout_ms must be in 1..{SESSION_TIMEOUT_MS_MAX}, "
                                             f"got {session_timeout_ms!r}")
        if assignor not in ASSIGNOR_NAMES:
            raise GroupError(INVALID_CONFIG, f"unknown assignor {assignor!r}; one of {', '.join(ASSIGNOR_NAMES)}")

        group = self._groups.get(group_id)
        live = self._live_members(group, now_ms)
        if member_id is not None and any(m.member_id == member_id for m in live):
            existing = group.members[member_id]
            if existing.client_id != client_id or existing.instance_id != group_instance_id or \
                    existing.topics != topic_set or existing.pattern != pattern:
                raise GroupError(INVALID_REQUEST, f"member {member_id!r} exists with another subscription")
            return self._accept(now_ms, lambda: self._rejoin(group, existing, now_ms))
        if live and group.assignor != assignor:
            raise GroupError(INCONSISTENT_ASSIGNOR, f"group {group_id!r} uses assignor {group.assignor!r}, "
                                                    f"not {assignor!r}")
        replaced = None
        if group_instance_id is not None:
            replaced = next((m for m in live if m.instance_id == group_instance_id), None)
        if replaced is None and len(live) >= MEMBERS_PER_GROUP_MAX:
            raise GroupError(GROUP_FULL, f"group {group_id!r} has {len(live)} members, the maximum")
        if member_id is not None and group is not None and member_id in group.members:
            # An expired member with that id is still awaiting its eviction; a fresh id avoids any doubt.
            raise GroupError(INVALID_REQUEST, f"member id {member_id!r} is being evicted; join with a new id")

        def apply() -> MemberReply:
            g = self._groups.get(group_id)
            if g is None:
                g = self._groups[group_id] = _Group(group_id, assignor=assignor)
                self._dirty_groups.add(group_id)
            if g.assignor != assignor:
                _invariant(not g.members, "the assignor only changes while the group is empty")
                g.assignor = assignor
                self._dirty_groups.add(group_id)
            new_id = member_id
            while new_id is None or new_id in g.members:  # skip ids a client chose for itself
                self._member_seq += 1
                self._dirty_seq = True
                new_id = f"{client_id or 'member'}-{self._member_seq}"
            _invariant(new_id not in g.members, f"member id {new_id!r} reused")
            member = _Member(new_id, client_id, group_instance_id, topic_set, pattern, session_timeout_ms,
                             member_epoch=0, previous_epoch=NO_EPOCH, assigned=set(), last_heartbeat_ms=now_ms,
                             regex=regex)
            if replaced is not None:
                old = g.members[replaced.member_id]
                self._remove_member(g, old, FENCED_BY_STATIC_REPLACEMENT, now_ms)
                member.member_epoch, member.previous_epoch = old.member_epoch, old.previous_epoch
                member.assigned = set(old.assigned)
                g.members[new_id] = member
                g.target[new_id] = g.target.pop(old.member_id, frozenset())
                renamed = self._rename_in_key(g.input_key, old.member_id, new_id)
                if self._input_key(g) == renamed:
                    g.input_key = renamed  # the same inputs under a new name: no rebalance
                else:
                    self._refresh(g)  # the replacement subscribes to something else
            else:
                g.members[new_id] = member
                self._refresh(g)
            self._dirty_members.add((group_id, new_id))
            self._dirty_groups.add(group_id)
            return self._reconcile(g, member, owned=None)

        return self._accept(now_ms, apply)

    def heartbeat(self, group_id: str, member_id: str, member_epoch: int, owned, *, topics: list[str] | None = None,
                  pattern: str | None = None, now_ms: int) -> Outcome:
        """Keep the member alive, take note of what it owns, and tell it what it may own and must revoke.

        ``topics`` or ``pattern`` (at most one; neither: unchanged) is a new subscription, as a KIP-848
        heartbeat may carry one: the target is recomputed and the member told what to give back and what it
        gets, by the same cooperative steps as any rebalance."""
        now_ms = self._clock(now_ms)
        group, member = self._member(group_id, member_id, now_ms)
        member_epoch = _check_epoch(member_epoch)
        owned = _check_owned(owned)
        resubscribe = topics is not None or pattern is not None
        topic_set, regex = _check_subscription(topics, pattern) if resubscribe else (None, None)
        # Partitions of deleted topics were dropped from ``assigned`` without asking; they prove nothing.
        owned_existing = frozenset(tp for tp in owned if self._exists(tp))
        if member_epoch != member.member_epoch and not (
                member_epoch == member.previous_epoch and owned_existing <= member.assigned):
            raise GroupError(FENCED_MEMBER_EPOCH, f"member {member_id!r} is at epoch {member.member_epoch}, "
                                                  f"not {member_epoch}")

        def apply() -> MemberReply:
            member.last_heartbeat_ms = now_ms
            if resubscribe and (topic_set, pattern) != (member.topics, member.pattern):
                member.topics, member.pattern, member.regex = topic_set, pattern, regex
                self._dirty_members.add((group_id, member_id))
                self._refresh(group)
            return self._reconcile(group, member, owned=owned)

        return self._accept(now_ms, apply)

    def leave(self, group_id: str, member_id: str, member_epoch: int, reason: str = LEFT, *,
              now_ms: int) -> Outcome:
        """Remove the member now; its partitions are free at once. ``reason``: "left" or "max_poll_interval"."""
        now_ms = self._clock(now_ms)
        group, member = self._member(group_id, member_id, now_ms)
        member_epoch = _check_epoch(member_epoch)
        if member_epoch > member.member_epoch:
            raise GroupError(FENCED_MEMBER_EPOCH, f"member {member_id!r} never reached epoch {member_epoch}")
        if reason not in LEAVE_REASONS:
            raise GroupError(INVALID_REQUEST, f"leave reason must be one of {LEAVE_REASONS}, got {reason!r}")

        def apply() -> None:
            self._remove_member(group, member, reason, now_ms)
            self._refresh(group)

        return self._accept(now_ms, apply)

    def commit(self, group_id: str, member_id: str, member_epoch: int, offsets: Mapping, *,
               now_ms: int) -> Outcome:
        """Commit ``{(topic, partition): (offset, metadata | None)}`` for partitions the member holds.

        Rejected whole (nothing changes) for an unknown member, an epoch other than the member's current
        one, or any partition the member does not hold. Offsets below the committed one are ignored.
        """
        now_ms = self._clock(now_ms)
        group, member = self._member(group_id, member_id, now_ms)
        member_epoch = _check_epoch(member_epoch)
        if member_epoch != member.member_epoch:
            raise GroupError(FENCED_MEMBER_EPOCH, f"member {member_id!r} is at epoch {member.member_epoch}, "
                                                  f"not {member_epoch}")
        offsets = self._check_offsets(offsets, with_metadata=True)
        not_held = sorted(tp for tp in offsets if tp not in member.assigned)
        if not_held:
            raise GroupError(NOT_ASSIGNED, f"member {member_id!r} does not hold {_tps_to_wire(not_held)}")

        def apply() -> CommitReply:
            ignored = set()
            for tp, (offset, metadata) in sorted(offsets.items()):
                previous = group.offsets.get(tp)
                if previous is not None and offset < previous[0]:
                    ignored.add(tp)
                elif previous != (offset, metadata):
                    group.offsets[tp] = (offset, metadata)
                    self._dirty_offsets.add((group_id, tp))
            return CommitReply({tp: group.offsets[tp][0] for tp in offsets}, frozenset(ignored))

        return self._accept(now_ms, apply)

    def reset_offsets(self, group_id: str, offsets: Mapping, *, now_ms: int) -> Outcome:
        """Set ``{(topic, partition): offset}`` in any direction; only for a group without live members.

        Creates the group (empty) if it does not exist, so offsets can be staged before the first join.
        """
        return self.set_offsets(group_id, self._check_offsets(offsets, with_metadata=False), now_ms=now_ms)

    def set_offsets(self, group_id: str, offsets: Mapping, *, now_ms: int) -> Outcome:
        """Set ``{(topic, partition): (offset, metadata | None)}`` as given, in any direction; only for a
        group without live members here. Besides ``reset_offsets``, this is how the offsets of a group whose
        membership is not this machine's are stored (a Kafka classic group's commits, gated by
        nodes/kafka/classic_group.py, and Kafka clients' simple commits: Kafka lets those move an offset
        back). Creates the group (empty) if it does not exist.
        """
        now_ms = self._clock(now_ms)
        _check_name("group_id", group_id)
        offsets = self._check_offsets(offsets, with_metadata=True)
        self._check_empty(self._groups.get(group_id), now_ms)

        def apply() -> None:
            group = self._groups.get(group_id)
            if group is None:
                group = self._groups[group_id] = _Group(group_id)
                self._dirty_groups.add(group_id)
            for tp, value in sorted(offsets.items()):
                if group.offsets.get(tp) != value:
                    group.offsets[tp] = value
                    self._dirty_offsets.add((group_id, tp))

        return self._accept(now_ms, apply)

    def delete_group(self, group_id: str, *, now_ms: int) -> Outcome:
        """Forget the group and its committed offsets; only for a group without live members."""
        now_ms = self._clock(now_ms)
        _check_name("group_id", group_id)
        group = self._groups.get(group_id)
        if group is None:
            raise GroupError(UNKNOWN_GROUP, f"no group {group_id!r}")
        self._check_empty(group, now_ms)

        def apply() -> None:
            g = self._groups.pop(group_id)
            _invariant(not g.members, "expired members were evicted before the delete")
            self._dirty_groups.add(group_id)
            self._dirty_offsets.update((group_id, tp) for tp in g.offsets)

        return self._accept(now_ms, apply)

    def metadata(self, topic_partitions: Mapping[str, int], *, now_ms: int) -> Outcome:
        """The cluster's complete topic -> partition count; groups whose subscribed view changed rebalance."""
        now_ms = self._clock(now_ms)
        if not isinstance(topic_partitions, Mapping):
            raise GroupError(INVALID_REQUEST, "topic_partitions must be a mapping")
        for topic, count in topic_partitions.items():
            _check_name("topic", topic)
            if not _is_int(count) or not 0 <= count <= PARTITIONS_PER_TOPIC_MAX:
                raise GroupError(INVALID_REQUEST, f"bad partition count for {topic!r}: {count!r}")

        def apply() -> None:
            self._topic_partitions = dict(sorted(topic_partitions.items()))
            for group_id in sorted(self._groups):
                self._refresh(self._groups[group_id])

        return self._accept(now_ms, apply)

    def tick(self, now_ms: int) -> Outcome:
        """Evict every member whose session expired by ``now_ms``."""
        now_ms = self._clock(now_ms)
        deadline_ms = self.next_deadline_ms()
        if deadline_ms is None or now_ms < deadline_ms:
            self._now_ms = now_ms  # nothing due: the fast path of every loop turn skips the checks
            return Outcome(None, (), ())
        return self._accept(now_ms, lambda: None)

    # -- reads ----------------------------------------------------------------------------------

    def next_deadline_ms(self) -> int | None:
        """The earliest now_ms at which ``tick`` evicts someone, or None without members."""
        deadlines = [m.deadline_ms() + 1 for g in self._groups.values() for m in g.members.values()]
        return min(deadlines) if deadlines else None

    def describe(self, group_id: str) -> dict:
        group = self._groups.get(group_id)
        if group is None:
            raise GroupError(UNKNOWN_GROUP, f"no group {group_id!r}")
        members = []
        for mid in sorted(group.members):
            m = group.members[mid]
            target = group.target.get(mid, frozenset())
            members.append({
                "member_id": mid, "client_id": m.client_id, "group_instance_id": m.instance_id,
                "member_epoch": m.member_epoch, "topics": None if m.topics is None else sorted(m.topics),
                "pattern": m.pattern, "session_timeout_ms": m.session_timeout_ms,
                "assignment": _tps_to_wire(m.assigned), "target": _tps_to_wire(target),
                "revoking": _tps_to_wire(m.assigned - target), "pending": _tps_to_wire(target - m.assigned)})
        return {"group_id": group_id, "state": group.state(), "group_epoch": group.group_epoch,
                "assignor": group.assignor, "members": members,
                "offsets": [{"topic": t, "partition": p, "offset": o, "metadata": md}
                            for (t, p), (o, md) in sorted(group.offsets.items())]}

    def list_groups(self) -> list[dict]:
        return [{"group_id": gid, "state": g.state(), "group_epoch": g.group_epoch, "members": len(g.members)}
                for gid, g in sorted(self._groups.items())]

    def has_live_members(self, group_id: str, now_ms: int) -> bool:
        return bool(self._live_members(self._groups.get(group_id), max(now_ms, self._now_ms)))

    def committed(self, group_id: str) -> dict:
        """(topic, partition) -> (offset, metadata) committed by the group ({} for an unknown group)."""
        group = self._groups.get(group_id)
        return {} if group is None else dict(group.offsets)

    def check_invariants(self, group_ids: Iterable[str] | None = None) -> None:
        """Raise InvariantViolation unless every rule holds (for the given groups, or for all)."""
        for gid in sorted(self._groups if group_ids is None else group_ids):
            g = self._groups.get(gid)
            if g is None:
                continue  # deleted by this request
            _invariant(g.group_id == gid, "group keyed by its id")
            held: dict[TopicPartition, str] = {}
            instances: set[str] = set()
            for mid, m in g.members.items():
                _invariant(m.member_id == mid, "member keyed by its id")
                _invariant(NO_EPOCH <= m.previous_epoch < m.member_epoch or m.member_epoch == 0,
                           f"{mid}: previous epoch {m.previous_epoch} below epoch {m.member_epoch}")
                _invariant(m.member_epoch <= g.group_epoch, f"{mid}: epoch {m.member_epoch} > {g.group_epoch}")
                if m.instance_id is not None:
                    _invariant(m.instance_id not in instances, f"{gid}: instance id {m.instance_id} twice")
                    instances.add(m.instance_id)
                for tp in m.assigned:
                    _invariant(tp not in held, f"{gid}: {tp} held by {held.get(tp)} and {mid}")
                    held[tp] = mid
            _invariant(set(g.target) == set(g.members), f"{gid}: target names exactly the members")
            for mid, m in g.members.items():
                # A member reaches the group epoch only after giving back all that left its target.
                _invariant(m.member_epoch < g.group_epoch or m.assigned <= g.target[mid],
                           f"{gid}: {mid} at the group epoch still holds {sorted(m.assigned - g.target[mid])}")
            targeted: set[TopicPartition] = set()
            for mid, tps in g.target.items():
                for tp in tps:
                    _invariant(tp not in targeted, f"{gid}: {tp} targeted twice")
                    _invariant(g.members[mid].subscribes(tp[0]), f"{gid}: {mid} targeted unsubscribed {tp}")
                    targeted.add(tp)
            every = {(t, p) for t, n in g.view.items() for p in range(n)}
            _invariant(targeted == every, f"{gid}: target must cover exactly the subscribed partitions")
            for t in g.view:
                _invariant(any(m.subscribes(t) for m in g.members.values()), f"{gid}: {t} in view, unsubscribed")
            for tp, (offset, _) in g.offsets.items():
                _invariant(0 <= offset <= OFFSET_MAX, f"{gid}: offset {offset} for {tp}")

    # -- persistence ----------------------------------------------------------------------------

    @classmethod
    def restore(cls, records: Iterable[tuple[bytes, object]], now_ms: int) -> "Groups":
        """Rebuild from the stored ``(key, value)`` pairs under ``group:`` (values decoded or msgpack bytes).

        Every member gets a fresh session (deadline now_ms + session_timeout_ms), so a coordinator restart
        does not evict everyone. The shell should call ``metadata()`` right after, with the current topics.
        """
        self = cls()
        self._now_ms = now_ms
        members: list[tuple[str, str, dict]] = []
        for key, value in sorted(records, key=lambda kv: kv[0]):
            key = bytes(key)
            if not key.startswith(KEY_PREFIX):
                continue
            if isinstance(value, (bytes, bytearray, memoryview)):
                value = msgpack.unpackb(bytes(value), raw=False, strict_map_key=False)
            rest = key[len(KEY_PREFIX):]
            if rest == b"seq":
                self._member_seq = int(value)
                continue
            if rest.startswith(b"o\x00"):
                # The partition is 4 raw bytes at the end (they may hold NULs), after a NUL separator.
                _invariant(rest[-5:-4] == b"\x00", f"malformed offset key {key!r}")
                gid, topic = rest[2:-5].split(b"\x00")
                g = self._group_for_restore(gid.decode())
                g.offsets[(topic.decode(), int.from_bytes(rest[-4:], "big"))] = (
                    int(value["offset"]), value["metadata"])
                continue
            kind, *parts = rest.split(b"\x00")
            if kind == b"g":
                (gid,) = parts
                g = self._group_for_restore(gid.decode())
                g.group_epoch, g.assignor = int(value["epoch"]), value["assignor"]
                g.view = {str(t): int(n) for t, n in value["view"].items()}
                g.target = {str(mid): _tps_from_wire(tps) for mid, tps in value["target"].items()}
            elif kind == b"m":
                gid, mid = parts
                members.append((gid.decode(), mid.decode(), value))
            else:
                raise InvariantViolation(f"unknown group record key {key!r}")
        for gid, mid, v in members:
            self._group_for_restore(gid).members[mid] = _Member(
                mid, v["client_id"], v["instance_id"], None if v["topics"] is None else frozenset(v["topics"]),
                v["pattern"], int(v["session_timeout_ms"]), member_epoch=int(v["epoch"]),
                previous_epoch=int(v["previous_epoch"]), assigned=set(_tps_from_wire(v["assigned"])),
                last_heartbeat_ms=now_ms)
        # Until metadata() arrives, the topics known are those the groups' targets were built from.
        for g in self._groups.values():
            for topic, count in g.view.items():
                self._topic_partitions[topic] = max(count, self._topic_partitions.get(topic, 0))
        self._topic_partitions = dict(sorted(self._topic_partitions.items()))
        for g in self._groups.values():
            g.input_key = self._input_key(g, g.view)
        self.check_invariants()
        return self

    def _group_for_restore(self, group_id: str) -> _Group:
        g = self._groups.get(group_id)
        if g is None:
            g = self._groups[group_id] = _Group(group_id)
        return g

    # -- internals ------------------------------------------------------------------------------

    def _clock(self, now_ms) -> int:
        if not _is_int(now_ms):
            raise GroupError(INVALID_REQUEST, f"now_ms must be an int, got {now_ms!r}")
        return max(now_ms, self._now_ms)

    def _accept(self, now_ms: int, apply) -> Outcome:
        """Run an accepted request: due evictions first, then ``apply``, then collect records and checks."""
        _invariant(not (self._dirty_groups or self._dirty_members or self._dirty_offsets or self._evictions),
                   "a previous request left unflushed changes")
        self._now_ms = now_ms
        self._expire(now_ms)
        reply = apply()
        touched = (self._dirty_groups | {gid for gid, _ in self._dirty_members}
                   | {gid for gid, _ in self._dirty_offsets})
        records = self._flush()
        evictions = tuple(self._evictions)
        self._evictions.clear()
        self.check_invariants(touched)  # only what changed: a request must not cost O(all groups)
        return Outcome(reply, records, evictions)

    def _member(self, group_id: str, member_id: str, now_ms: int) -> tuple[_Group, _Member]:
        group = self._groups.get(group_id) if isinstance(group_id, str) else None
        member = group.members.get(member_id) if group is not None and isinstance(member_id, str) else None
        if member is None or member.expired(now_ms):
            raise GroupError(UNKNOWN_MEMBER_ID, f"no live member {member_id!r} in group {group_id!r}")
        return group, member

    @staticmethod
    def _live_members(group: _Group | None, now_ms: int) -> list[_Member]:
        if group is None:
            return []
        return [group.members[mid] for mid in sorted(group.members) if not group.members[mid].expired(now_ms)]

    def _check_empty(self, group: _Group | None, now_ms: int) -> None:
        live = self._live_members(group, now_ms)
        if live:
            raise GroupError(GROUP_NOT_EMPTY, f"group {group.group_id!r} has live members "
                                              f"{[m.member_id for m in live]}")

    def _check_offsets(self, offsets, *, with_metadata: bool) -> dict:
        """{tp: (offset, metadata)} after validation; ``offsets`` values are (offset, metadata) or offset."""
        if not isinstance(offsets, Mapping):
            raise GroupError(INVALID_REQUEST, "offsets must be a mapping of (topic, partition) to offset")
        if len(offsets) > COMMIT_PARTITIONS_MAX:
            raise GroupError(INVALID_REQUEST, f"at most {COMMIT_PARTITIONS_MAX} partitions per request")
        out = {}
        for tp, value in offsets.items():
            tp = _check_tp(tp)
            if with_metadata:
                if not isinstance(value, (tuple, list)) or len(value) != 2:
                    raise GroupError(INVALID_REQUEST, f"commit value for {tp} must be (offset, metadata)")
                offset, metadata = value
            else:
                offset, metadata = value, None
            if not _is_int(offset) or not 0 <= offset <= OFFSET_MAX:
                raise GroupError(INVALID_REQUEST, f"offset for {tp} must be an int in 0..2^63-1, got {offset!r}")
            if metadata is not None and (not isinstance(metadata, str) or len(metadata) > OFFSET_METADATA_CHARS_MAX):
                raise GroupError(INVALID_REQUEST, f"metadata for {tp} must be None or a string of at most "
                                                  f"{OFFSET_METADATA_CHARS_MAX} chars")
            out[tp] = (offset, metadata)
        return out

    def _rejoin(self, group: _Group, member: _Member, now_ms: int) -> MemberReply:
        """A retried join of a live member (its first reply was lost): answer as for a heartbeat."""
        member.last_heartbeat_ms = now_ms
        return self._reconcile(group, member, owned=None)

    def _expire(self, now_ms: int) -> None:
        for gid in sorted(self._groups):
            g = self._groups[gid]
            due = [g.members[mid] for mid in sorted(g.members) if g.members[mid].expired(now_ms)]
            for member in due:
                self._remove_member(g, member, SESSION_TIMEOUT, now_ms)
            if due:
                self._refresh(g)

    def _remove_member(self, group: _Group, member: _Member, reason: str, now_ms: int) -> None:
        """Drop the member; its partitions are free at once. The caller refreshes the target."""
        del group.members[member.member_id]
        self._dirty_members.add((group.group_id, member.member_id))
        eviction = Eviction(group.group_id, member.member_id, member.instance_id, reason, now_ms)
        self._evictions.append(eviction)
        self.recent_evictions.append(eviction)

    def _resolve(self, member: _Member, topic_partitions: Mapping[str, int]) -> frozenset:
        if member.topics is not None:
            return frozenset(t for t in member.topics if t in topic_partitions)
        return frozenset(t for t in topic_partitions if member.regex.fullmatch(t))

    def _input_key(self, group: _Group, topic_partitions: Mapping[str, int] | None = None) -> tuple:
        """Everything the target depends on, in a canonical order: equal keys mean an equal target."""
        topic_partitions = self._topic_partitions if topic_partitions is None else topic_partitions
        subs = {mid: self._resolve(m, topic_partitions) for mid, m in group.members.items()}
        view = self._view(subs, topic_partitions)
        return (group.assignor, tuple((mid, tuple(sorted(subs[mid]))) for mid in sorted(subs)),
                tuple(sorted(view.items())))

    @staticmethod
    def _rename_in_key(key: tuple | None, old_id: str, new_id: str) -> tuple | None:
        if key is None:
            return None
        assignor, subs, view = key
        return assignor, tuple(sorted((new_id if mid == old_id else mid, topics) for mid, topics in subs)), view

    @staticmethod
    def _view(subs: Mapping[str, frozenset], topic_partitions: Mapping[str, int]) -> dict[str, int]:
        wanted: set[str] = set()
        for topics in subs.values():
            wanted |= topics
        return {t: topic_partitions[t] for t in sorted(wanted)}

    def _refresh(self, group: _Group) -> None:
        """Recompute the target, bumping the group epoch, if membership, subscriptions or topics changed."""
        key = self._input_key(group)
        if key == group.input_key:
            return
        subs = {mid: self._resolve(m, self._topic_partitions) for mid, m in sorted(group.members.items())}
        group.group_epoch += 1
        group.input_key = key
        group.view = self._view(subs, self._topic_partitions)
        group.target = assign(group.assignor, subs, group.view, current=group.target) if subs else {}
        self._dirty_groups.add(group.group_id)
        # A partition that no longer exists cannot be owned; holding on to it would only leak.
        for mid in sorted(group.members):
            m = group.members[mid]
            gone = {tp for tp in m.assigned if not self._exists(tp)}
            if gone:
                m.assigned -= gone
                self._dirty_members.add((group.group_id, mid))

    def _exists(self, tp: TopicPartition) -> bool:
        return tp[1] < self._topic_partitions.get(tp[0], 0)

    def _reconcile(self, group: _Group, member: _Member, owned: frozenset | None) -> MemberReply:
        """Advance the member towards its target; ``owned`` is what it reported (None: not reported)."""
        target = group.target.get(member.member_id, frozenset())
        if owned is not None:
            # A partition leaving this member is free once the member no longer reports owning it.
            released = {tp for tp in member.assigned - target if tp not in owned}
            if released:
                member.assigned -= released
                self._dirty_members.add((group.group_id, member.member_id))
        revoking = member.assigned - target
        if not revoking:
            _invariant(member.member_epoch <= group.group_epoch, "member epoch ahead of its group")
            if member.member_epoch != group.group_epoch:
                # Epoch 0 means "joining": a heartbeat must never be accepted at it.
                member.previous_epoch = member.member_epoch if member.member_epoch > 0 else NO_EPOCH
                member.member_epoch = group.group_epoch
                self._dirty_members.add((group.group_id, member.member_id))
            held_by_others: set[TopicPartition] = set()
            for other in group.members.values():
                if other is not member:
                    held_by_others |= other.assigned
            grant = {tp for tp in target - member.assigned if tp not in held_by_others}
            if grant:
                member.assigned |= grant
                self._dirty_members.add((group.group_id, member.member_id))
        # Whatever it claims beyond its grant (a partition of a deleted topic, a stale claim) it must drop.
        stray = frozenset(owned - member.assigned) if owned is not None else frozenset()
        return MemberReply(group.group_id, member.member_id, member.member_epoch, group.group_epoch,
                           frozenset(member.assigned & target), frozenset(revoking) | stray,
                           max(1, member.session_timeout_ms // HEARTBEAT_INTERVAL_DIVISOR))

    def _flush(self) -> tuple:
        """The records for everything touched by the request, in key order; deletes for what is gone."""
        out: dict[bytes, tuple] = {}
        for gid in self._dirty_groups:
            g = self._groups.get(gid)
            key = _group_key(gid)
            out[key] = (PUT, key, g.to_record()) if g is not None else (DELETE, key)
        for gid, mid in self._dirty_members:
            g = self._groups.get(gid)
            m = g.members.get(mid) if g is not None else None
            key = _member_key(gid, mid)
            out[key] = (PUT, key, m.to_record()) if m is not None else (DELETE, key)
        for gid, tp in self._dirty_offsets:
            g = self._groups.get(gid)
            value = g.offsets.get(tp) if g is not None else None
            key = _offset_key(gid, tp)
            out[key] = (PUT, key, {"offset": value[0], "metadata": value[1]}) if value is not None else (DELETE, key)
        if self._dirty_seq:
            out[KEY_MEMBER_SEQ] = (PUT, KEY_MEMBER_SEQ, self._member_seq)
        self._dirty_groups.clear()
        self._dirty_members.clear()
        self._dirty_offsets.clear()
        self._dirty_seq = False
        return tuple(out[k] for k in sorted(out))
