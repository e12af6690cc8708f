"""Admin: create, delete, list and describe topics (partitions, owners, start and end offsets)."""

from __future__ import annotations

import zmq

from . import wire
from .connection import Requester
from .errors import BusError, NodeUnavailable, error_for
from .metadata import default_bootstrap
from .records import TopicPartition


def list_offsets(requester: Requester, specs: dict) -> dict:
    """{tp: offset} for {tp: "earliest" | "latest" | timestamp_ms}, asking each partition's owner."""
    metadata = requester.metadata(sorted({tp[0] for tp in specs}), strict=True)
    by_node: dict[int, list] = {}
    for tp, spec in specs.items():
        by_node.setdefault(metadata.owner(*tp), []).append((tp, spec))
    out = {}
    for node_id, items in by_node.items():
        try:
            result = requester.request(metadata.address(node_id), wire.LIST_OFFSETS,
                                       {"parts": [[t, p, spec] for (t, p), spec in items]})
        except BusError as exc:
            raise NodeUnavailable(f"node {node_id} did not answer: {exc}") from None
        for (tp, _), (code, message, offset, _, _) in zip(items, result["parts"]):
            if code is not None:
                raise error_for(code, message)
            out[TopicPartition(*tp)] = offset
    return out


class Admin:
    def __init__(self, bootstrap: str | None = None, *, request_timeout_ms: int = 10_000):
        self.bootstrap = bootstrap or default_bootstrap()
        self._context = zmq.Context()
        self._requester = Requester(self._context, self.bootstrap, request_timeout_ms)

    def create_topic(self, name: str, partitions: int = 1, *, retention_ms: int | None = None,
                     retention_bytes: int | None = None) -> dict:
        return self._requester.coordinator(wire.CREATE_TOPIC, {
            "name": name, "partitions": partitions, "retention_ms": retention_ms,
            "retention_bytes": retention_bytes})

    def delete_topic(self, name: str) -> None:
        self._requester.coordinator(wire.DELETE_TOPIC, {"name": name})

    def list_topics(self) -> dict:
        """{name: {"id", "partitions": [owner node id, ...], "retention_ms", "retention_bytes"}}"""
        return self._requester.metadata().topics

    def nodes(self) -> dict:
        """{node id: {"address", "alive"}}"""
        return self._requester.metadata().nodes

    def describe_topic(self, name: str) -> dict:
        """The topic's settings and, per partition: owner node, its address and liveness, start and end offsets.
        Offsets of a partition whose node does not answer are None."""
        metadata = self._requester.metadata([name], strict=True)
        topic = metadata.topics[name]
        partitions = []
        for partition, node_id in enumerate(topic["partitions"]):
            node = metadata.nodes.get(node_id, {})
            partitions.append({"partition": partition, "node": node_id, "address": node.get("address"),
                               "alive": node.get("alive", False), "start_offset": None, "end_offset": None})
        by_node: dict[int, list] = {}
        for entry in partitions:
            by_node.setdefault(entry["node"], []).append(entry)
        for node_id, entries in by_node.items():
            if not entries[0]["alive"]:
                continue
            try:
                result = self._requester.request(
                    entries[0]["address"], wire.LIST_OFFSETS,
                    {"parts": [[name, e["partition"], "earliest"] for e in entries]}, timeout_ms=3_000)
            except BusError:
                continue
            for entry, (code, _, _, start, end) in zip(entries, result["parts"]):
                if code is None:
                    entry["start_offset"], entry["end_offset"] = start, end
        return {"name": name, "id": topic["id"], "retention_ms": topic["retention_ms"],
                "retention_bytes": topic["retention_bytes"], "partitions": partitions}

    def close(self) -> None:
        self._requester.close()
        self._context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
