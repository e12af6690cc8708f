"""Prometheus metrics and `bus health` over real processes: what a scrape of each process says after a known
workload (records and bytes produced and fetched, request and commit latencies, partition sizes and ISRs,
consumer lag per group and partition, rebalances and evictions by reason), and the health command's exit
status with everything up, with a node down, and for one process."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from bus import Admin, Consumer, Producer
from nodes.controller import NODE_SESSION_TIMEOUT_MS
from tests.conftest import wait_for
from nodes.cluster import free_port_block
from tests.core_helpers import child_env


def scrape(url: str) -> dict:
    """{(name, frozenset of labels): value} of every sample at ``url``."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def health(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bus.cli", "health", *args], capture_output=True, text=True,
                          timeout=30, env=child_env())


def test_metrics_of_the_nodes_and_the_coordinator_and_bus_health(make_cluster):
    cluster = make_cluster(3, metrics_port=free_port_block(4))
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("metered", 2)
        leaders = [p["leader"] for p in admin.describe_topic("metered")["partitions"]]
    with Producer(cluster.bootstrap) as producer:
        for f in [producer.send("metered", b"x" * 100, partition=i % 2) for i in range(1_000)]:
            f.get(10)

    # A group reads partition 0 to its end and commits 300 of its 500 records: the lag is 200.
    with Consumer(cluster.bootstrap, topics=["metered"], group="billing", auto_offset_reset="earliest",
                  enable_auto_commit=False) as consumer:
        seen = []
        wait_for(lambda: seen.extend(consumer.poll(timeout_ms=200)) or len(seen) >= 1_000, 30,
                 message="the group reading everything")
        consumer.commit({("metered", 0): 300, ("metered", 1): 500})

    coordinator = cluster.metrics_url("coordinator")
    wait_for(lambda: value(scrape(coordinator), "bus_consumer_group_lag", group="billing", topic="metered",
                           partition=0) == 200, 10, message="the lag in the coordinator's metrics")
    samples = scrape(coordinator)
    assert value(samples, "bus_consumer_group_lag", group="billing", topic="metered", partition=1) == 0
    assert value(samples, "bus_consumer_group_committed_offset", group="billing", topic="metered", partition=0) == 300
    assert value(samples, "bus_group_rebalances_total", group="billing") >= 1
    assert value(samples, "bus_group_member_evictions_total", group="billing", reason="left") == 1  # closed
    assert value(samples, "bus_under_replicated_partitions") == 0 and value(samples, "bus_live_nodes") == 3
    assert value(samples, "bus_requests_total", op="group_join", outcome="ok") >= 1
    assert value(samples, "bus_request_duration_seconds_count", op="metadata") >= 1

    node = scrape(cluster.metrics_url(f"node-{leaders[0]}"))
    assert value(node, "bus_produced_records_total", topic="metered") == 500
    assert value(node, "bus_produced_bytes_total", topic="metered") > 500 * 100
    assert value(node, "bus_fetched_records_total", topic="metered") >= 500
    assert value(node, "bus_partition_high_watermark", topic="metered", partition=0) == 500
    assert value(node, "bus_partition_leader", topic="metered", partition=0) == 1
    assert value(node, "bus_partition_isr_size", topic="metered", partition=0) == 3
    assert value(node, "bus_partition_size_bytes", topic="metered", partition=0) > 500 * 100
    assert value(node, "bus_request_duration_seconds_count", op="produce") >= 1
    assert value(node, "bus_log_commit_duration_seconds_count", kind="produce") >= 1
    follower = next(n for n in (1, 2, 3) if n != leaders[0])
    assert value(scrape(cluster.metrics_url(f"node-{follower}")), "bus_replicated_bytes_total", topic="metered") > 0

    up = health("--bootstrap", cluster.bootstrap)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "node 3" in up.stdout
    assert health("--address", cluster.node_address(2)).returncode == 0

    cluster.kill_node(3)
    down = health("--bootstrap", cluster.bootstrap, "--timeout-ms", "500")
    assert down.returncode == 1 and "NO" in down.stdout
    one = health("--address", cluster.node_address(3), "--timeout-ms", "500")
    assert one.returncode == 1 and one.stdout.startswith("DOWN")
    wait_for(lambda: value(scrape(coordinator), "bus_under_replicated_partitions") == 2,
             NODE_SESSION_TIMEOUT_MS / 1000 + 10, message="the dead node's partitions under-replicated")
