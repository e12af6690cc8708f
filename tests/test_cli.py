"""The ``bus`` command line against a real ``bus up`` cluster: topics, produce, consume, errors, shutdown."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import wait_for
from nodes.cluster import free_port_block
from tests.core_helpers import child_env

BUS = [sys.executable, "-m", "bus.cli"]


def read_until(proc, marker: bytes, timeout_s: float) -> bytes:
    out = b""
    deadline_s = time.monotonic() + timeout_s
    while marker not in out:
        remaining = deadline_s - time.monotonic()
        assert remaining > 0 and proc.poll() is None, f"no {marker!r} from bus up:\n{out.decode()}"
        if select.select([proc.stdout], [], [], remaining)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"bus up closed its output:\n{out.decode()}"
            out += chunk
    return out


@pytest.fixture(scope="module")
def bus_up(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cli") / "data"
    port = free_port_block(6)  # one block, so the two cannot overlap
    kafka_port = port + 3
    proc = subprocess.Popen([*BUS, "up", "--data-dir", str(data_dir), "--port", str(port), "--nodes", "2",
                             "--metrics-port", "0", "--kafka-port", str(kafka_port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=child_env())
    try:
        banner = read_until(proc, b"ready:", 30)
        assert f"bootstrap: tcp://127.0.0.1:{port}".encode() in banner
        assert f"kafka: bootstrap.servers=127.0.0.1:{kafka_port}".encode() in banner
        yield proc, f"tcp://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def bus(*args, bootstrap=None, stdin=b"", timeout_s=30):
    argv = [*BUS, *args] + (["--bootstrap", bootstrap] if bootstrap else [])
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout_s, env=child_env())


def test_topics_produce_and_consume(bus_up):
    _, bootstrap = bus_up
    created = bus("topic", "create", "cli-events", "--partitions", "3", bootstrap=bootstrap)
    assert created.returncode == 0, created.stderr
    assert b"created topic cli-events with 3 partition(s)" in created.stdout

    lines = b"".join(b"user-%d:event-%d\n" % (i % 4, i) for i in range(50))
    produced = bus("produce", "cli-events", "--key-separator", ":", bootstrap=bootstrap, stdin=lines)
    assert produced.returncode == 0, produced.stderr
    assert b"50 record(s) acknowledged" in produced.stderr

    consumed = bus("consume", "cli-events", "--from-beginning", "--max-records", "50", "--format", "json",
                   bootstrap=bootstrap)
    assert consumed.returncode == 0, consumed.stderr
    records = [json.loads(line) for line in consumed.stdout.decode().splitlines()]
    assert len(records) == 50
    assert sorted(r["value"] for r in records) == sorted("event-%d" % i for i in range(50))
    partitions_of_key = {}
    for r in records:
        assert r["topic"] == "cli-events" and r["value"] == "event-%s" % r["value"].split("-")[1]
        partitions_of_key.setdefault(r["key"], set()).add(r["partition"])
    assert set(partitions_of_key) == {"user-%d" % i for i in range(4)}
    assert all(len(p) == 1 for p in partitions_of_key.values())
    for partition in range(3):  # per key, in the order the lines were given
        values = [int(r["value"].split("-")[1]) for r in records if r["partition"] == partition]
        offsets = [r["offset"] for r in records if r["partition"] == partition]
        assert offsets == list(range(len(offsets))) and values == sorted(values)

    text = bus("consume", "cli-events", "--from-beginning", "--partition", "0", "--timeout-ms", "300",
               bootstrap=bootstrap)
    assert text.returncode == 0, text.stderr
    assert text.stdout.decode().splitlines() == [r["value"] for r in records if r["partition"] == 0]
    keyed = bus("consume", "cli-events", "--from-beginning", "--partition", "0", "--timeout-ms", "300",
                "--print-key", bootstrap=bootstrap)
    assert keyed.stdout.decode().splitlines() == [f"{r['key']}\t{r['value']}" for r in records if r["partition"] == 0]
    formatted = bus("consume", "cli-events", "--from-beginning", "--partition", "0", "--timeout-ms", "300",
                    "--format", r"%p:%o:%k:%s\n", bootstrap=bootstrap)
    assert formatted.returncode == 0, formatted.stderr
    assert formatted.stdout.decode().splitlines() == [f"0:{r['offset']}:{r['key']}:{r['value']}"
                                                      for r in records if r["partition"] == 0]
    unknown = bus("consume", "cli-events", "--format", "%q", bootstrap=bootstrap)
    assert unknown.returncode == 2 and b"unknown format token %q" in unknown.stderr

    described = bus("topic", "describe", "cli-events", bootstrap=bootstrap)
    assert described.returncode == 0, described.stderr
    rows = [line.split() for line in described.stdout.decode().splitlines()[3:]]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert sum(int(row[-1]) for row in rows) == 50  # the records column
    assert all(row[3] == "yes" for row in rows)

    listed = bus("topic", "list", bootstrap=bootstrap)
    assert listed.returncode == 0, listed.stderr
    # topic, partitions, retention_ms, retention_bytes, then the replicas (2 live nodes) and min in-sync replicas
    assert ["cli-events", "3", "-", "-", "2", "1"] in [line.split() for line in listed.stdout.decode().splitlines()]

    again = bus("topic", "create", "cli-events", bootstrap=bootstrap)
    assert again.returncode == 1 and b"already exists" in again.stderr
    kept = bus("topic", "create", "cli-events", "--partitions", "5", "--if-not-exists", bootstrap=bootstrap)
    assert kept.returncode == 0 and b"with 3 partition(s)" in kept.stdout  # left as it was


@pytest.mark.parametrize("args", [
    ["produce", "no-such-topic"],
    ["consume", "no-such-topic", "--max-records", "1"],
    ["topic", "describe", "no-such-topic"],
    ["topic", "delete", "no-such-topic"],
])
def test_an_unknown_topic_is_one_clear_line_and_exit_1(bus_up, args):
    _, bootstrap = bus_up
    result = bus(*args, bootstrap=bootstrap, stdin=b"a line\n")
    assert result.returncode == 1, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "no-such-topic" in lines[0] and lines[0].startswith("error:"), lines
    assert result.stdout == b""


@pytest.mark.parametrize("args", [
    ["topic", "create"],
    ["topic", "create", "x", "--partitions", "0"],
    ["topic", "create", "x", "--retention-ms", "soon"],
    ["consume", "x", "--format", "xml"],
    ["consume", "x", "--group", "g", "--partition", "0"],
    ["up", "--nodes", "0"],
    ["no-such-command"],
])
def test_bad_arguments_are_usage_errors(bus_up, args):
    _, bootstrap = bus_up
    result = bus(*args, bootstrap=bootstrap if args[0] != "up" and args[0] != "no-such-command" else None)
    assert result.returncode == 2, result
    assert b"Usage:" in result.stderr


def test_produce_line_without_separator_is_a_usage_error(bus_up):
    _, bootstrap = bus_up
    bus("topic", "create", "cli-sep", bootstrap=bootstrap)
    result = bus("produce", "cli-sep", "--key-separator", ":", bootstrap=bootstrap, stdin=b"k:v\nno separator\n")
    assert result.returncode == 2 and b"no key separator" in result.stderr


def test_sigterm_stops_bus_up_and_all_its_children(bus_up):
    proc, _ = bus_up  # module-scoped: this runs last in the module
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) == 3  # the coordinator and two nodes
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    out = proc.stdout.read()
    assert b"stopped" in out

    def gone(child):  # exited and reaped by bus up (not a zombie, not an orphan)
        return not child.is_running()

    wait_for(lambda: all(gone(c) for c in children), 10, message="bus up's children gone")


def test_a_second_bus_up_on_a_port_or_directory_in_use_fails_before_ready_and_a_crashed_node_restarts(tmp_path):
    data_dir, port = tmp_path / "data", free_port_block(9)  # one block, so the three cannot overlap
    metrics_port, kafka_port = port + 3, port + 6
    first = subprocess.Popen([*BUS, "up", "--data-dir", str(data_dir), "--port", str(port), "--nodes", "2",
                              "--metrics-port", str(metrics_port), "--kafka-port", str(kafka_port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env())
    try:
        banner = read_until(first, b"ready:", 30)
        assert f"logs in {data_dir}/logs".encode() in banner
        assert f"node-2 http://127.0.0.1:{metrics_port + 2}/metrics".encode() in banner
        same_port = subprocess.run([*BUS, "up", "--data-dir", str(tmp_path / "other"), "--port", str(port),
                                    "--nodes", "2", "--metrics-port", "0", "--kafka-port", "0"], capture_output=True,
                                   timeout=30,
                                   env=child_env())
        assert same_port.returncode == 1 and b"ready" not in same_port.stdout
        assert same_port.stderr.decode().strip().splitlines() == [
            f"error: port {port} on 127.0.0.1 is in use (another `bus up`?); stop it, or choose other ports "
            "with --port"]
        same_dir = subprocess.run([*BUS, "up", "--data-dir", str(data_dir), "--port", str(free_port_block(3)),
                                   "--nodes", "2", "--metrics-port", "0", "--kafka-port", "0"], capture_output=True,
                                  timeout=30,
                                  env=child_env())
        assert same_dir.returncode == 1 and b"ready" not in same_dir.stdout
        assert f"data directory {data_dir}/coordinator is in use".encode() in same_dir.stderr
        same_metrics = subprocess.run([*BUS, "up", "--data-dir", str(tmp_path / "third"), "--port",
                                       str(free_port_block(3)), "--nodes", "2", "--metrics-port", str(metrics_port),
                                       "--kafka-port", "0"], capture_output=True, timeout=30, env=child_env())
        assert same_metrics.returncode == 1 and b"choose other ports with --metrics-port" in same_metrics.stderr
        # The Kafka listeners' ports are checked alike (node 2's: the last of the block).
        same_kafka = subprocess.run([*BUS, "up", "--data-dir", str(tmp_path / "fourth"), "--port",
                                     str(free_port_block(3)), "--nodes", "2", "--metrics-port", "0",
                                     "--kafka-port", str(kafka_port + 2)], capture_output=True, timeout=30,
                                    env=child_env())
        assert same_kafka.returncode == 1 and b"ready" not in same_kafka.stdout
        assert f"port {kafka_port + 2} on 127.0.0.1 is in use".encode() in same_kafka.stderr
        assert b"choose other ports with --kafka-port" in same_kafka.stderr
        assert same_dir.returncode == 1 and b"ready" not in same_dir.stdout
        assert f"data directory {data_dir}/coordinator is in use".encode() in same_dir.stderr
        assert len(same_dir.stderr.decode().strip().splitlines()) == 1
        # A node killed under it is started again after a back-off, and the line names its log.
        node_pid = int(subprocess.run(["pgrep", "-f", f"node-id 1 --data-dir {data_dir}/node-1"],
                                      capture_output=True, text=True).stdout.split()[0])
        os.kill(node_pid, signal.SIGKILL)
        said = read_until(first, b"restarting in 1 s", 10)
        assert f"{data_dir}/logs/node-1.log".encode() in said
        wait_for(lambda: subprocess.run(["pgrep", "-f", f"node-id 1 --data-dir {data_dir}/node-1"],
                                        capture_output=True).returncode == 0, 10, message="node 1 started again")
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(20)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
            first.stdout.close()


def test_a_process_that_keeps_exiting_stops_the_cluster_with_its_last_lines(tmp_path):
    """bus up's supervisor, on a cluster whose node 1 exits at once every time it starts."""
    from bus.cli import _supervise
    from nodes.cluster import LocalCluster

    cluster = LocalCluster(str(tmp_path / "data"), 1)
    failing = [sys.executable, "-c", "import sys; print('node 1 cannot start: boom', flush=True); sys.exit(3)"]
    cluster.start_node = lambda node_id: cluster.nodes.__setitem__(node_id, cluster._spawn("node-1", failing[1:]))
    cluster.start_coordinator = None  # must not be needed
    cluster.coordinator = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cluster.start_node(1)
        started_s = time.monotonic()
        with pytest.raises(RuntimeError) as gave_up:
            _supervise(cluster, {"now": False}, backoff_s=(0.05, 0.1), restarts_max=3, window_s=60, poll_s=0.01)
        assert time.monotonic() - started_s < 10
        message = str(gave_up.value)
        assert "node-1 exited 4 times within 60 s; giving up" in message
        assert str(tmp_path / "data" / "logs" / "node-1.log") in message and "cannot start: boom" in message
    finally:
        cluster.coordinator.kill()
        cluster.coordinator.wait()
        for proc in cluster.nodes.values():
            proc.wait()
