"""The ``bus`` command: run a local cluster or its parts, manage topics, produce and consume from a shell.

Every client command takes ``--bootstrap`` (default: $BUS_BOOTSTRAP, else tcp://127.0.0.1:7400). Bus
errors print one line saying what to do and exit with status 1; bad arguments are click usage errors.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time

import click

from .errors import BusError
from .metadata import DEFAULT_BOOTSTRAP


def bootstrap_option(fn):
    return click.option("--bootstrap", envvar="BUS_BOOTSTRAP", default=DEFAULT_BOOTSTRAP, show_default=True,
                        help="coordinator address ($BUS_BOOTSTRAP)")(fn)


def friendly_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BusError as exc:
            click.echo(f"error: {exc.message}", err=True)
            if exc.code in ("TIMEOUT", "NODE_UNAVAILABLE"):
                click.echo("is the cluster running? start one with `bus up`", err=True)
            sys.exit(1)
    return wrapper


def print_table(headers: list, rows: list) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        click.echo("  ".join(c.rjust(w) if c.replace("-", "").isdigit() else c.ljust(w)
                             for c, w in zip(row, widths)).rstrip())
        if index == 0:
            click.echo("  ".join("-" * w for w in widths))


@click.group()
@click.version_option(package_name="bus")
def main():
    """the bus: a durable, partitioned event log on ZeroMQ and LMDB."""


# -- servers -----------------------------------------------------------------------------------------

@main.command()
@click.option("--data-dir", default="./bus-data", show_default=True, type=click.Path(file_okay=False))
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--port", default=7400, show_default=True, type=click.IntRange(1, 65535 - 65),
              help="coordinator port; nodes listen on the next ones")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--sync", default="always", show_default=True, type=click.Choice(["always", "interval", "none"]),
              help="always: an ack means the record is on disk")
def up(data_dir, nodes, port, host, sync):
    """Start a local cluster (a coordinator and NODES nodes) in the foreground; Ctrl-C stops it."""
    from nodes.cluster import LocalCluster

    cluster = LocalCluster(data_dir, nodes, port=port, host=host, sync=sync)
    stop = {"now": False}

    def request_stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    click.echo(f"starting a coordinator and {nodes} node(s) in {os.path.abspath(data_dir)} ...")
    try:
        cluster.start()
        click.echo(f"bootstrap: {cluster.bootstrap}")
        for node_id in cluster.node_ports:
            click.echo(f"node {node_id}: {cluster.node_address(node_id)}")
        click.echo(f"ready: bus is up (sync={sync}); Ctrl-C to stop")
        while not stop["now"]:
            time.sleep(0.2)
            for node_id, proc in cluster.nodes.items():
                if proc.poll() is not None:
                    click.echo(f"node {node_id} exited ({proc.returncode}); restarting; log: "
                               f"{cluster.data_dir}/logs/node-{node_id}.log", err=True)
                    cluster.start_node(node_id)
    except (TimeoutError, RuntimeError, BusError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    finally:
        click.echo("stopping ...")
        cluster.stop()
        click.echo("stopped")


@main.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False))
@click.option("--bind", default="tcp://127.0.0.1:7400", show_default=True)
@friendly_errors
def coordinator(data_dir, bind):
    """Run a coordinator (for a cluster over several hosts)."""
    from nodes.coordinator import run_coordinator

    run_coordinator(data_dir, bind)


@main.command()
@click.option("--node-id", required=True, type=click.IntRange(0))
@click.option("--data-dir", required=True, type=click.Path(file_okay=False))
@click.option("--bind", required=True, help="e.g. tcp://0.0.0.0:7401")
@click.option("--advertise", default=None, help="address clients use (default: --bind)")
@click.option("--coordinator", "coordinator_address", required=True, help="e.g. tcp://host:7400")
@click.option("--sync", default="always", show_default=True, type=click.Choice(["always", "interval", "none"]))
@friendly_errors
def node(node_id, data_dir, bind, advertise, coordinator_address, sync):
    """Run a partition-owner node."""
    from nodes.node import main as node_main

    argv = ["--node-id", str(node_id), "--data-dir", data_dir, "--bind", bind, "--coordinator",
            coordinator_address, "--sync", sync] + (["--advertise", advertise] if advertise else [])
    node_main(argv)


# -- topics ------------------------------------------------------------------------------------------

@main.group()
def topic():
    """Create, list, describe and delete topics."""


@topic.command("create")
@click.argument("name")
@click.option("--partitions", default=1, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--retention-ms", type=click.IntRange(1), default=None, help="drop batches older than this")
@click.option("--retention-bytes", type=click.IntRange(1), default=None, help="keep each partition under this")
@bootstrap_option
@friendly_errors
def topic_create(name, partitions, retention_ms, retention_bytes, bootstrap):
    """Create topic NAME."""
    from .admin import Admin

    with Admin(bootstrap) as admin:
        created = admin.create_topic(name, partitions, retention_ms=retention_ms, retention_bytes=retention_bytes)
    click.echo(f"created topic {name} with {partitions} partition(s) on nodes {sorted(set(created['partitions']))}")


@topic.command("list")
@bootstrap_option
@friendly_errors
def topic_list(bootstrap):
    """List topics."""
    from .admin import Admin

    with Admin(bootstrap) as admin:
        topics = admin.list_topics()
    print_table(["topic", "partitions", "retention_ms", "retention_bytes"],
                [[name, len(t["partitions"]), t["retention_ms"], t["retention_bytes"]] for name, t in sorted(topics.items())])


@topic.command("describe")
@click.argument("name")
@bootstrap_option
@friendly_errors
def topic_describe(name, bootstrap):
    """Show each partition's owner node and its start and end offsets."""
    from .admin import Admin

    with Admin(bootstrap) as admin:
        info = admin.describe_topic(name)
    click.echo(f"topic {name}  retention_ms={info['retention_ms']}  retention_bytes={info['retention_bytes']}")
    rows = []
    for p in info["partitions"]:
        count = None if p["end_offset"] is None else p["end_offset"] - p["start_offset"]
        rows.append([p["partition"], p["node"], p["address"], "yes" if p["alive"] else "NO",
                     p["start_offset"], p["end_offset"], count])
    print_table(["partition", "node", "address", "alive", "start", "end", "records"], rows)


@topic.command("delete")
@click.argument("name")
@bootstrap_option
@friendly_errors
def topic_delete(name, bootstrap):
    """Delete topic NAME and its data."""
    from .admin import Admin

    with Admin(bootstrap) as admin:
        admin.delete_topic(name)
    click.echo(f"deleted topic {name}")


# -- produce and consume -------------------------------------------------------------------------------

@main.command()
@click.argument("topic_name", metavar="TOPIC")
@click.option("--key-separator", default=None, help="split each line into KEY<sep>VALUE")
@click.option("--partition", type=click.IntRange(0), default=None)
@bootstrap_option
@friendly_errors
def produce(topic_name, key_separator, partition, bootstrap):
    """Send one record per line of standard input; prints how many were acknowledged."""
    from .producer import Producer

    count = 0
    with Producer(bootstrap) as producer:
        futures = []
        for line in sys.stdin.buffer:
            line = line.rstrip(b"\r\n")
            key = None
            if key_separator is not None:
                sep = key_separator.encode()
                if sep not in line:
                    raise click.UsageError(f"line {count + 1} has no key separator {key_separator!r}")
                key, line = line.split(sep, 1)
            futures.append(producer.send(topic_name, line, key=key, partition=partition))
            count += 1
        producer.flush()
        for future in futures:
            future.get()
    click.echo(f"{count} record(s) acknowledged", err=True)


@main.command()
@click.argument("topic_name", metavar="TOPIC")
@click.option("--group", default=None, help="consume as a member of this consumer group")
@click.option("--from-beginning", is_flag=True, help="start at the earliest retained offset")
@click.option("--partition", type=click.IntRange(0), multiple=True, help="only these partitions (no group)")
@click.option("--max-records", type=click.IntRange(1), default=None, help="stop after this many")
@click.option("--timeout-ms", type=click.IntRange(0), default=None, help="stop after this long without a record")
@click.option("--format", "fmt", default="text", show_default=True, type=click.Choice(["text", "json"]))
@bootstrap_option
@friendly_errors
def consume(topic_name, group, from_beginning, partition, max_records, timeout_ms, fmt, bootstrap):
    """Print records of TOPIC as they arrive (text: the value; json: one object per line)."""
    from .consumer import Consumer

    reset = "earliest" if from_beginning else "latest"
    if group is not None and partition:
        raise click.UsageError("--partition and --group exclude each other")
    if group is not None:
        consumer = Consumer(bootstrap, topics=[topic_name], group=group, auto_offset_reset=reset)
    else:
        consumer = Consumer(bootstrap, auto_offset_reset=reset)
        from .admin import Admin

        with Admin(bootstrap) as admin:
            count = len(admin.list_topics().get(topic_name, {}).get("partitions", ())) or None
        if count is None:
            from .errors import UnknownTopic

            consumer.close()
            raise UnknownTopic(f"unknown topic {topic_name!r}; create it with `bus topic create {topic_name}`")
        consumer.assign([(topic_name, p) for p in (partition or range(count))])
    seen = 0
    out = sys.stdout
    try:
        last_s = time.monotonic()
        while max_records is None or seen < max_records:
            records = consumer.poll(timeout_ms=200, max_records=(max_records - seen) if max_records else 10_000)
            if not records:
                if timeout_ms is not None and (time.monotonic() - last_s) * 1000 >= timeout_ms:
                    break
                continue
            last_s = time.monotonic()
            for record in records:
                if fmt == "json":
                    out.write(json.dumps({
                        "topic": record.topic, "partition": record.partition, "offset": record.offset,
                        "timestamp_ms": record.timestamp_ms,
                        "key": None if record.key is None else record.key.decode(errors="replace"),
                        "value": record.value.decode(errors="replace"),
                        "headers": None if record.headers is None else {
                            k: v.decode(errors="replace") for k, v in record.headers}}) + "\n")
                else:
                    out.write(record.value.decode(errors="replace") + "\n")
            seen += len(records)
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
