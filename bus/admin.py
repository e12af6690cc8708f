"""Admin: create, delete, list and describe topics (per partition: leader, replicas, in-sync replicas, epoch,
start offset and high watermark), unclean elections, and consumer groups (list, describe with lag, reset
offsets, delete)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable
from typing import Any, Literal

import zmq

from . import fork_guard, wire
from .connection import Requester
from .errors import BusError, ClosedError, ConfigError, NodeUnavailable, NotLeader, TopicExists, error_for
from .metadata import check_bootstrap
from .records import TopicPartition


def list_offsets(requester: Requester,
                 specs: dict[tuple[str, int], str | int]) -> dict[TopicPartition, int]:
    """{tp: offset} for {tp: "earliest" | "latest" | timestamp_ms}, asking each partition's leader ("latest"
    is the high watermark: the end of what consumers can read)."""
    metadata = requester.metadata(sorted({tp[0] for tp in specs}), strict=True)
    by_node: dict[int, list[tuple[tuple[str, int], str | int]]] = {}
    for tp, spec in specs.items():
        leader = metadata.leader(*tp)
        if leader not in metadata.nodes:
            raise NotLeader(f"{tp[0]}/{tp[1]} has no leader now (its in-sync replicas are down); retry later")
        by_node.setdefault(leader, []).append((tp, spec))
    out: dict[TopicPartition, int] = {}
    for node_id, items in by_node.items():
        try:
            result = requester.request(metadata.address(node_id), wire.LIST_OFFSETS,
                                       {"parts": [[t, p, spec, metadata.leader_epoch(t, p)] for (t, p), spec in items]})
        except BusError as exc:
            raise NodeUnavailable(f"node {node_id} did not answer: {exc}") from None
        for (tp, _), (code, message, offset, _, _) in zip(items, result["parts"]):
            if code is not None:
                raise error_for(code, message)
            out[TopicPartition(*tp)] = offset
    return out


class Admin:
    """Topics (create, delete, list, describe: per partition its leader, replicas, in-sync replicas, epoch,
    start offset and high watermark), unclean elections, and consumer groups (list, describe with lag,
    reset offsets, delete), asked of the coordinator and of each partition's leader. ``request_timeout_ms``
    bounds each question; a call on a closed Admin raises ClosedError. ``with`` closes it."""

    def __init__(self, bootstrap: str | None = None, *, request_timeout_ms: int = 10_000):
        self.bootstrap = check_bootstrap(bootstrap)
        self._closed = False
        self._context = zmq.Context()
        self._requester = Requester(self._context, self.bootstrap, request_timeout_ms)
        fork_guard.register(self)  # in a forked child, every call raises ForkedError instead of hanging

    def _check_open(self, call: str) -> None:
        """Every public call but close() starts here: on a closed Admin it raises ClosedError, having done
        nothing (its sockets are gone: what would leak otherwise is a ZeroMQ error)."""
        if self._closed:
            raise ClosedError(f"{call} on a closed Admin")

    def create_topic(self, name: str, partitions: int = 1, *, replication_factor: int | None = None,
                     min_insync_replicas: int | None = None, retention_ms: int | None = None,
                     retention_bytes: int | None = None, exist_ok: bool = False, wait_ms: int = 10_000) -> dict[str, Any]:
        """Create the topic with ``replication_factor`` replicas of each partition (default min(3, live
        nodes)) and ``min_insync_replicas`` (default 2 with 3 or more replicas, else 1: below it, acks="all"
        produces fail with NotEnoughReplicas). Then wait up to ``wait_ms`` until every leader serves it (the
        coordinator tells the nodes at once), so what follows -- describe, list offsets, a first fetch --
        does not meet a transient UNKNOWN_TOPIC. Returns the topic entry. With ``exist_ok``, a topic of that
        name that exists already is no error: its entry is returned as it is (its settings are not changed,
        nor compared with these)."""
        self._check_open("create_topic()")
        try:
            created = self._requester.coordinator(wire.CREATE_TOPIC, {
                "name": name, "partitions": partitions, "replication_factor": replication_factor,
                "min_insync_replicas": min_insync_replicas, "retention_ms": retention_ms,
                "retention_bytes": retention_bytes})
        except TopicExists:
            if not exist_ok:
                raise
            return {"name": name, **self._requester.metadata([name], strict=True).topics[name]}
        if wait_ms > 0:
            self._wait_until_served(name, [p["leader"] for p in created["partitions"]], wait_ms)
        return dict(created)

    def _wait_until_served(self, name: str, leaders: list[int], wait_ms: int) -> None:
        deadline_s = time.monotonic() + wait_ms / 1000
        waiting = {node_id: leaders.index(node_id) for node_id in leaders}  # node -> one partition it leads
        addresses = self._requester.metadata([name]).nodes
        while waiting:
            for node_id, partition in list(waiting.items()):
                remaining_ms = int((deadline_s - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    return  # the topic exists; its nodes will serve it once they hear of it
                try:
                    result = self._requester.request(addresses[node_id]["address"], wire.LIST_OFFSETS,
                                                     {"parts": [[name, partition, "earliest"]]},
                                                     timeout_ms=min(remaining_ms, 1_000))
                except BusError:
                    continue
                if result["parts"][0][0] is None:
                    del waiting[node_id]
            if waiting:
                time.sleep(0.01)

    def delete_topic(self, name: str) -> None:
        self._check_open("delete_topic()")
        self._requester.coordinator(wire.DELETE_TOPIC, {"name": name})

    def list_topics(self) -> dict[str, dict[str, Any]]:
        """{name: {"id", "partitions": [{"leader", "leader_epoch", "replicas", "isr", "partition_epoch"}, ...],
        "replication_factor", "min_insync_replicas", "retention_ms", "retention_bytes"}}"""
        self._check_open("list_topics()")
        return self._requester.metadata().topics

    def nodes(self) -> dict[int, dict[str, Any]]:
        """{node id: {"address", "alive"}}"""
        self._check_open("nodes()")
        return self._requester.metadata().nodes

    def describe_topic(self, name: str) -> dict[str, Any]:
        """The topic's settings and, per partition: ``leader`` (node id, -1 while it has none), its address
        and liveness, ``replicas``, ``isr``, ``leader_epoch``, ``partition_epoch`` (bumped by every change of
        leader or ISR), ``start_offset`` and ``high_watermark`` (the
        end of what consumers can read; also as ``end_offset``), ``under_replicated`` (ISR smaller than the
        replicas) and ``below_min_isr`` (ISR below min_insync_replicas: acks="all" produces fail). Offsets
        of a partition whose leader does not answer are None."""
        self._check_open("describe_topic()")
        metadata = self._requester.metadata([name], strict=True)
        topic = metadata.topics[name]
        partitions = []
        for partition, state in enumerate(topic["partitions"]):
            node = metadata.nodes.get(state["leader"], {})
            partitions.append({"partition": partition, "leader": state["leader"], "address": node.get("address"),
                               "alive": node.get("alive", False), "replicas": state["replicas"],
                               "isr": state["isr"], "leader_epoch": state["leader_epoch"],
                               "partition_epoch": state["partition_epoch"],
                               "under_replicated": len(state["isr"]) < len(state["replicas"]),
                               "below_min_isr": len(state["isr"]) < topic["min_insync_replicas"],
                               "start_offset": None, "high_watermark": None, "end_offset": None})
        by_node: dict[int, list[dict[str, Any]]] = {}
        for entry in partitions:
            by_node.setdefault(entry["leader"], []).append(entry)
        for node_id, entries in by_node.items():
            if not entries[0]["alive"]:
                continue
            try:
                result = self._requester.request(
                    entries[0]["address"], wire.LIST_OFFSETS,
                    {"parts": [[name, e["partition"], "earliest", e["leader_epoch"]] for e in entries]},
                    timeout_ms=3_000)
            except BusError:
                continue
            for entry, (code, _, _, start, high_watermark) in zip(entries, result["parts"]):
                if code is None:
                    entry["start_offset"] = start
                    entry["high_watermark"] = entry["end_offset"] = high_watermark
        return {"name": name, "id": topic["id"], "replication_factor": topic["replication_factor"],
                "min_insync_replicas": topic["min_insync_replicas"], "retention_ms": topic["retention_ms"],
                "retention_bytes": topic["retention_bytes"], "partitions": partitions}

    def elect_unclean(self, name: str, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """Elect a leader for partitions of ``name`` that have none because no in-sync replica is alive
        (all such partitions, or ``partitions``): any live replica becomes leader, and the committed records
        it lacks are LOST. Returns {partition: new leader node id}."""
        self._check_open("elect_unclean()")
        args = {"topic": name, "unclean": True}
        if partitions is not None:
            args["partitions"] = list(partitions)
        result = self._requester.coordinator(wire.ELECT_LEADERS, args)
        return {partition: leader for partition, leader in result["elected"]}

    # -- consumer groups -------------------------------------------------------------------------------

    def list_groups(self) -> list[dict[str, Any]]:
        """[{"group_id", "state" (empty / reconciling / stable), "group_epoch", "members"}, ...]"""
        self._check_open("list_groups()")
        groups: list[dict[str, Any]] = self._requester.coordinator(wire.GROUP_LIST, {})["groups"]
        return groups

    def describe_group(self, group_id: str) -> dict[str, Any]:
        """The group's state, members and, per partition: its member, committed offset, end offset and lag.

        Returns {"group_id", "state", "group_epoch", "assignor", "members": [...], "evictions": [...],
        "partitions": [{"topic", "partition", "member", "committed", "end", "lag"}, ...], "total_lag"}.
        ``end`` is None where the partition's node did not answer; ``lag`` (end - committed) is None where
        either is unknown, and ``total_lag`` sums the known ones. Raises UnknownGroup.
        """
        self._check_open("describe_group()")
        raw = self._requester.coordinator(wire.GROUP_DESCRIBE, {"group_id": group_id})
        owner: dict[TopicPartition, str] = {}
        for member in raw["members"]:
            for t, p in member["target"]:
                owner.setdefault(TopicPartition(t, p), member["member_id"])
            for t, p in member["assignment"]:
                owner[TopicPartition(t, p)] = member["member_id"]  # who holds it now beats who will
        committed: dict[TopicPartition, int] = {TopicPartition(o["topic"], o["partition"]): o["offset"]
                                                for o in raw["offsets"]}
        tps = sorted(set(owner) | set(committed))
        ends = self._end_offsets(tps)
        partitions, total_lag = [], 0
        for tp in tps:
            end, offset = ends.get(tp), committed.get(tp)
            lag = None if end is None or offset is None else max(0, end - offset)
            total_lag += lag or 0
            partitions.append({"topic": tp.topic, "partition": tp.partition, "member": owner.get(tp),
                               "committed": offset, "end": end, "lag": lag})
        out = {k: raw[k] for k in ("group_id", "state", "group_epoch", "assignor", "members")}
        out["evictions"] = raw.get("evictions", [])
        out["partitions"] = partitions
        out["total_lag"] = total_lag
        return out

    def reset_offsets(self, group_id: str, topic: str, to: Literal["earliest", "latest"] | int | datetime.datetime,
                      partitions: Iterable[int] | None = None) -> dict[TopicPartition, int]:
        """Set the group's committed offsets for ``topic`` (all partitions, or ``partitions``) to ``to``:
        "earliest", "latest", an offset (clamped into each partition's retained range) or a datetime (the
        first offset at or after it). Refused with GroupNotEmpty while the group has live members (the
        error names them). Returns {tp: offset}."""
        self._check_open("reset_offsets()")
        count = self._requester.metadata([topic], strict=True).partition_count(topic)
        wanted = range(count) if partitions is None else list(partitions)
        for partition in wanted:
            if not isinstance(partition, int) or not 0 <= partition < count:
                raise ConfigError(f"topic {topic!r} has no partition {partition!r}")
        tps = [TopicPartition(topic, p) for p in wanted]
        if isinstance(to, str) and to in ("earliest", "latest"):
            offsets = list_offsets(self._requester, {tp: to for tp in tps})
        elif isinstance(to, datetime.datetime):
            at_ms = int(to.timestamp() * 1000)  # a naive datetime is local time
            offsets = list_offsets(self._requester, {tp: at_ms for tp in tps})
        elif isinstance(to, int) and not isinstance(to, bool) and to >= 0:
            starts = list_offsets(self._requester, {tp: "earliest" for tp in tps})
            ends = list_offsets(self._requester, {tp: "latest" for tp in tps})
            offsets = {tp: min(max(to, starts[tp]), ends[tp]) for tp in tps}
        else:
            raise ConfigError(f"reset to 'earliest', 'latest', an offset >= 0 or a datetime, not {to!r}")
        self._requester.coordinator(wire.GROUP_RESET_OFFSETS, {
            "group_id": group_id, "offsets": [[t, p, offset] for (t, p), offset in sorted(offsets.items())]})
        return dict(sorted(offsets.items()))

    def delete_group(self, group_id: str) -> None:
        """Forget the group and its committed offsets. Raises UnknownGroup, or GroupNotEmpty with members."""
        self._check_open("delete_group()")
        self._requester.coordinator(wire.GROUP_DELETE, {"group_id": group_id})

    def group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        """{tp: committed offset} of the group ({} for an unknown group)."""
        self._check_open("group_offsets()")
        result = self._requester.coordinator(wire.OFFSET_FETCH, {"group_id": group_id})
        return {TopicPartition(t, p): offset for t, p, offset, _ in result["offsets"]}

    def _end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """{tp: log end offset} for the partitions whose node answers; the others are left out."""
        if not tps:
            return {}
        metadata = self._requester.metadata(sorted({tp.topic for tp in tps}))
        by_node: dict[int, list[TopicPartition]] = {}
        for tp in tps:
            topic = metadata.topics.get(tp.topic)
            if topic is not None and tp.partition < len(topic["partitions"]):
                by_node.setdefault(topic["partitions"][tp.partition]["leader"], []).append(tp)
        out: dict[TopicPartition, int] = {}
        for node_id, items in by_node.items():
            node = metadata.nodes.get(node_id)
            if node is None or not node.get("alive"):
                continue
            try:
                result = self._requester.request(node["address"], wire.LIST_OFFSETS,
                                                 {"parts": [[t, p, "latest", metadata.leader_epoch(t, p)]
                                                            for t, p in items]}, timeout_ms=3_000)
            except BusError:
                continue
            for tp, (code, _, offset, _, _) in zip(items, result["parts"]):
                if code is None:
                    out[tp] = offset
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._requester.close()
        self._context.term()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
