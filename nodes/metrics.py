"""Prometheus metrics of a node and of the coordinator, served over HTTP by the process itself.

Uses the prometheus-client library (the reference implementation; its text format is what every scraper
reads). Each process has a registry of its own and, when started with ``--metrics-port``, serves it at
``http://ADDR:PORT/metrics`` from a daemon thread; the loop only bumps counters and observes durations
(a microsecond or two per request, never per record). What the loop owns and changes (partitions,
groups) is read at scrape time by a collector, from snapshots that are safe to take from another thread.

Names follow Prometheus's conventions: ``bus_`` first, base units (seconds, bytes), ``_total`` for
counters. Labels are topics and partitions, never record keys. docs/operations.md lists them.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("bus.metrics")

# Request and commit durations, from a tenth of a millisecond to half a minute (an acks=all produce can wait).
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0)


def serve(registry: CollectorRegistry, port: int | None, addr: str = "127.0.0.1") -> None:
    """Serve ``registry`` on ``addr:port`` (not at all with port None). A port in use is an error at start,
    raised as OSError, so the process fails with one clear line rather than run unobserved."""
    if port is None:
        return
    start_http_server(port, addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)


class RequestMetrics:
    """What both servers count: requests by op and their durations."""

    def __init__(self, registry: CollectorRegistry, role: str):
        self.requests = Counter("bus_requests_total", f"requests the {role} answered, by op and outcome",
                                ["op", "outcome"], registry=registry)
        self.duration = Histogram("bus_request_duration_seconds",
                                  f"from a request's arrival at the {role} to its answer, by op", ["op"],
                                  buckets=LATENCY_BUCKETS_S, registry=registry)

    def answered(self, op: str, seconds: float, error: str | None = None) -> None:
        self.requests.labels(op, "ok" if error is None else error).inc()
        self.duration.labels(op).observe(seconds)


class NodeMetrics(RequestMetrics):
    """A node's metrics. ``node`` is the nodes.node.Node it describes (read at scrape time)."""

    def __init__(self, node):
        self.registry = CollectorRegistry()
        super().__init__(self.registry, "node")
        self.produced_records = Counter("bus_produced_records_total", "records appended by produces, by topic",
                                        ["topic"], registry=self.registry)
        self.produced_bytes = Counter("bus_produced_bytes_total", "bytes of batches appended by produces, by topic",
                                      ["topic"], registry=self.registry)
        self.fetched_records = Counter("bus_fetched_records_total", "records served to consumers, by topic",
                                       ["topic"], registry=self.registry)
        self.fetched_bytes = Counter("bus_fetched_bytes_total", "bytes of batches served to consumers, by topic",
                                     ["topic"], registry=self.registry)
        self.replicated_bytes = Counter("bus_replicated_bytes_total",
                                        "bytes of batches this node stored as a follower, by topic", ["topic"],
                                        registry=self.registry)
        self.commit = Histogram("bus_log_commit_duration_seconds",
                                "one write transaction of the log, synced (a loop turn's produces, or a follower's "
                                "append)", ["kind"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.registry.register(_NodeCollector(node))


class _NodeCollector:
    """Per partition held: its log's size and offsets, and, where this node leads, its ISR."""

    def __init__(self, node):
        self.node = node

    def collect(self):
        labels = ["topic", "partition"]
        size = GaugeMetricFamily("bus_partition_size_bytes", "bytes of stored batches of a partition replica", labels=labels)
        start = GaugeMetricFamily("bus_partition_log_start_offset", "a partition replica's first offset", labels=labels)
        end = GaugeMetricFamily("bus_partition_log_end_offset", "a partition replica's log end offset", labels=labels)
        high = GaugeMetricFamily("bus_partition_high_watermark", "a partition replica's high watermark", labels=labels)
        leader = GaugeMetricFamily("bus_partition_leader", "1 where this node leads the partition", labels=labels)
        isr = GaugeMetricFamily("bus_partition_isr_size", "in-sync replicas of a partition this node leads",
                                labels=labels)
        under = GaugeMetricFamily("bus_partition_under_replicated",
                                  "1 where this node leads a partition whose ISR is smaller than its replicas",
                                  labels=labels)
        below = GaugeMetricFamily("bus_partition_below_min_isr",
                                  "1 where this node leads a partition whose ISR is below min_insync_replicas",
                                  labels=labels)
        # list() is one step under the GIL: the loop may add or drop partitions meanwhile.
        for tp, plog in list(self.node.logs.items()):
            replica = self.node.replicas.get(tp)
            values = [tp[0], str(tp[1])]
            size.add_metric(values, plog.size_bytes)
            start.add_metric(values, plog.start_offset)
            end.add_metric(values, plog.next_offset)
            high.add_metric(values, plog.high_watermark)
            leads = replica is not None and replica.role == "leader"
            leader.add_metric(values, 1 if leads else 0)
            if leads:
                assignment = replica.assignment
                isr.add_metric(values, len(assignment.isr))
                under.add_metric(values, 1 if len(assignment.isr) < len(assignment.replicas) else 0)
                below.add_metric(values, 1 if len(assignment.isr) < replica.min_insync else 0)
        return [size, start, end, high, leader, isr, under, below]


class CoordinatorMetrics(RequestMetrics):
    """The coordinator's metrics: groups (rebalances, evictions by reason, consumer lag) and the cluster's
    partitions (offline, under-replicated). ``coordinator`` is the nodes.coordinator.Coordinator."""

    def __init__(self, coordinator):
        self.registry = CollectorRegistry()
        super().__init__(self.registry, "coordinator")
        self.rebalances = Counter("bus_group_rebalances_total", "times a group's epoch moved (a new assignment)",
                                  ["group"], registry=self.registry)
        self.evictions = Counter("bus_group_member_evictions_total", "members removed from a group, by reason",
                                 ["group", "reason"], registry=self.registry)
        self.registry.register(_CoordinatorCollector(coordinator))


class _CoordinatorCollector:
    def __init__(self, coordinator):
        self.coordinator = coordinator

    def collect(self):
        c = self.coordinator
        lag = GaugeMetricFamily("bus_consumer_group_lag",
                                "records between a group's committed offset and the partition's high watermark",
                                labels=["group", "topic", "partition"])
        committed = GaugeMetricFamily("bus_consumer_group_committed_offset", "a group's committed offset",
                                      labels=["group", "topic", "partition"])
        members = GaugeMetricFamily("bus_consumer_group_members", "live members of a group", labels=["group"])
        for group_id, offsets, live in c.groups.snapshot():
            members.add_metric([group_id], live)
            for (topic, partition), offset in offsets.items():
                values = [group_id, topic, str(partition)]
                committed.add_metric(values, offset)
                end = c.end_offsets.get((topic, partition))
                if end is not None:
                    lag.add_metric(values, max(0, end - offset))
        offline = GaugeMetricFamily("bus_offline_partitions", "partitions without a leader")
        under = GaugeMetricFamily("bus_under_replicated_partitions", "partitions whose ISR is smaller than their replicas")
        below = GaugeMetricFamily("bus_below_min_isr_partitions", "partitions whose ISR is below min_insync_replicas")
        nodes = GaugeMetricFamily("bus_live_nodes", "nodes whose session is alive")
        counts = [0, 0, 0]
        for topic in list(c.controller.topics.values()):
            for p in list(topic["partitions"]):
                counts[0] += p["leader"] < 0
                counts[1] += len(p["isr"]) < len(p["replicas"])
                counts[2] += len(p["isr"]) < topic["min_insync_replicas"]
        offline.add_metric([], counts[0])
        under.add_metric([], counts[1])
        below.add_metric([], counts[2])
        nodes.add_metric([], sum(1 for n in list(c.controller.nodes.values()) if c.controller.alive(n)))
        elections = CounterMetricFamily("bus_partition_leader_elections",
                                        "changes of a partition's leader the controller decided since it started")
        elections.add_metric([], c.controller.elections)
        return [lag, committed, members, offline, under, below, nodes, elections]
