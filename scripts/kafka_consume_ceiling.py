"""What bounds a confluent-kafka consumer reading the bus (docs/kafka.md, Speed): in one run, against one node,
interleaved, ``ROUNDS`` times each, the medians of

- the bus's Consumer reading records the bus's Producer wrote (``poll()``, only counting: the bench's bus row);
- confluent-kafka reading records confluent-kafka wrote, streaming (``consume(10000)``, only counting);
- confluent-kafka's ``consume(10000)`` alone: its queue filled first (``queued.min.messages`` above the
  topic, a pause for librdkafka to fetch it all), so nothing but the binding's own work per message is timed;

each with the CPU per record of the node and of each of the client's threads (the calling thread as "python";
the bus consumer's fetcher, librdkafka's broker thread).

    PYTHONPATH=$PWD python scripts/kafka_consume_ceiling.py [records] [rounds]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import confluent_kafka
import psutil

from bus import Admin, Consumer, Producer
from nodes.cluster import LocalCluster

RECORDS = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
VALUE = bytes(100)
POLL_RECORDS_MAX = 10_000
PREFILL_WAIT_S = 5.0  # long enough for librdkafka to fetch the whole topic into its queue on this machine
CONSUMER = {"group.id": "ceiling", "enable.auto.commit": False, "fetch.queue.backoff.ms": 10}


def _thread_cpu_s() -> dict:
    """CPU seconds of each thread of this process, by (tid, name)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            stat = f.read()
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        out[(tid, name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _create(bootstrap: str, topic: str) -> None:
    with Admin(bootstrap) as admin:
        admin.create_topic(topic, 1, replication_factor=1)
        while admin.describe_topic(topic)["partitions"][0]["end_offset"] is None:
            time.sleep(0.02)


def _load(cluster: LocalCluster) -> None:
    _create(cluster.bootstrap, "bus")
    with Producer(cluster.bootstrap, acks=1) as producer:
        for at in range(0, RECORDS, 1024):
            producer.send_many("bus", [VALUE] * min(1024, RECORDS - at))
        producer.flush()
    _create(cluster.bootstrap, "kafka")
    producer = confluent_kafka.Producer({"bootstrap.servers": cluster.kafka_bootstrap, "acks": 1, "linger.ms": 5,
                                         "batch.size": 1 << 20, "queue.buffering.max.kbytes": 1 << 20,
                                         "queue.buffering.max.messages": 1_000_000})
    for _ in range(RECORDS):
        while True:
            try:
                producer.produce("kafka", VALUE, partition=0)
                break
            except BufferError:
                producer.poll(0.01)
    assert producer.flush(120) == 0


def _cpu_ns_per_record(threads: dict, node: psutil.Process, node_s: float) -> dict:
    """CPU per record since ``threads`` and ``node_s`` were taken: the node's, and each thread's of this
    process by name (the main thread as "python")."""
    cpu = {"node": sum(node.cpu_times()[:2]) - node_s}
    for key, seconds in _thread_cpu_s().items():
        name = "python" if key[1].startswith("python") else key[1]
        cpu[name] = cpu.get(name, 0.0) + seconds - threads.get(key, 0.0)
    return {k: v / RECORDS * 1e9 for k, v in cpu.items() if v > 0.005}


def _bus(cluster: LocalCluster, node: psutil.Process) -> tuple[float, dict]:
    with Consumer(cluster.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([("bus", 0)])
        consumer.position(("bus", 0))
        threads, node_s, start, got = _thread_cpu_s(), sum(node.cpu_times()[:2]), time.perf_counter(), 0
        while got < RECORDS:
            got += len(consumer.poll(timeout_ms=100, max_records=POLL_RECORDS_MAX))
        return RECORDS / (time.perf_counter() - start), _cpu_ns_per_record(threads, node, node_s)


def _kafka(cluster: LocalCluster, node: psutil.Process, prefill: bool) -> tuple[float, dict]:
    extra = {"queued.min.messages": 2 * RECORDS, "queued.max.messages.kbytes": 2_097_151} if prefill else {}
    consumer = confluent_kafka.Consumer({"bootstrap.servers": cluster.kafka_bootstrap, **CONSUMER, **extra})
    tp = confluent_kafka.TopicPartition("kafka", 0, 0)
    try:
        consumer.get_watermark_offsets(tp, timeout=30)  # connected to the leader first, as the bench does
        consumer.assign([tp])
        if prefill:
            time.sleep(PREFILL_WAIT_S)
        threads, node_s, start, got = _thread_cpu_s(), sum(node.cpu_times()[:2]), time.perf_counter(), 0
        while got < RECORDS:
            got += len(consumer.consume(POLL_RECORDS_MAX, 0.1))
        return RECORDS / (time.perf_counter() - start), _cpu_ns_per_record(threads, node, node_s)
    finally:
        consumer.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        cluster = LocalCluster(data_dir, 1, sync="always", kafka_port=0)
        cluster.start(60)
        try:
            _load(cluster)
            node = psutil.Process(next(iter(cluster.nodes.values())).pid)
            rows: dict[str, list] = {"bus consumer": [], "confluent-kafka streaming": [],
                                     "confluent-kafka consume() alone": []}
            cpu: dict[str, list] = {name: [] for name in rows}
            runs = (("bus consumer", lambda: _bus(cluster, node)),
                    ("confluent-kafka streaming", lambda: _kafka(cluster, node, False)),
                    ("confluent-kafka consume() alone", lambda: _kafka(cluster, node, True)))
            for _ in range(ROUNDS):
                for name, run in runs:
                    rate, per_record = run()
                    rows[name].append(rate)
                    cpu[name].append(per_record)
        finally:
            cluster.stop()
    bus_rate = statistics.median(rows["bus consumer"])
    print(f"{RECORDS:,} records of {len(VALUE)} bytes, one partition, medians of {ROUNDS}; "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, rates in rows.items():
        rate = statistics.median(rates)
        line = f"{name:34} {rate / 1e6:5.2f} M records/s  {rate / bus_rate:4.2f} of the bus consumer"
        names = sorted({k for c in cpu[name] for k in c})
        line += "  CPU ns/record: " + ", ".join(
            f"{k} {statistics.median(c.get(k, 0.0) for c in cpu[name]):.0f}" for k in names)
        print(line)


if __name__ == "__main__":
    main()
