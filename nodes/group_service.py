"""The coordinator's consumer-group shell: wire requests in, the pure state machine's decisions out.

This module owns the group ops of the coordinator (``bus/wire.py``: GROUP_JOIN ... GROUP_DELETE): it turns
wire arguments into the arguments of ``nodes/groups.py`` (lists into tuples, nothing more: the state
machine validates), writes every record an ``Outcome`` carries with ``MetaStore.apply`` BEFORE the reply
that acknowledges it leaves, and turns ``GroupError`` into the typed ``BusError`` of its code. It never
decides anything about membership, assignment or offsets itself; it must never reply to a request whose
records are not on disk. If writing fails the exception escapes and stops the coordinator: the state in
memory would then be ahead of the disk, and a restart (which restores from the disk) is the only honest
way on.

Start-up: ``Groups.restore`` from the ``group:`` keys (every member gets a fresh session, so a coordinator
restart does not evict anyone), then ``metadata`` with the topics the coordinator knows.

Wire ops (args -> result; every name is a string, a partition is ``[topic, partition]``):
- ``group_join``   {group_id, client_id, group_instance_id?, topics? | pattern?, session_timeout_ms,
                   assignor?, member_id?} -> member reply (below)
- ``group_heartbeat`` {group_id, member_id, member_epoch, owned: [[t, p], ...]} -> member reply
- ``group_leave``  {group_id, member_id, member_epoch, reason?: "left" | "max_poll_interval"} -> {}
- ``offset_commit`` {group_id, member_id, member_epoch, offsets: [[t, p, offset, metadata|null], ...]}
                   -> {committed: [[t, p, offset], ...], ignored: [[t, p], ...]}
- ``offset_fetch`` {group_id, partitions?: [[t, p], ...]} -> {offsets: [[t, p, offset|null, metadata], ...]}
- ``group_list``   {} -> {groups: [{group_id, state, group_epoch, members}, ...]}
- ``group_describe`` {group_id} -> Groups.describe(...) plus ``evictions`` (the latest, with reasons)
- ``group_reset_offsets`` {group_id, offsets: [[t, p, offset], ...]} -> {}
- ``group_delete`` {group_id} -> {}
A member reply is {group_id, member_id, member_epoch, group_epoch, assignment, revoke, heartbeat_interval_ms}.
"""

from __future__ import annotations

import logging

from bus import wire
from bus.clock import monotonic_ms
from bus.errors import InconsistentGroupProtocol, error_for

from . import groups as core
from .groups import GroupError, Groups
from .kafka.classic_group import assigned_partitions, subscribed_topics

log = logging.getLogger("bus.groups")

EVICTIONS_DESCRIBED_MAX = 20  # latest evictions shown by group_describe
SNAPSHOT_INTERVAL_MS = 1_000  # how fresh the groups' figures in the metrics are
_GROUP_RECORD = core.KEY_PREFIX + b"g\x00"  # the key prefix of a group's record (nodes/groups.py), epoch inside


def _tp(item) -> tuple:
    topic, partition = item
    return (topic, partition)


class GroupService:
    def __init__(self, store, topics, *, clock_ms=monotonic_ms, metrics=None):
        """``store``: the coordinator's MetaStore; ``topics()``: its {name: {"partitions": [...], ...}};
        ``metrics``: the coordinator's (nodes/metrics.py), counting rebalances and evictions, or None."""
        self.store = store
        self.topics = topics
        self.metrics = metrics
        # The coordinator's Kafka classic groups (nodes/kafka/classic_group.py), or None: a group name is
        # one kind at a time, and ``bus group describe`` shows a Kafka group's members with its offsets.
        self.classic = None
        self.epochs: dict[str, int] = {}  # group id -> its epoch as last persisted: a change is a rebalance
        # (group id, {tp: committed offset}, live members) per group, refreshed by the loop at most every
        # SNAPSHOT_INTERVAL_MS and read by the metrics thread: never the state machine's own dicts.
        self._snapshot: tuple = ()
        self._snapshot_due_ms = 0
        now_ms = clock_ms()
        self.groups = Groups.restore(store.items(core.KEY_PREFIX), now_ms)
        self._run(lambda: self.groups.metadata(self._topic_counts(), now_ms=now_ms))

    def handlers(self) -> dict:
        return {
            wire.GROUP_JOIN: self._join,
            wire.GROUP_HEARTBEAT: self._heartbeat,
            wire.GROUP_LEAVE: self._leave,
            wire.OFFSET_COMMIT: self._commit,
            wire.OFFSET_FETCH: self._offset_fetch,
            wire.GROUP_LIST: self._list,
            wire.GROUP_DESCRIBE: self._describe,
            wire.GROUP_RESET_OFFSETS: self._reset_offsets,
            wire.GROUP_DELETE: self._delete,
        }

    # -- called by the coordinator loop ------------------------------------------------------------

    def next_deadline_ms(self):
        return self.groups.next_deadline_ms()

    def tick(self, now_ms: int) -> None:
        self._run(lambda: self.groups.tick(now_ms))

    def metadata_changed(self, now_ms: int) -> None:
        self._run(lambda: self.groups.metadata(self._topic_counts(), now_ms=now_ms))

    # -- the one path every decision takes ---------------------------------------------------------

    def _run(self, decide):
        """Ask the state machine, persist what it decided, then hand back its reply (typed errors on refusal)."""
        try:
            outcome = decide()
        except GroupError as exc:
            raise error_for(exc.code, exc.message) from None
        self.store.apply(list(outcome.records))  # before the reply: an acknowledged change is on disk
        for eviction in outcome.evictions:
            log.info("group %s: member %s (instance %s) removed: %s", eviction.group_id, eviction.member_id,
                     eviction.group_instance_id, eviction.reason)
            if self.metrics is not None:
                self.metrics.evictions.labels(eviction.group_id, eviction.reason).inc()
        self._count_rebalances(outcome.records)
        return outcome.reply

    def _count_rebalances(self, records) -> None:
        """A persisted group record with a new epoch is a rebalance (the target assignment was recomputed)."""
        for record in records:
            if record[0] == core.PUT and record[1].startswith(_GROUP_RECORD):
                group_id = record[1][len(_GROUP_RECORD):].decode()
                epoch = record[2]["epoch"]
                if self.epochs.get(group_id, epoch) != epoch and self.metrics is not None:
                    self.metrics.rebalances.labels(group_id).inc()
                self.epochs[group_id] = epoch

    def refresh_snapshot(self, now_ms: int) -> None:
        """Take the groups' committed offsets and member counts for the metrics thread (at most every
        SNAPSHOT_INTERVAL_MS: scrapes come every few seconds)."""
        if now_ms < self._snapshot_due_ms:
            return
        self._snapshot_due_ms = now_ms + SNAPSHOT_INTERVAL_MS
        self._snapshot = tuple(
            (g["group_id"], {tp: offset for tp, (offset, _) in self.groups.committed(g["group_id"]).items()},
             g["members"]) for g in self.groups.list_groups())

    def snapshot(self) -> tuple:
        return self._snapshot

    def _topic_counts(self) -> dict:
        return {name: len(topic["partitions"]) for name, topic in self.topics().items()}

    # -- handlers: (args, now_ms) -> result ----------------------------------------------------------

    # -- Kafka's group APIs (nodes/kafka/group_apis.py) --------------------------------------------

    def bus_members(self, group_id: str, now_ms: int) -> bool:
        """Whether the group has live members of the bus's own protocol."""
        return self.groups.has_live_members(group_id, now_ms)

    def member_assignment(self, group_id: str, member_id: str) -> list:
        """What a live member holds ([[topic, partition], ...]; [] for an unknown one)."""
        try:
            members = self.groups.describe(group_id)["members"]
        except GroupError:
            return []
        return next((m["assignment"] for m in members if m["member_id"] == member_id), [])

    def kafka_commit(self, group_id: str, offsets: dict, now_ms: int) -> None:
        """Store a Kafka group's commit ``{(topic, partition): (offset, metadata)}`` (the classic protocol
        gated it) beside the bus's groups' offsets: persisted when this returns."""
        self._run(lambda: self.groups.set_offsets(group_id, offsets, now_ms=now_ms))

    def _join(self, args, now_ms):
        if self.classic is not None and self.classic.has_members(args["group_id"]):
            raise InconsistentGroupProtocol(f"group {args['group_id']!r} has members of Kafka's classic protocol")
        reply = self._run(lambda: self.groups.join(
            args["group_id"], args.get("client_id", ""), group_instance_id=args.get("group_instance_id"),
            topics=args.get("topics"), pattern=args.get("pattern"), session_timeout_ms=args["session_timeout_ms"],
            assignor=args.get("assignor", core.STICKY), member_id=args.get("member_id"), now_ms=now_ms))
        return reply.to_wire()

    def _heartbeat(self, args, now_ms):
        owned = [_tp(item) for item in args["owned"]]
        reply = self._run(lambda: self.groups.heartbeat(
            args["group_id"], args["member_id"], args["member_epoch"], owned, topics=args.get("topics"),
            pattern=args.get("pattern"), now_ms=now_ms))
        return reply.to_wire()

    def _leave(self, args, now_ms):
        self._run(lambda: self.groups.leave(args["group_id"], args["member_id"], args["member_epoch"],
                                            args.get("reason", core.LEFT), now_ms=now_ms))
        return {}

    def _commit(self, args, now_ms):
        offsets = {}
        for topic, partition, offset, metadata in args["offsets"]:
            offsets[(topic, partition)] = (offset, metadata)
        return self._run(lambda: self.groups.commit(args["group_id"], args["member_id"], args["member_epoch"],
                                                    offsets, now_ms=now_ms)).to_wire()

    def _offset_fetch(self, args, now_ms):
        committed = self.groups.committed(args["group_id"])
        wanted = args.get("partitions")
        if wanted is None:
            items = sorted(committed)
        else:
            items = [_tp(item) for item in wanted]
        return {"offsets": [[t, p, *committed.get((t, p), (None, None))] for t, p in items]}

    def _list(self, args, now_ms):
        return {"groups": self.groups.list_groups()}

    def _describe(self, args, now_ms):
        group_id = args["group_id"]
        kafka = self._describe_classic(group_id)
        try:
            out = self.groups.describe(group_id)
        except GroupError as exc:
            if kafka is None:
                raise error_for(exc.code, exc.message) from None
            out = {"group_id": group_id, "offsets": []}  # a Kafka group that has committed nothing yet
        if kafka is not None:
            out.update(kafka)
        evictions = [e.to_wire() for e in self.groups.recent_evictions if e.group_id == group_id]
        out["evictions"] = evictions[-EVICTIONS_DESCRIBED_MAX:]
        return out

    def _describe_classic(self, group_id: str) -> dict | None:
        """A Kafka classic group's state and members in ``group_describe``'s shape (its generation as the
        epoch, its chosen client-side assignor), or None if it has none."""
        described = self.classic.describe(group_id) if self.classic is not None else None
        if described is None or not described["members"]:
            return None
        members = []
        for m in described["members"]:
            try:
                topics = sorted(subscribed_topics(m["member_metadata"])) if m["member_metadata"] else None
            except ValueError:
                topics = None
            assignment = [list(tp) for tp in assigned_partitions(m["member_assignment"])]
            members.append({"member_id": m["member_id"], "client_id": m["client_id"],
                            "group_instance_id": m["group_instance_id"], "member_epoch": described["generation"],
                            "topics": topics, "pattern": None, "session_timeout_ms": m["session_timeout_ms"],
                            "assignment": assignment, "target": assignment, "revoking": [], "pending": []})
        return {"state": described["group_state"].lower(), "group_epoch": described["generation"],
                "assignor": f"kafka:{described['protocol_data'] or '-'}", "members": members}

    def _reset_offsets(self, args, now_ms):
        offsets = {(topic, partition): offset for topic, partition, offset in args["offsets"]}
        self._run(lambda: self.groups.reset_offsets(args["group_id"], offsets, now_ms=now_ms))
        return {}

    def _delete(self, args, now_ms):
        self._run(lambda: self.groups.delete_group(args["group_id"], now_ms=now_ms))
        return {}
