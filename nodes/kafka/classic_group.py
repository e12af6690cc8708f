"""Kafka's classic consumer-group protocol (JoinGroup, SyncGroup, Heartbeat, LeaveGroup) as a pure state
machine, after Kafka's GroupCoordinator: members, generations, the leader, the client-side assignment the
leader hands in, rebalances on join, leave and session timeout, and Kafka's error codes.

It owns the membership of the coordinator's Kafka classic groups and nothing else: committed offsets are
the bus's (nodes/groups.py, through nodes/group_service.py), which ``commit_error`` only gates. It must
never touch sockets, clocks, threads, randomness or disk: time arrives as ``now_ms``; a request the
protocol holds (a JoinGroup until the rebalance completes, a SyncGroup until the leader's assignment is
in) is named by an opaque ``token`` the shell chose, and every call returns the ``Reply(token, values)``
list that is now due, ``values`` being the Kafka response's fields. ``tick(now_ms)`` expires sessions,
KIP-394's pending member ids and rebalance timeouts; ``next_deadline_ms()`` says when it next has work.

Membership is soft state, as a Kafka member sees it: after a coordinator restart every member hears
UNKNOWN_MEMBER_ID and joins again (its committed offsets are on disk, so it resumes where it committed).

States (Kafka's names, as DescribeGroups reports them):
- ``Empty``: no members (a group with neither members nor pending ids is dropped);
- ``PreparingRebalance``: waiting for every member (and every pending member id) to send JoinGroup, at
  most the largest rebalance timeout; those missing then are removed;
- ``CompletingRebalance``: the generation is formed and JoinGroup answered (the leader got every member's
  metadata); waiting for the leader's SyncGroup with the assignment; the others' SyncGroups are held;
- ``Stable``: every member has or can fetch its assignment; a member's heartbeat is answered NONE.
A member holding a JoinGroup or SyncGroup is alive (it is waiting on us); any other member is removed
when ``now_ms`` passes its last heartbeat plus its session timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment, ConsumerProtocolSubscription

from ..groups import InvariantViolation
from . import codec

EMPTY, PREPARING_REBALANCE, COMPLETING_REBALANCE, STABLE = (
    "Empty", "PreparingRebalance", "CompletingRebalance", "Stable")
CONSUMER_PROTOCOL_TYPE = "consumer"  # whose metadata (ConsumerProtocolSubscription) is checked on join

# Limits.
SESSION_TIMEOUT_MS_MIN = 1_000  # Kafka's group.min.session.timeout.ms is 6 s; lower, so tests run fast
SESSION_TIMEOUT_MS_MAX = 30 * 60 * 1000  # Kafka's group.max.session.timeout.ms
MEMBERS_PER_GROUP_MAX = 1_000  # members and pending member ids together
PROTOCOLS_PER_JOIN_MAX = 64
GROUP_ID_CHARS_MAX = 249
CLIENT_ID_IN_MEMBER_ID_CHARS_MAX = 100


@dataclass(frozen=True)
class Reply:
    token: object  # the shell's handle of the held (or current) request
    values: dict  # the Kafka response's fields


@dataclass
class Member:
    member_id: str
    group_instance_id: str | None  # static membership (KIP-345): unique in the group, survives a restart
    client_id: str
    client_host: str
    session_timeout_ms: int  # removed at now_ms > last_heartbeat_ms + session_timeout_ms (unless held)
    rebalance_timeout_ms: int  # how long a rebalance waits for this member's JoinGroup
    protocol_type: str
    protocols: tuple  # ((name, metadata bytes), ...) in the member's order of preference
    last_heartbeat_ms: int
    assignment: bytes = b""  # what the leader's SyncGroup gave it in this generation
    join: object = None  # token of its held JoinGroup
    sync: object = None  # token of its held SyncGroup

    def metadata(self, protocol: str) -> bytes:
        return dict(self.protocols)[protocol]

    def held(self) -> bool:
        return self.join is not None or self.sync is not None

    def deadline_ms(self) -> int:
        return self.last_heartbeat_ms + self.session_timeout_ms


@dataclass
class Group:
    group_id: str
    state: str = EMPTY
    generation: int = 0  # bumped each time a rebalance completes
    protocol_type: str | None = None  # fixed while the group has members
    protocol: str | None = None  # the assignor chosen for this generation (all members support it)
    leader: str | None = None
    members: dict = field(default_factory=dict)  # member id -> Member, in order of joining
    pending: dict = field(default_factory=dict)  # KIP-394: member id handed out -> its deadline_ms
    rebalance_deadline_ms: int | None = None  # while PreparingRebalance


def valid_group_id(group_id) -> bool:
    """1..249 characters without NUL: what the bus's committed-offset keys can hold (nodes/groups.py)."""
    return isinstance(group_id, str) and 0 < len(group_id) <= GROUP_ID_CHARS_MAX and "\x00" not in group_id


def subscribed_topics(metadata: bytes) -> list[str]:
    """The topics of a consumer's JoinGroup metadata (ConsumerProtocolSubscription); ValueError if it is
    not one."""
    try:
        subscription = ConsumerProtocolSubscription.decode(bytes(metadata))
    except codec.DECODE_ERRORS as exc:
        raise ValueError(f"{exc.__class__.__name__}: {exc}") from None
    topics = subscription.topics
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        raise ValueError("no topic list")
    return topics


def assigned_partitions(assignment: bytes) -> list[tuple[str, int]]:
    """The (topic, partition)s of a leader-made ConsumerProtocolAssignment; [] for bytes that are not one
    (the leader's assignment is the clients' business: the coordinator only hands it on)."""
    try:
        decoded = ConsumerProtocolAssignment.decode(bytes(assignment))
        return sorted({(tp.topic, tp.partition) for tp in decoded.partitions()})
    except (*codec.DECODE_ERRORS, AttributeError):
        return []


def _invariant(ok: bool, message: str) -> None:
    if not ok:  # not an ``assert``: it must hold under ``python -O`` too
        raise InvariantViolation(message)


class ClassicGroups:
    """Every Kafka classic group of one coordinator. ``instance`` goes into the member ids it makes, so
    ids from before a coordinator restart are never handed out again."""

    def __init__(self, instance: str):
        self.instance = instance
        self.groups: dict[str, Group] = {}
        self._member_seq = 0

    # -- requests ---------------------------------------------------------------------------------

    def join(self, token, group_id: str, member_id: str, *, group_instance_id: str | None, client_id: str,
             client_host: str, session_timeout_ms: int, rebalance_timeout_ms: int, protocol_type: str,
             protocols: list, require_known_member_id: bool, now_ms: int) -> list[Reply]:
        """JoinGroup. ``protocols``: [(name, metadata bytes)]. ``require_known_member_id``: v4+ (KIP-394),
        a first join without a member id is answered MEMBER_ID_REQUIRED with the id to join with."""
        def refuse(code: int, member: str = member_id) -> list[Reply]:
            return [Reply(token, self.join_values(code, member_id=member))]

        if not valid_group_id(group_id):
            return refuse(codec.INVALID_GROUP_ID)
        if not SESSION_TIMEOUT_MS_MIN <= session_timeout_ms <= SESSION_TIMEOUT_MS_MAX:
            return refuse(codec.INVALID_SESSION_TIMEOUT)
        protocols = tuple((name, bytes(metadata or b"")) for name, metadata in protocols)
        if not protocol_type or not protocols or len(protocols) > PROTOCOLS_PER_JOIN_MAX or \
                len({name for name, _ in protocols}) != len(protocols):
            return refuse(codec.INCONSISTENT_GROUP_PROTOCOL)
        if protocol_type == CONSUMER_PROTOCOL_TYPE:
            try:
                for _, metadata in protocols:
                    subscribed_topics(metadata)
            except ValueError:
                return refuse(codec.INCONSISTENT_GROUP_PROTOCOL)
        group = self.groups.get(group_id)
        holder = self._static_member(group, group_instance_id)
        if holder is not None and member_id and member_id != holder.member_id:
            return refuse(codec.FENCED_INSTANCE_ID)
        if group is not None and group.members and (
                protocol_type != group.protocol_type or
                not self._common(group, protocols, member_id or (holder.member_id if holder else ""))):
            return refuse(codec.INCONSISTENT_GROUP_PROTOCOL)
        rebalance_timeout_ms = rebalance_timeout_ms if rebalance_timeout_ms > 0 else session_timeout_ms
        rebalance_timeout_ms = min(rebalance_timeout_ms, SESSION_TIMEOUT_MS_MAX)
        if holder is not None and not member_id:
            return self._replace_static(token, group, holder, client_id, client_host, session_timeout_ms,
                                        rebalance_timeout_ms, protocols, now_ms)
        known = group is not None and member_id in group.members
        pending = group is not None and member_id in group.pending
        if member_id and not known and not pending:
            return refuse(codec.UNKNOWN_MEMBER_ID)
        if not known and group is not None and \
                len(group.members) + len(group.pending) - pending >= MEMBERS_PER_GROUP_MAX:
            return refuse(codec.GROUP_MAX_SIZE_REACHED)
        if group is None:
            group = self.groups[group_id] = Group(group_id)
        if not member_id:
            member_id = self._new_member_id(client_id)
            if require_known_member_id and group_instance_id is None:  # static members are exempt, as in Kafka
                group.pending[member_id] = now_ms + session_timeout_ms
                return [Reply(token, self.join_values(codec.MEMBER_ID_REQUIRED, member_id=member_id))]
        group.pending.pop(member_id, None)
        replies: list[Reply] = []
        member = group.members.get(member_id)
        if member is None:
            member = group.members[member_id] = Member(
                member_id, group_instance_id, client_id, client_host, session_timeout_ms, rebalance_timeout_ms,
                protocol_type, protocols, now_ms)
            group.protocol_type = protocol_type
            changed = True
        else:
            changed = member.protocols != protocols
            member.protocols, member.session_timeout_ms = protocols, session_timeout_ms
            member.rebalance_timeout_ms, member.last_heartbeat_ms = rebalance_timeout_ms, now_ms
            if member.join is not None:  # a second JoinGroup while one waits: the first is superseded
                replies.append(Reply(member.join, self.join_values(codec.REBALANCE_IN_PROGRESS,
                                                                    member_id=member_id)))
                member.join = None
        if group.state in (STABLE, COMPLETING_REBALANCE) and not changed and \
                (group.state == COMPLETING_REBALANCE or member_id != group.leader):
            # Nothing new from a member of this generation (its JoinGroup answer was lost): answer again.
            replies.append(Reply(token, self._generation_values(group, member_id)))
            return replies
        member.join = token
        replies += self._prepare_rebalance(group, now_ms)
        replies += self._complete_join(group, now_ms)
        self.check_invariants(group_id)
        return replies

    def sync(self, token, group_id: str, generation: int, member_id: str, *, group_instance_id: str | None = None,
             protocol_type: str | None, protocol_name: str | None, assignments: dict, now_ms: int) -> list[Reply]:
        """SyncGroup; ``assignments``: member id -> bytes (the leader's; others send none)."""
        group = self.groups.get(group_id)
        member = group.members.get(member_id) if group is not None else None

        def answer(code: int, assignment: bytes = b"") -> list[Reply]:
            return [Reply(token, {"error_code": code, "protocol_type": group.protocol_type if group else None,
                                  "protocol_name": group.protocol if group else None, "assignment": assignment})]

        if self._fenced(group, member_id, group_instance_id):
            return answer(codec.FENCED_INSTANCE_ID)
        if member is None:
            return answer(codec.UNKNOWN_MEMBER_ID)
        if generation != group.generation:
            return answer(codec.ILLEGAL_GENERATION)
        if (protocol_type is not None and protocol_type != group.protocol_type) or \
                (protocol_name is not None and protocol_name != group.protocol):
            return answer(codec.INCONSISTENT_GROUP_PROTOCOL)
        if group.state == PREPARING_REBALANCE:
            return answer(codec.REBALANCE_IN_PROGRESS)
        member.last_heartbeat_ms = now_ms
        if group.state == STABLE:
            return answer(codec.NONE, member.assignment)
        _invariant(group.state == COMPLETING_REBALANCE, f"SyncGroup in state {group.state}")
        replies = []
        if member.sync is not None:
            replies.append(Reply(member.sync, {"error_code": codec.REBALANCE_IN_PROGRESS, "assignment": b""}))
        member.sync = token
        if member_id == group.leader:
            for m in group.members.values():
                m.assignment = bytes(assignments.get(m.member_id) or b"")
            group.state = STABLE
            for m in group.members.values():
                if m.sync is not None:
                    replies.append(Reply(m.sync, {"error_code": codec.NONE, "protocol_type": group.protocol_type,
                                                  "protocol_name": group.protocol, "assignment": m.assignment}))
                    m.sync = None
                    m.last_heartbeat_ms = now_ms
        self.check_invariants(group_id)
        return replies

    def heartbeat(self, group_id: str, generation: int, member_id: str, *, group_instance_id: str | None = None,
                  now_ms: int) -> int:
        """Heartbeat: Kafka's error code (NONE, or REBALANCE_IN_PROGRESS: join again)."""
        group = self.groups.get(group_id)
        member = group.members.get(member_id) if group is not None else None
        if self._fenced(group, member_id, group_instance_id):
            return codec.FENCED_INSTANCE_ID
        if member is None:
            return codec.UNKNOWN_MEMBER_ID
        if generation != group.generation:
            return codec.ILLEGAL_GENERATION
        member.last_heartbeat_ms = now_ms
        return codec.REBALANCE_IN_PROGRESS if group.state == PREPARING_REBALANCE else codec.NONE

    def leave(self, group_id: str, leaving: list, *, now_ms: int) -> tuple[list[int], list[Reply]]:
        """LeaveGroup of ``leaving`` [(member id, group instance id or None)]: each one's error code, and
        the replies now due (a rebalance that was waiting only for the leavers completes)."""
        group = self.groups.get(group_id)
        codes, replies = [], []
        for member_id, instance_id in leaving:
            if group is None:
                codes.append(codec.UNKNOWN_MEMBER_ID)
                continue
            if not member_id and instance_id is not None:
                member_id = next((m.member_id for m in group.members.values()
                                  if m.group_instance_id == instance_id), "")
            if group.pending.pop(member_id, None) is not None:
                codes.append(codec.NONE)
                continue
            if member_id not in group.members:
                codes.append(codec.UNKNOWN_MEMBER_ID)
                continue
            codes.append(codec.NONE)
            replies += self._remove(group, member_id, now_ms)
        if group is not None:
            replies += self._complete_join(group, now_ms)
            self._drop_if_unused(group)
            self.check_invariants(group_id)
        return codes, replies

    def tick(self, now_ms: int) -> list[Reply]:
        """Expire sessions, pending member ids and rebalance timeouts due by ``now_ms``."""
        replies = []
        for group in list(self.groups.values()):
            for member_id, deadline_ms in list(group.pending.items()):
                if now_ms > deadline_ms:
                    del group.pending[member_id]
            for member in list(group.members.values()):
                if not member.held() and now_ms > member.deadline_ms():
                    replies += self._remove(group, member.member_id, now_ms)
            if group.state == PREPARING_REBALANCE and now_ms >= group.rebalance_deadline_ms:
                for member in list(group.members.values()):
                    if member.join is None:  # did not join in time: out, as Kafka does
                        replies += self._remove(group, member.member_id, now_ms)
                group.pending.clear()
            replies += self._complete_join(group, now_ms)
            self._drop_if_unused(group)
        self.check_invariants()
        return replies

    def commit_error(self, group_id: str, generation: int, member_id: str, *, group_instance_id: str | None = None,
                     now_ms: int) -> int | None:
        """Whether an OffsetCommit may be written, as Kafka's classic coordinator judges it: None when this
        module does not know the group or it has no members (a simple commit, generation -1 and no member
        id, is then accepted: the caller decides); else Kafka's code (NONE: write it)."""
        group = self.groups.get(group_id)
        if group is None or not group.members:
            if generation < 0 and not member_id:
                return None
            return codec.UNKNOWN_MEMBER_ID if member_id else codec.ILLEGAL_GENERATION
        member = group.members.get(member_id)
        if self._fenced(group, member_id, group_instance_id):
            return codec.FENCED_INSTANCE_ID
        if member is None:
            return codec.UNKNOWN_MEMBER_ID
        if group.state == COMPLETING_REBALANCE:
            return codec.REBALANCE_IN_PROGRESS
        if generation != group.generation:
            return codec.ILLEGAL_GENERATION
        member.last_heartbeat_ms = now_ms  # a commit is a sign of life, as in Kafka
        return codec.NONE

    # -- reads ----------------------------------------------------------------------------------

    def has_members(self, group_id: str) -> bool:
        group = self.groups.get(group_id)
        return group is not None and bool(group.members or group.pending)

    def next_deadline_ms(self) -> int | None:
        deadlines = []
        for group in self.groups.values():
            deadlines += [d + 1 for d in group.pending.values()]
            deadlines += [m.deadline_ms() + 1 for m in group.members.values() if not m.held()]
            if group.state == PREPARING_REBALANCE:
                deadlines.append(group.rebalance_deadline_ms)
        return min(deadlines, default=None)

    def describe(self, group_id: str) -> dict | None:
        """DescribeGroups' fields of the group (None if unknown here)."""
        group = self.groups.get(group_id)
        if group is None:
            return None
        stable = group.state in (STABLE, COMPLETING_REBALANCE)
        members = [{"member_id": m.member_id, "group_instance_id": m.group_instance_id, "client_id": m.client_id,
                    "client_host": m.client_host, "session_timeout_ms": m.session_timeout_ms,
                    "member_metadata": m.metadata(group.protocol) if stable else b"",
                    "member_assignment": m.assignment if group.state == STABLE else b""}
                   for m in group.members.values()]
        return {"group_id": group_id, "group_state": group.state, "protocol_type": group.protocol_type or "",
                "protocol_data": (group.protocol or "") if stable else "", "members": members,
                "generation": group.generation}

    def list_groups(self) -> list[dict]:
        return [{"group_id": g.group_id, "protocol_type": g.protocol_type or "", "group_state": g.state}
                for g in self.groups.values() if g.members]

    def check_invariants(self, group_id: str | None = None) -> None:
        for group in [self.groups[group_id]] if group_id in self.groups else list(self.groups.values()):
            states = (EMPTY, PREPARING_REBALANCE, COMPLETING_REBALANCE, STABLE)
            _invariant(group.state in states, f"{group.group_id}: state {group.state}")
            _invariant((group.state == EMPTY) == (not group.members),
                       f"{group.group_id}: {group.state} with {len(group.members)} members")
            _invariant(not set(group.members) & set(group.pending), "a member id both pending and joined")
            _invariant(len(group.members) + len(group.pending) <= MEMBERS_PER_GROUP_MAX, "too many members")
            instances = [m.group_instance_id for m in group.members.values() if m.group_instance_id is not None]
            _invariant(len(instances) == len(set(instances)), f"{group.group_id}: a group instance id twice")
            if group.state in (COMPLETING_REBALANCE, STABLE):
                _invariant(group.leader in group.members, f"{group.group_id}: leader {group.leader} not a member")
                for m in group.members.values():
                    _invariant(m.join is None, "a JoinGroup held outside PreparingRebalance")
                    _invariant(group.protocol in dict(m.protocols), f"{m.member_id} lacks {group.protocol}")
            if group.state != COMPLETING_REBALANCE:
                _invariant(all(m.sync is None for m in group.members.values()),
                           "a SyncGroup held outside CompletingRebalance")
            _invariant((group.rebalance_deadline_ms is not None) == (group.state == PREPARING_REBALANCE),
                       f"{group.group_id}: a rebalance deadline only while preparing a rebalance")

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _static_member(group: Group | None, instance_id: str | None) -> Member | None:
        if group is None or instance_id is None:
            return None
        return next((m for m in group.members.values() if m.group_instance_id == instance_id), None)

    def _fenced(self, group: Group | None, member_id: str, instance_id: str | None) -> bool:
        """KIP-345: a request naming a group instance id that another member id now holds."""
        holder = self._static_member(group, instance_id)
        return holder is not None and holder.member_id != member_id

    def _replace_static(self, token, group: Group, old: Member, client_id: str, client_host: str,
                        session_timeout_ms: int, rebalance_timeout_ms: int, protocols: tuple,
                        now_ms: int) -> list[Reply]:
        """KIP-345: a static member back under a new member id takes the old one's place (the old id is
        fenced from now on). Its assignment is kept, and with the same metadata, no rebalance (the leader's
        too): it is answered with the current generation, as Kafka does, and syncs to get its part."""
        replies = []
        for held, values in ((old.join, self.join_values(codec.FENCED_INSTANCE_ID, member_id=old.member_id)),
                             (old.sync, {"error_code": codec.FENCED_INSTANCE_ID, "assignment": b""})):
            if held is not None:
                replies.append(Reply(held, values))
        del group.members[old.member_id]
        new_id = self._new_member_id(client_id)
        unchanged = old.protocols == protocols
        member = group.members[new_id] = Member(
            new_id, old.group_instance_id, client_id, client_host, session_timeout_ms, rebalance_timeout_ms,
            old.protocol_type, protocols, now_ms, assignment=old.assignment)
        if group.leader == old.member_id:
            group.leader = new_id
        if group.state in (STABLE, COMPLETING_REBALANCE) and unchanged:
            # A leader gets the members (as any leader's JoinGroup answer has them) and, once the group is
            # stable, KIP-814's skip_assignment (v9+): the assignment stands, its SyncGroup gets its part.
            values = self._generation_values(group, new_id)
            values["skip_assignment"] = group.leader == new_id and group.state == STABLE
            replies.append(Reply(token, values))
        else:
            member.join = token
            replies += self._prepare_rebalance(group, now_ms)
            replies += self._complete_join(group, now_ms)
        self.check_invariants(group.group_id)
        return replies

    def _new_member_id(self, client_id: str) -> str:
        self._member_seq += 1
        prefix = (client_id or "member")[:CLIENT_ID_IN_MEMBER_ID_CHARS_MAX]
        return f"{prefix}-{self.instance}-{self._member_seq}"

    @staticmethod
    def _common(group: Group, protocols: tuple, member_id: str) -> set:
        """The protocols every other member and this join support."""
        common = {name for name, _ in protocols}
        for m in group.members.values():
            if m.member_id != member_id:
                common &= {name for name, _ in m.protocols}
        return common

    def _prepare_rebalance(self, group: Group, now_ms: int) -> list[Reply]:
        """Start a rebalance (held SyncGroups are told REBALANCE_IN_PROGRESS: join again)."""
        if group.state == PREPARING_REBALANCE:
            return []
        replies = []
        for m in group.members.values():
            if m.sync is not None:
                replies.append(Reply(m.sync, {"error_code": codec.REBALANCE_IN_PROGRESS, "assignment": b""}))
                m.sync = None
        group.state = PREPARING_REBALANCE
        group.rebalance_deadline_ms = now_ms + max(m.rebalance_timeout_ms for m in group.members.values())
        return replies

    def _remove(self, group: Group, member_id: str, now_ms: int) -> list[Reply]:
        """Take the member out (left, expired, or late for a rebalance); the rest rebalance."""
        member = group.members.pop(member_id)
        replies = []
        for token, values in ((member.join, self.join_values(codec.UNKNOWN_MEMBER_ID, member_id=member_id)),
                              (member.sync, {"error_code": codec.UNKNOWN_MEMBER_ID, "assignment": b""})):
            if token is not None:
                replies.append(Reply(token, values))
        if not group.members:
            group.state, group.leader, group.protocol, group.rebalance_deadline_ms = EMPTY, None, None, None
            group.generation += 1
            return replies
        if group.leader == member_id:
            group.leader = None
        return replies + self._prepare_rebalance(group, now_ms)

    def _complete_join(self, group: Group, now_ms: int) -> list[Reply]:
        """Form the next generation once every member and pending id has joined (or the timeout removed
        the rest): choose the protocol, the leader, and answer every held JoinGroup."""
        if group.state != PREPARING_REBALANCE or group.pending or \
                any(m.join is None for m in group.members.values()):
            return []
        _invariant(bool(group.members), "PreparingRebalance without members")
        group.generation += 1
        group.protocol = self._choose_protocol(group)
        if group.leader not in group.members:
            group.leader = next(iter(group.members))
        group.state, group.rebalance_deadline_ms = COMPLETING_REBALANCE, None
        replies = []
        for m in group.members.values():
            m.assignment = b""
            replies.append(Reply(m.join, self._generation_values(group, m.member_id)))
            m.join = None
            m.last_heartbeat_ms = now_ms
        return replies

    @staticmethod
    def _choose_protocol(group: Group) -> str:
        """Kafka's vote: among the protocols every member supports, each member votes for the first it
        lists; the most votes win (ties: the leader's, else the first member's, preference)."""
        members = list(group.members.values())
        common = set(dict(members[0].protocols))
        for m in members[1:]:
            common &= set(dict(m.protocols))
        _invariant(bool(common), "members without a protocol in common were refused on join")
        votes: dict[str, int] = {}
        for m in members:
            choice = next(name for name, _ in m.protocols if name in common)
            votes[choice] = votes.get(choice, 0) + 1
        first = group.members.get(group.leader) or members[0]
        order = [name for name, _ in first.protocols if name in common]
        return max(order, key=lambda name: (votes.get(name, 0), -order.index(name)))

    def _generation_values(self, group: Group, member_id: str) -> dict:
        """The JoinGroup answer of a member of the current generation (the leader gets the members)."""
        leader = member_id == group.leader
        return self.join_values(
            codec.NONE, generation_id=group.generation, protocol_type=group.protocol_type,
            protocol_name=group.protocol, leader=group.leader, member_id=member_id,
            members=[{"member_id": m.member_id, "group_instance_id": m.group_instance_id,
                      "metadata": m.metadata(group.protocol)} for m in group.members.values()] if leader else [])

    @staticmethod
    def join_values(code: int, **values) -> dict:
        return {"throttle_time_ms": 0, "error_code": code, "generation_id": -1, "protocol_type": None,
                "protocol_name": None, "leader": "", "skip_assignment": False, "member_id": "", "members": [],
                **values}

    def _drop_if_unused(self, group: Group) -> None:
        if not group.members and not group.pending:
            del self.groups[group.group_id]

