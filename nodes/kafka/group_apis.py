"""Kafka's group APIs on the bus's servers, the thin shell over two pure cores: the classic protocol's
membership (``classic_group.py``) and the bus's own groups (nodes/groups.py, through the coordinator's
``GroupService``, which persists before it returns), which hold every group's committed offsets and are
the members of KIP-848's protocol (ConsumerGroupHeartbeat) too.

Where each is answered: groups live on the coordinator, so every node answers FindCoordinator by
**pointing at it** (its Kafka address, under ``COORDINATOR_BROKER_ID``, which the coordinator sends every
node with the brokers in heartbeat replies): clients then talk to the coordinator directly, so a JoinGroup
held for a rebalance waits in one process only and a node holds nothing of a group's (forwarding would add
a hop to every heartbeat and commit and hold requests on nodes). A node answers the other group APIs
NOT_COORDINATOR, which sends a client back to FindCoordinator.

The coordinator's side holds the requests the protocol holds (a JoinGroup until the rebalance
completes, a SyncGroup until the leader's assignment is in): each gets a token, the core's ``Reply``
names the token, and ``tick`` (the coordinator's loop, at ``next_deadline_ms``) runs its timers.

One group name, one kind: a JoinGroup for a group that has live bus members, and a bus join for a group
with Kafka classic members, are refused (INCONSISTENT_GROUP_PROTOCOL). OffsetCommit is gated as Kafka's
classic coordinator gates it (``ClassicGroups.commit_error``); a simple commit (generation -1, no member
id, from an ``assign()`` consumer) is accepted for a group with no members of either kind.
"""

from __future__ import annotations

import itertools
import logging

from bus import wire
from bus.clock import monotonic_ms
from bus.errors import BusError

from ..controller import COORDINATOR_BROKER_ID
from ..groups import OFFSET_MAX, OFFSET_METADATA_CHARS_MAX, GroupError
from . import codec
from .classic_group import ClassicGroups, Reply, valid_group_id
from .listener import parse_host_port
from .service import topic_uuid

log = logging.getLogger("bus.kafka")

GROUP_KEY_TYPE = 0  # FindCoordinator's key type of a consumer group (1 is a transactional id)
# The bus's group states as Kafka's (KIP-848's names for groups of the consumer protocol).
BUS_STATES = {"empty": "Empty", "stable": "Stable", "reconciling": "Reconciling"}
NO_OFFSET = -1
# KIP-848 (ConsumerGroupHeartbeat) members are the bus's own group members (nodes/groups.py). Their session
# is the coordinator's to set (Kafka's group.consumer.session.timeout.ms, 45 s by default): 6 s here, so a
# member heartbeats every 2 s (a third of it) and a partition moves within a few seconds.
CONSUMER_SESSION_TIMEOUT_MS = 6_000
JOIN_EPOCH, LEAVE_EPOCH, STATIC_LEAVE_EPOCH = 0, -1, -2
SERVER_ASSIGNORS = {None: "sticky", "uniform": "sticky", "range": "range"}  # Kafka's names -> the bus's
KAFKA_ASSIGNORS = {"sticky": "uniform", "range": "range"}  # the bus's -> Kafka's (ConsumerGroupDescribe)
# The bus's group errors as a KIP-848 member's (ConsumerGroupHeartbeat) and its OffsetCommit's.
HEARTBEAT_CODES = {"UNKNOWN_MEMBER_ID": codec.UNKNOWN_MEMBER_ID, "FENCED_MEMBER_EPOCH": codec.FENCED_MEMBER_EPOCH,
                   "GROUP_FULL": codec.GROUP_MAX_SIZE_REACHED, "INCONSISTENT_ASSIGNOR": codec.UNSUPPORTED_ASSIGNOR,
                   "INCONSISTENT_GROUP_PROTOCOL": codec.INCONSISTENT_GROUP_PROTOCOL}
COMMIT_CODES = {"UNKNOWN_MEMBER_ID": codec.UNKNOWN_MEMBER_ID, "FENCED_MEMBER_EPOCH": codec.STALE_MEMBER_EPOCH,
                "NOT_ASSIGNED": codec.STALE_MEMBER_EPOCH, "GROUP_NOT_EMPTY": codec.UNKNOWN_MEMBER_ID}


def _subscription(body) -> dict:
    """A ConsumerGroupHeartbeat's subscription as the bus's group ops take it: {"pattern"} for a regular
    expression, else {"topics"} for the names, else nothing (both null: unchanged since the last). librdkafka
    sends "" for no expression."""
    regex = getattr(body, "subscribed_topic_regex", None) or None
    if regex is not None:
        return {"topics": None, "pattern": regex}
    if body.subscribed_topic_names is not None:
        return {"topics": list(body.subscribed_topic_names), "pattern": None}
    return {}


class GroupApis:
    def __init__(self, coordinator_address, *, classic: ClassicGroups | None = None, offsets=None, topics=None,
                 cluster_id=None, clock_ms=monotonic_ms):
        """``coordinator_address()``: HOST:PORT of the coordinator's Kafka listener, or None (unknown yet).
        On the coordinator: ``classic`` (its ClassicGroups), ``offsets`` (its GroupService, whose wire
        handlers serve KIP-848 members), ``topics()`` (the controller's placement), ``cluster_id()`` (for
        topic ids); on a node all None."""
        self.coordinator_address = coordinator_address
        self.classic, self.offsets, self.topics, self.clock_ms = classic, offsets, topics, clock_ms
        self.cluster_id = cluster_id
        self.bus_groups = offsets.handlers() if offsets is not None else {}
        self.held: dict[int, object] = {}  # token -> respond of a request the core holds
        self._tokens = itertools.count(1)

    def apis(self) -> dict:
        apis = {codec.FIND_COORDINATOR: self._find_coordinator}
        for key, handler in ((codec.JOIN_GROUP, self._join), (codec.SYNC_GROUP, self._sync),
                             (codec.HEARTBEAT, self._heartbeat), (codec.LEAVE_GROUP, self._leave),
                             (codec.OFFSET_COMMIT, self._offset_commit), (codec.OFFSET_FETCH, self._offset_fetch),
                             (codec.LIST_GROUPS, self._list_groups), (codec.DESCRIBE_GROUPS, self._describe_groups),
                             (codec.CONSUMER_GROUP_HEARTBEAT, self._consumer_group_heartbeat),
                             (codec.CONSUMER_GROUP_DESCRIBE, self._consumer_group_describe)):
            apis[key] = handler if self.classic is not None else self._not_coordinator
        return apis

    # -- the coordinator's loop --------------------------------------------------------------------

    def next_deadline_ms(self) -> int | None:
        return None if self.classic is None else self.classic.next_deadline_ms()

    def tick(self, now_ms: int) -> None:
        if self.classic is not None:
            self._deliver(self.classic.tick(now_ms))

    def _hold(self, respond) -> int:
        token = next(self._tokens)
        self.held[token] = respond
        return token

    def _deliver(self, replies: list[Reply]) -> None:
        for reply in replies:
            self.held.pop(reply.token)(reply.values)

    # -- FindCoordinator: every server -------------------------------------------------------------

    def _find_coordinator(self, header, body, respond) -> None:
        version = header.api_version
        keys = list(body.coordinator_keys or ()) if version >= 4 else [body.key]
        key_type = body.key_type if version >= 1 else GROUP_KEY_TYPE
        address = self.coordinator_address()
        rows = []
        for key in keys:
            row = {"key": key, "node_id": -1, "host": "", "port": -1, "error_code": codec.NONE, "error_message": None}
            if key_type != GROUP_KEY_TYPE:
                row.update(error_code=codec.INVALID_REQUEST, error_message="only group coordinators (key type 0): "
                                                                          "no transactions")
            elif address is None:
                row.update(error_code=codec.COORDINATOR_NOT_AVAILABLE, error_message="the coordinator's Kafka "
                                                                                    "address is not known yet")
            else:
                host, port = parse_host_port(address)
                row.update(node_id=COORDINATOR_BROKER_ID, host=host, port=port)
            rows.append(row)
        if version >= 4:
            respond({"throttle_time_ms": 0, "coordinators": rows})
        else:
            respond({"throttle_time_ms": 0, **rows[0]})

    def _not_coordinator(self, header, body, respond) -> None:
        """A node's answer to the group APIs: the coordinator has them (FindCoordinator says where)."""
        code = codec.NOT_COORDINATOR
        if header.api_key in (codec.OFFSET_COMMIT, codec.OFFSET_FETCH):
            topics = []
            for t in body.topics or ():
                indexes = ([p.partition_index for p in t.partitions or ()] if header.api_key == codec.OFFSET_COMMIT
                           else list(t.partition_indexes or ()))
                topics.append({"name": t.name, "partitions": [
                    {"partition_index": i, "error_code": code, "committed_offset": NO_OFFSET} for i in indexes]})
            respond({"throttle_time_ms": 0, "error_code": code, "topics": topics})
        elif header.api_key == codec.CONSUMER_GROUP_DESCRIBE:
            respond({"throttle_time_ms": 0, "groups": [
                {"error_code": code, "group_id": g, "group_state": "", "group_epoch": -1, "assignment_epoch": -1,
                 "assignor_name": "", "members": []} for g in body.group_ids or ()]})
        elif header.api_key == codec.DESCRIBE_GROUPS:
            respond({"throttle_time_ms": 0, "groups": [{"error_code": code, "group_id": g, "group_state": "",
                                                        "protocol_type": "", "protocol_data": "", "members": []}
                                                       for g in body.groups or ()]})
        else:
            respond({"throttle_time_ms": 0, "error_code": code, "member_id": "", "members": [], "groups": []})

    # -- the classic protocol: the coordinator -----------------------------------------------------

    def _join(self, header, body, respond) -> None:
        now_ms = self.clock_ms()
        token = self._hold(respond)
        if self.offsets.bus_members(body.group_id, now_ms):
            self._deliver([Reply(token, ClassicGroups.join_values(codec.INCONSISTENT_GROUP_PROTOCOL,
                                                                  member_id=body.member_id))])
            return
        self._deliver(self.classic.join(
            token, body.group_id, body.member_id, group_instance_id=getattr(body, "group_instance_id", None),
            client_id=header.client_id or "", client_host="", session_timeout_ms=body.session_timeout_ms,
            rebalance_timeout_ms=getattr(body, "rebalance_timeout_ms", -1), protocol_type=body.protocol_type,
            protocols=[(p.name, p.metadata) for p in body.protocols],
            require_known_member_id=header.api_version >= 4, now_ms=now_ms))

    def _sync(self, header, body, respond) -> None:
        token = self._hold(respond)
        self._deliver(self.classic.sync(
            token, body.group_id, body.generation_id, body.member_id,
            group_instance_id=getattr(body, "group_instance_id", None),
            protocol_type=getattr(body, "protocol_type", None), protocol_name=getattr(body, "protocol_name", None),
            assignments={a.member_id: a.assignment for a in body.assignments or ()}, now_ms=self.clock_ms()))

    def _heartbeat(self, header, body, respond) -> None:
        code = self.classic.heartbeat(body.group_id, body.generation_id, body.member_id, now_ms=self.clock_ms(),
                                      group_instance_id=getattr(body, "group_instance_id", None))
        respond({"throttle_time_ms": 0, "error_code": code})

    def _leave(self, header, body, respond) -> None:
        if header.api_version >= 3:
            leaving = [(m.member_id, m.group_instance_id) for m in body.members or ()]
        else:
            leaving = [(body.member_id, None)]
        codes, replies = self.classic.leave(body.group_id, leaving, now_ms=self.clock_ms())
        self._deliver(replies)
        respond({"throttle_time_ms": 0, "error_code": codes[0] if header.api_version < 3 and codes else codec.NONE,
                 "members": [{"member_id": m, "group_instance_id": i, "error_code": c}
                             for (m, i), c in zip(leaving, codes)]})

    # -- offsets: the bus's store ------------------------------------------------------------------

    def _offset_commit(self, header, body, respond) -> None:
        now_ms = self.clock_ms()
        group_id = body.group_id
        bus_member = False
        if not valid_group_id(group_id):
            gate = codec.INVALID_GROUP_ID
        elif body.member_id and self.offsets.bus_members(group_id, now_ms):
            gate, bus_member = None, True  # a KIP-848 member's: the bus's commit checks it (below)
        else:
            gate = self.classic.commit_error(group_id, body.generation_id_or_member_epoch, body.member_id,
                                             group_instance_id=getattr(body, "group_instance_id", None),
                                             now_ms=now_ms)
        placement = self.topics()
        codes: dict[tuple, int] = {}
        wanted = {}
        for topic in body.topics or ():
            partitions = (placement.get(topic.name) or {}).get("partitions", ())
            for part in topic.partitions or ():
                tp = (topic.name, part.partition_index)
                metadata = part.committed_metadata
                if gate not in (None, codec.NONE):
                    codes[tp] = gate
                elif not 0 <= part.partition_index < len(partitions):
                    codes[tp] = codec.UNKNOWN_TOPIC_OR_PARTITION
                elif metadata is not None and len(metadata) > OFFSET_METADATA_CHARS_MAX:
                    codes[tp] = codec.OFFSET_METADATA_TOO_LARGE
                elif not 0 <= part.committed_offset <= OFFSET_MAX:
                    codes[tp] = codec.INVALID_COMMIT_OFFSET_SIZE
                else:
                    wanted[tp] = (part.committed_offset, metadata)
        if wanted:
            try:  # on disk when it returns
                if bus_member:
                    self.bus_groups[wire.OFFSET_COMMIT]({
                        "group_id": group_id, "member_id": body.member_id,
                        "member_epoch": body.generation_id_or_member_epoch,
                        "offsets": [[t, p, o, m] for (t, p), (o, m) in wanted.items()]}, now_ms)
                else:
                    self.offsets.kafka_commit(group_id, wanted, now_ms)
                codes.update(dict.fromkeys(wanted, codec.NONE))
            except BusError as exc:
                # Live bus members own the group's offsets (a simple commit cannot be theirs); a KIP-848
                # member's commit at another epoch, or of a partition it no longer holds, is stale.
                codes.update(dict.fromkeys(wanted, COMMIT_CODES.get(exc.code, codec.kafka_code(exc.code))))
        respond({"throttle_time_ms": 0, "topics": [
            {"name": topic.name, "partitions": [{"partition_index": p.partition_index,
                                                 "error_code": codes[(topic.name, p.partition_index)]}
                                                for p in topic.partitions or ()]}
            for topic in body.topics or ()]})

    def _offset_fetch(self, header, body, respond) -> None:
        code = codec.NONE if valid_group_id(body.group_id) else codec.INVALID_GROUP_ID
        committed = self.offsets.groups.committed(body.group_id) if code == codec.NONE else {}
        if body.topics is None:  # v2+: every partition the group committed
            by_topic: dict[str, list] = {}
            for topic, partition in sorted(committed):
                by_topic.setdefault(topic, []).append(partition)
            asked = list(by_topic.items())
        else:
            asked = [(t.name, list(t.partition_indexes or ())) for t in body.topics]
        topics = []
        for name, partitions in asked:
            rows = []
            for partition in partitions:
                offset, metadata = committed.get((name, partition), (NO_OFFSET, ""))
                rows.append({"partition_index": partition, "committed_offset": offset, "committed_leader_epoch": -1,
                             "metadata": metadata, "error_code": code})
            topics.append({"name": name, "partitions": rows})
        respond({"throttle_time_ms": 0, "topics": topics, "error_code": code})

    # -- ConsumerGroupHeartbeat (KIP-848): the bus's own groups -------------------------------------

    def _consumer_group_heartbeat(self, header, body, respond) -> None:
        """Join (epoch 0), heartbeat or leave (-1, -2) as a member of the bus's own group state machine,
        which already is KIP-848's protocol: the coordinator assigns, a member gives partitions back before
        another gets them, epochs fence. Topics travel as topic ids; a null owned list means unchanged (the
        member still holds what it was granted)."""
        now_ms = self.clock_ms()
        cluster_id = self.cluster_id()
        ids = {topic_uuid(cluster_id, t["id"]): name for name, t in self.topics().items()}
        names = {name: topic_id for topic_id, name in ids.items()}
        group_id, epoch = body.group_id, body.member_epoch

        def answer(code: int, message: str | None = None, reply: dict | None = None) -> None:
            values = {"throttle_time_ms": 0, "error_code": code, "error_message": message,
                      "member_id": body.member_id or None, "member_epoch": epoch, "heartbeat_interval_ms": 0}
            if reply is not None:
                by_topic: dict[str, list] = {}
                for topic, partition in reply["assignment"]:
                    by_topic.setdefault(topic, []).append(partition)
                values.update(member_id=reply["member_id"], member_epoch=reply["member_epoch"],
                              heartbeat_interval_ms=reply["heartbeat_interval_ms"], assignment={"topic_partitions": [
                                  {"topic_id": names[t], "partitions": p} for t, p in by_topic.items() if t in names]})
            respond(values)

        if not valid_group_id(group_id):
            answer(codec.INVALID_GROUP_ID, f"group id {group_id!r}")
            return
        try:
            if epoch == JOIN_EPOCH:
                assignor = SERVER_ASSIGNORS.get(body.server_assignor)
                if assignor is None:
                    answer(codec.UNSUPPORTED_ASSIGNOR, f"assignors: {', '.join(a for a in SERVER_ASSIGNORS if a)}")
                    return
                answer(codec.NONE, reply=self.bus_groups[wire.GROUP_JOIN]({
                    "group_id": group_id, "client_id": header.client_id or "", "group_instance_id": body.instance_id,
                    **_subscription(body), "session_timeout_ms": CONSUMER_SESSION_TIMEOUT_MS, "assignor": assignor,
                    "member_id": body.member_id or None}, now_ms))
            elif epoch == STATIC_LEAVE_EPOCH:
                # A static member going away to come back (KIP-848): it stays in the group holding its
                # partitions until its session times out, unless a member with its instance id joins first,
                # which takes its place and its assignment with no rebalance (the groups' static replacement).
                if not body.instance_id:
                    answer(codec.INVALID_REQUEST, "member epoch -2 (a static member's leave) needs its instance id")
                    return
                answer(codec.NONE)
            elif epoch == LEAVE_EPOCH:
                self.bus_groups[wire.GROUP_LEAVE]({"group_id": group_id, "member_id": body.member_id,
                                                   "member_epoch": 0}, now_ms)
                answer(codec.NONE)
            else:
                if body.topic_partitions is None:
                    owned = self.offsets.member_assignment(group_id, body.member_id)
                else:
                    owned = [[ids[tp.topic_id], p] for tp in body.topic_partitions if tp.topic_id in ids
                             for p in tp.partitions]
                answer(codec.NONE, reply=self.bus_groups[wire.GROUP_HEARTBEAT]({
                    "group_id": group_id, "member_id": body.member_id, "member_epoch": epoch, "owned": owned,
                    **_subscription(body)}, now_ms))
        except BusError as exc:
            answer(HEARTBEAT_CODES.get(exc.code, codec.INVALID_REQUEST), exc.message)

    def _consumer_group_describe(self, header, body, respond) -> None:
        """A bus group (KIP-848 members and the bus's own are one kind) with its members, their
        subscriptions, what each holds and its target; GROUP_ID_NOT_FOUND for a classic group (librdkafka
        then asks DescribeGroups, as Kafka answers) and for an unknown one."""
        names = {t["id"]: name for name, t in self.topics().items()}
        cluster_id = self.cluster_id()
        ids = {name: topic_uuid(cluster_id, topic_id) for topic_id, name in names.items()}

        def assignment(tps: list) -> dict:
            by_topic: dict[str, list] = {}
            for topic, partition in tps:
                by_topic.setdefault(topic, []).append(partition)
            return {"topic_partitions": [{"topic_id": ids[t], "topic_name": t, "partitions": sorted(p)}
                                         for t, p in sorted(by_topic.items()) if t in ids]}

        out = []
        for group_id in body.group_ids or ():
            row = {"group_id": group_id, "group_state": "", "group_epoch": -1, "assignment_epoch": -1,
                   "assignor_name": "", "members": []}
            if not valid_group_id(group_id):
                out.append({**row, "error_code": codec.INVALID_GROUP_ID, "error_message": f"group id {group_id!r}"})
                continue
            try:
                described = None if self.classic.has_members(group_id) else self.offsets.groups.describe(group_id)
            except GroupError:
                described = None
            if described is None:
                out.append({**row, "error_code": codec.GROUP_ID_NOT_FOUND,
                            "error_message": f"group {group_id!r} is not a consumer group"})
                continue
            out.append({**row, "error_code": codec.NONE, "group_state": BUS_STATES.get(described["state"], ""),
                        "group_epoch": described["group_epoch"], "assignment_epoch": described["group_epoch"],
                        "assignor_name": KAFKA_ASSIGNORS[described["assignor"]], "members": [
                            {"member_id": m["member_id"], "instance_id": m["group_instance_id"],
                             "member_epoch": m["member_epoch"], "client_id": m["client_id"], "client_host": "",
                             "subscribed_topic_names": m["topics"] or [], "subscribed_topic_regex": m["pattern"],
                             "assignment": assignment(m["assignment"]),
                             "target_assignment": assignment(m["target"]), "member_type": 1}
                            for m in described["members"]]})
        respond({"throttle_time_ms": 0, "groups": out})

    # -- ListGroups, DescribeGroups ----------------------------------------------------------------

    def _all_groups(self) -> list[dict]:
        """Kafka classic groups with members, then the bus's (its groups and the Kafka groups' offsets)."""
        rows = self.classic.list_groups()
        named = {row["group_id"] for row in rows}
        for g in self.offsets.groups.list_groups():
            if g["group_id"] not in named:
                rows.append({"group_id": g["group_id"], "protocol_type": "consumer",
                             "group_state": BUS_STATES.get(g["state"], g["state"])})
        return rows

    def _list_groups(self, header, body, respond) -> None:
        states = {s.lower() for s in getattr(body, "states_filter", None) or ()}
        groups = [g for g in self._all_groups() if not states or g["group_state"].lower() in states]
        respond({"throttle_time_ms": 0, "error_code": codec.NONE, "groups": groups})

    def _describe_groups(self, header, body, respond) -> None:
        out = []
        for group_id in body.groups or ():
            described = self.classic.describe(group_id)
            if described is None:
                bus = {g["group_id"]: g for g in self.offsets.groups.list_groups()}.get(group_id)
                described = {"group_id": group_id, "group_state": "Dead", "protocol_type": "", "protocol_data": "",
                             "members": []}
                if bus is not None:
                    described.update(group_state=BUS_STATES.get(bus["state"], bus["state"]), protocol_type="consumer")
            out.append({"error_code": codec.NONE, **described})
        respond({"throttle_time_ms": 0, "groups": out})

