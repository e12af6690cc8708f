"""The ``bus`` command: run a local cluster or its parts, manage topics, produce and consume from a shell.

Every client command takes ``--bootstrap`` (default: $BUS_BOOTSTRAP, else tcp://127.0.0.1:7400). Bus
errors print one line saying what to do and exit with status 1; bad arguments are click usage errors.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NoReturn, ParamSpec, TypeVar

import click

from . import wire
from .errors import BusError
from .metadata import DEFAULT_BOOTSTRAP
from .printing import FORMAT_TOKENS, check_format, record_formatted, record_json

if TYPE_CHECKING:
    import datetime
    from types import FrameType

    from nodes.cluster import LocalCluster

_P = ParamSpec("_P")
_R = TypeVar("_R")
_F = TypeVar("_F", bound=Callable[..., Any])


def bootstrap_option(fn: _F) -> _F:
    return click.option("--bootstrap", envvar="BUS_BOOTSTRAP", default=DEFAULT_BOOTSTRAP, show_default=True,
                        help="coordinator address ($BUS_BOOTSTRAP)")(fn)


def friendly_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except BusError as exc:
            click.echo(f"error: {exc.message}", err=True)
            if exc.outcome == "indeterminate":  # no answer: most often, nothing is listening
                click.echo("is the cluster running? start one with `bus up`", err=True)
            sys.exit(1)
    return wrapper


def print_table(headers: Sequence[object], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        click.echo("  ".join(c.rjust(w) if c.replace("-", "").isdigit() else c.ljust(w)
                             for c, w in zip(row, widths)).rstrip())
        if index == 0:
            click.echo("  ".join("-" * w for w in widths))


@click.group()
@click.version_option(package_name="bus")
def main() -> None:
    """the bus: a durable, partitioned, replicated event log on ZeroMQ and LMDB.

    Start a local cluster with `bus up`; every client command takes --bootstrap (default $BUS_BOOTSTRAP,
    else tcp://127.0.0.1:7400). `bus COMMAND --help` tells more."""


# -- servers -----------------------------------------------------------------------------------------

@main.command()
@click.option("--data-dir", default="./bus-data", show_default=True, type=click.Path(file_okay=False),
              help="the coordinator's and the nodes' LMDB directories, and logs/, go here")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 64), help="partition-owner nodes")
@click.option("--port", default=7400, show_default=True, type=click.IntRange(1, 65535 - 65),
              help="coordinator port; nodes listen on the next ones")
@click.option("--host", default="127.0.0.1", show_default=True, help="the address every process binds and advertises")
@click.option("--sync", default="always", show_default=True, type=click.Choice(["always", "interval", "none"]),
              help="always: an ack means the record is on disk")
@click.option("--metrics-port", default=9400, show_default=True, type=click.IntRange(0, 65535 - 65),
              help="Prometheus metrics: the coordinator on this port, node N on this port + N (0: none)")
@click.option("--kafka-port", default=9092, show_default=True, type=click.IntRange(0, 65535 - 65),
              help="Kafka's protocol: the coordinator (bootstrap.servers) on this port, node N on this port + N (0: off)")
def up(data_dir: str, nodes: int, port: int, host: str, sync: str, metrics_port: int, kafka_port: int) -> None:
    """Start a local cluster (a coordinator and NODES nodes) in the foreground; Ctrl-C stops it.

    A port or data directory in use (another `bus up`) is refused before anything starts. A process that
    exits is started again after a back-off (1 s, doubling to 30 s); one that exits 6 times within 2 minutes
    stops the cluster, with its log's last lines."""
    from nodes.cluster import ClusterInUse, LocalCluster

    cluster = LocalCluster(data_dir, nodes, port=port, host=host, sync=sync, metrics_port=metrics_port or None,
                           kafka_port=kafka_port or None)
    stop = {"now": False}

    def request_stop(_signal: int, _frame: FrameType | None) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        cluster.check_free()
    except ClusterInUse as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"starting a coordinator and {nodes} node(s) in {os.path.abspath(data_dir)} "
               f"(logs in {cluster.log_dir}) ...")
    try:
        cluster.start()
        click.echo(f"bootstrap: {cluster.bootstrap}")
        for node_id in cluster.node_ports:
            click.echo(f"node {node_id}: {cluster.node_address(node_id)}")
        if kafka_port:
            click.echo(f"kafka: bootstrap.servers={cluster.kafka_bootstrap}")
        if metrics_port:
            click.echo("metrics: " + "  ".join(f"{name} {cluster.metrics_url(name)}" for name in
                                               ["coordinator", *(f"node-{n}" for n in cluster.node_ports)]))
        replicas = min(3, nodes)
        click.echo(f"new topics get {replicas} replica(s) of each partition by default "
                   f"(min in-sync {2 if replicas >= 3 else 1}; `bus topic create --replication-factor` to choose)")
        click.echo(f"ready: bus is up (sync={sync}); Ctrl-C to stop")
        _supervise(cluster, stop)
    except (TimeoutError, RuntimeError, BusError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    finally:
        click.echo("stopping ...")
        cluster.stop()
        click.echo("stopped")


RESTART_BACKOFF_S = (1, 2, 4, 8, 16, 30)
RESTARTS_MAX = 5  # within RESTART_WINDOW_S: then the cluster stops rather than restart a crashing process forever
RESTART_WINDOW_S = 120


def _supervise(cluster: LocalCluster, stop: dict[str, bool], backoff_s: Sequence[float] = RESTART_BACKOFF_S,
               restarts_max: int = RESTARTS_MAX, window_s: float = RESTART_WINDOW_S, poll_s: float = 0.2) -> None:
    """Restart what exits, with a back-off and a limit, until ``stop["now"]``."""
    restarts: dict[str, list[float]] = {}  # process name -> when it was restarted, within the window
    due: dict[str, float] = {}  # process name -> when to start it again
    while not stop["now"]:
        time.sleep(poll_s)
        now_s = time.monotonic()
        children = [("coordinator", cluster.coordinator), *((f"node-{n}", p) for n, p in cluster.nodes.items())]
        for name, proc in children:
            assert proc is not None  # the cluster was started before it is supervised
            if proc.poll() is None or name in due and now_s < due[name]:
                continue
            if name not in due:
                recent = [t for t in restarts.get(name, []) if now_s - t < window_s]
                restarts[name] = recent
                if len(recent) >= restarts_max:
                    raise RuntimeError(f"{name} exited {len(recent) + 1} times within {window_s:g} s; "
                                       f"giving up. Its last lines ({cluster.log_path(name)}):\n"
                                       f"{cluster.log_tail(name)}")
                wait_s = backoff_s[min(len(recent), len(backoff_s) - 1)]
                due[name] = now_s + wait_s
                click.echo(f"{name} exited ({proc.returncode}); restarting in {wait_s:g} s. Its last lines "
                           f"({cluster.log_path(name)}):\n{cluster.log_tail(name, 5)}", err=True)
                continue
            del due[name]
            restarts[name].append(now_s)
            if name == "coordinator":
                cluster.start_coordinator()
            else:
                cluster.start_node(int(name.split("-")[1]))


@main.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="its LMDB directory (one coordinator per directory)")
@click.option("--bind", default="tcp://127.0.0.1:7400", show_default=True, help="the address clients and nodes reach")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="serve Prometheus metrics here")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, help="the address metrics are served on")
@click.option("--kafka-listen", default=None,
              help="HOST:PORT: answer Kafka's protocol there (clients' bootstrap.servers)")
@click.option("--kafka-advertise", default=None,
              help="HOST:PORT Kafka clients reach it at, as their group coordinator (default: --kafka-listen)")
@friendly_errors
def coordinator(data_dir: str, bind: str, metrics_port: int | None, metrics_addr: str, kafka_listen: str | None,
                kafka_advertise: str | None) -> None:
    """Run a coordinator (for a cluster over several hosts)."""
    from nodes.coordinator import run_coordinator

    run_coordinator(data_dir, bind, metrics_port=metrics_port, metrics_addr=metrics_addr, kafka_listen=kafka_listen,
                    kafka_advertise=kafka_advertise)


@main.command()
@click.option("--node-id", required=True, type=click.IntRange(0), help="unique in the cluster, for good")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="its LMDB directory (bound to this node id forever)")
@click.option("--bind", required=True, help="e.g. tcp://0.0.0.0:7401")
@click.option("--advertise", default=None, help="address clients use (default: --bind)")
@click.option("--coordinator", "coordinator_address", required=True, help="e.g. tcp://host:7400")
@click.option("--sync", default="always", show_default=True, type=click.Choice(["always", "interval", "none"]),
              help="always: an ack means the record is on disk; interval: synced every 100 ms; none: by the OS")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="serve Prometheus metrics here")
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, help="the address metrics are served on")
@click.option("--kafka-listen", default=None, help="HOST:PORT: answer Kafka's protocol there")
@click.option("--kafka-advertise", default=None, help="HOST:PORT Kafka clients reach it at (default: --kafka-listen)")
@friendly_errors
def node(node_id: int, data_dir: str, bind: str, advertise: str | None, coordinator_address: str, sync: str,
         metrics_port: int | None, metrics_addr: str, kafka_listen: str | None, kafka_advertise: str | None) -> None:
    """Run a partition-owner node."""
    from nodes.node import main as node_main

    argv = ["--node-id", str(node_id), "--data-dir", data_dir, "--bind", bind, "--coordinator",
            coordinator_address, "--sync", sync, "--metrics-addr", metrics_addr]
    argv += ["--advertise", advertise] if advertise else []
    argv += ["--metrics-port", str(metrics_port)] if metrics_port else []
    argv += ["--kafka-listen", kafka_listen] if kafka_listen else []
    argv += ["--kafka-advertise", kafka_advertise] if kafka_advertise else []
    node_main(argv)


@main.command()
@click.option("--address", default=None,
              help="check this one process (a node's or the coordinator's address), as a container probe does")
@click.option("--timeout-ms", default=2_000, show_default=True, type=click.IntRange(1),
              help="how long each process has to answer")
@bootstrap_option
def health(address: str | None, timeout_ms: int, bootstrap: str) -> None:
    """Exit 0 if the cluster (the coordinator and every node it knows) answers, else 1, with a table.

    With --address, only that process must answer (a liveness probe for one container)."""
    import zmq

    from .connection import Requester
    from .metadata import ClusterMetadata

    context = zmq.Context()
    requester = Requester(context, bootstrap, timeout_ms)

    def answers(where: str) -> bool:
        try:
            requester.request(where, wire.PING, {}, timeout_ms=timeout_ms)
            return True
        except BusError:
            return False

    try:
        if address is not None:
            ok = answers(address)
            click.echo(f"{'ok' if ok else 'DOWN'}: {address}{'' if ok else f' did not answer within {timeout_ms} ms'}")
            sys.exit(0 if ok else 1)
        try:
            metadata = ClusterMetadata(requester.coordinator(wire.METADATA, {}, timeout_ms=timeout_ms))
        except BusError as exc:
            click.echo(f"DOWN: the coordinator at {bootstrap} did not answer ({exc.message}); is the cluster "
                       "running? start one with `bus up`", err=True)
            sys.exit(1)
        rows, ok = [["coordinator", bootstrap, "yes", "-"]], True
        for node_id, node in sorted(metadata.nodes.items()):
            up = answers(node["address"])
            ok = ok and up and node["alive"]
            rows.append([f"node {node_id}", node["address"], "yes" if up else "NO", "yes" if node["alive"] else "NO"])
        print_table(["process", "address", "answers", "alive (coordinator's view)"], rows)
        sys.exit(0 if ok else 1)
    finally:
        requester.close()
        context.term()


# -- topics ------------------------------------------------------------------------------------------

@main.group()
def topic() -> None:
    """Create, list, describe and delete topics."""


@topic.command("create")
@click.argument("name")
@click.option("--partitions", default=1, show_default=True, type=click.IntRange(1, 10_000),
              help="ordered logs the topic is split into; a key always goes to the same one")
@click.option("--replication-factor", type=click.IntRange(1), default=None,
              help="replicas of each partition  [default: min(3, live nodes)]")
@click.option("--min-insync-replicas", type=click.IntRange(1), default=None,
              help="in-sync replicas an acks=all produce needs  [default: 2 with 3+ replicas, else 1]")
@click.option("--retention-ms", type=click.IntRange(1), default=None, help="drop batches older than this")
@click.option("--retention-bytes", type=click.IntRange(1), default=None, help="keep each partition under this")
@click.option("--if-not-exists", is_flag=True, help="a topic NAME that exists already is no error (left as it is)")
@bootstrap_option
@friendly_errors
def topic_create(name: str, partitions: int, replication_factor: int | None, min_insync_replicas: int | None,
                 retention_ms: int | None, retention_bytes: int | None, if_not_exists: bool, bootstrap: str) -> None:
    """Create topic NAME."""
    from .admin import Admin

    with Admin(bootstrap) as admin:
        created = admin.create_topic(name, partitions, replication_factor=replication_factor,
                                     min_insync_replicas=min_insync_replicas, retention_ms=retention_ms,
                                     retention_bytes=retention_bytes, exist_ok=if_not_exists)
        partitions = len(created["partitions"])
    nodes = sorted({n for p in created["partitions"] for n in p["replicas"]})
    click.echo(f"created topic {name} with {partitions} partition(s), {created['replication_factor']} replica(s) "
               f"each (min in-sync {created['min_insync_replicas']}), on nodes {nodes}")


@topic.command("list")
@bootstrap_option
@friendly_errors
def topic_list(bootstrap: str) -> None:
    """List topics."""
    from .admin import Admin

    with Admin(bootstrap) as admin:
        topics = admin.list_topics()
    print_table(["topic", "partitions", "retention_ms", "retention_bytes", "replicas", "min_isr"],
                [[name, len(t["partitions"]), t["retention_ms"], t["retention_bytes"], t["replication_factor"],
                  t["min_insync_replicas"]] for name, t in sorted(topics.items())])


@topic.command("describe")
@click.argument("name")
@bootstrap_option
@friendly_errors
def topic_describe(name: str, bootstrap: str) -> None:
    """Show each partition's leader, replicas, in-sync replicas, leader epoch, start offset and high
    watermark (the end of what consumers can read); flags under-replicated partitions and those below
    min_insync_replicas (acks=all produces to them fail)."""
    from .admin import Admin

    with Admin(bootstrap) as admin:
        info = admin.describe_topic(name)
    click.echo(f"topic {name}  replication_factor={info['replication_factor']}  "
               f"min_insync_replicas={info['min_insync_replicas']}  retention_ms={info['retention_ms']}  "
               f"retention_bytes={info['retention_bytes']}")
    rows = []
    for p in info["partitions"]:
        count = None if p["high_watermark"] is None else p["high_watermark"] - p["start_offset"]
        flags = "NO LEADER" if p["leader"] < 0 else "BELOW MIN ISR" if p["below_min_isr"] else (
            "under-replicated" if p["under_replicated"] else "")
        rows.append([p["partition"], p["leader"] if p["leader"] >= 0 else None, p["address"],
                     "yes" if p["alive"] else "NO", ",".join(map(str, p["replicas"])), ",".join(map(str, p["isr"])),
                     p["leader_epoch"], p["start_offset"], p["high_watermark"], count, flags])
    print_table(["partition", "leader", "address", "alive", "replicas", "isr", "epoch", "start", "high_watermark",
                 "records", ""], rows)
    missing = [p["partition"] for p in info["partitions"] if p["leader"] < 0]
    if missing:
        click.echo(f"partitions {missing} have no leader: no in-sync replica is alive. Start one, or as a last "
                   f"resort `bus topic elect {name} --unclean` (loses what the live replicas lack)", err=True)


@topic.command("elect")
@click.argument("name")
@click.option("--unclean", is_flag=True, required=True,
              help="elect any live replica, losing committed records it lacks (required: say you mean it)")
@click.option("--partition", type=click.IntRange(0), multiple=True, help="only these partitions")
@bootstrap_option
@friendly_errors
def topic_elect(name: str, unclean: bool, partition: tuple[int, ...], bootstrap: str) -> None:
    """Elect leaders for partitions of NAME that have none because no in-sync replica is alive."""
    from .admin import Admin

    if not unclean:
        raise click.UsageError("a clean election happens by itself; pass --unclean to elect an out-of-sync replica")
    with Admin(bootstrap) as admin:
        elected = admin.elect_unclean(name, list(partition) or None)
    if not elected:
        click.echo("every partition has a leader; nothing to do")
    for p, leader in sorted(elected.items()):
        click.echo(f"{name}/{p}: node {leader} leads (unclean: records it did not have are gone)")


@topic.command("delete")
@click.argument("name")
@bootstrap_option
@friendly_errors
def topic_delete(name: str, bootstrap: str) -> None:
    """Delete topic NAME and its data."""
    from .admin import Admin

    with Admin(bootstrap) as admin:
        admin.delete_topic(name)
    click.echo(f"deleted topic {name}")


# -- consumer groups ---------------------------------------------------------------------------------

@main.group()
def group() -> None:
    """List, describe, reset the offsets of, and delete consumer groups."""


@group.command("list")
@bootstrap_option
@friendly_errors
def group_list(bootstrap: str) -> None:
    """List consumer groups."""
    from .admin import Admin

    with Admin(bootstrap) as admin:
        groups = admin.list_groups()
    if not groups:
        click.echo("no consumer groups")
        return
    print_table(["group", "state", "epoch", "members"],
                [[g["group_id"], g["state"], g["group_epoch"], g["members"]] for g in groups])


def _unknown_group(name: str) -> NoReturn:
    click.echo(f"error: unknown consumer group {name!r}; `bus group list` shows the groups", err=True)
    sys.exit(1)


@group.command("describe")
@click.argument("name")
@bootstrap_option
@friendly_errors
def group_describe(name: str, bootstrap: str) -> None:
    """Show GROUP's members and, per partition, its member, committed offset, end offset and lag."""
    from .admin import Admin
    from .errors import UnknownGroup

    try:
        with Admin(bootstrap) as admin:
            info = admin.describe_group(name)
    except UnknownGroup:
        _unknown_group(name)
    click.echo(f"group {name}  state={info['state']}  epoch={info['group_epoch']}  assignor={info['assignor']}  "
               f"members={len(info['members'])}")
    if info["members"]:
        click.echo("")
        print_table(["member", "client", "instance", "epoch", "partitions"],
                    [[m["member_id"], m["client_id"], m["group_instance_id"], m["member_epoch"], len(m["assignment"])]
                     for m in info["members"]])
    click.echo("")
    print_table(["topic", "partition", "member", "committed", "end", "lag"],
                [[p["topic"], p["partition"], p["member"], p["committed"], p["end"], p["lag"]]
                 for p in info["partitions"]])
    unknown = sum(1 for p in info["partitions"] if p["lag"] is None)
    click.echo(f"\ntotal lag: {info['total_lag']}" + (f" ({unknown} partition(s) unknown)" if unknown else ""))
    for eviction in info["evictions"][-5:]:
        click.echo(f"removed: {eviction['member_id']} ({eviction['reason']})")


@group.command("reset-offsets")
@click.argument("name")
@click.option("--topic", "topic_name", required=True, help="reset this topic's partitions")
@click.option("--to-earliest", is_flag=True, help="to the earliest retained offset")
@click.option("--to-latest", is_flag=True, help="to the log end (skip everything there now)")
@click.option("--to-offset", type=click.IntRange(0), default=None, help="to this offset (clamped to the log)")
@click.option("--to-datetime", default=None, help="to the first record at or after this ISO 8601 time")
@bootstrap_option
@friendly_errors
def group_reset_offsets(name: str, topic_name: str, to_earliest: bool, to_latest: bool, to_offset: int | None,
                        to_datetime: str | None, bootstrap: str) -> None:
    """Set GROUP's committed offsets for a topic; only while the group has no live members."""
    import datetime

    from .admin import Admin
    from .errors import GroupNotEmpty

    chosen = [flag for flag, on in (("--to-earliest", to_earliest), ("--to-latest", to_latest),
                                    ("--to-offset", to_offset is not None), ("--to-datetime", to_datetime is not None))
              if on]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --to-earliest, --to-latest, --to-offset N, --to-datetime ISO")
    to: Literal["earliest", "latest"] | int | datetime.datetime
    if to_earliest:
        to = "earliest"
    elif to_latest:
        to = "latest"
    elif to_offset is not None:
        to = to_offset
    else:
        assert to_datetime is not None  # the one chosen
        try:
            to = datetime.datetime.fromisoformat(to_datetime)
        except ValueError:
            raise click.UsageError(f"--to-datetime {to_datetime!r} is not an ISO 8601 time "
                                   "(e.g. 2024-05-01T12:00:00+00:00)") from None
    try:
        with Admin(bootstrap) as admin:
            offsets = admin.reset_offsets(name, topic_name, to)
    except GroupNotEmpty as exc:
        click.echo(f"error: {exc.message}; stop its consumers first", err=True)
        sys.exit(1)
    print_table(["topic", "partition", "offset"], [[t, p, o] for (t, p), o in offsets.items()])
    click.echo(f"reset {len(offsets)} partition(s) of group {name}")


@group.command("delete")
@click.argument("name")
@bootstrap_option
@friendly_errors
def group_delete(name: str, bootstrap: str) -> None:
    """Delete GROUP and its committed offsets; only while it has no live members."""
    from .admin import Admin
    from .errors import UnknownGroup

    try:
        with Admin(bootstrap) as admin:
            admin.delete_group(name)
    except UnknownGroup:
        _unknown_group(name)
    click.echo(f"deleted group {name}")


# -- produce and consume -------------------------------------------------------------------------------

@main.command()
@click.argument("topic_name", metavar="TOPIC")
@click.option("--key-separator", default=None, help="split each line into KEY<sep>VALUE")
@click.option("--partition", type=click.IntRange(0), default=None,
              help="send every record to this partition (default: by key, or spread when no key)")
@bootstrap_option
@friendly_errors
def produce(topic_name: str, key_separator: str | None, partition: int | None, bootstrap: str) -> None:
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
@click.option("--from-beginning", is_flag=True,
              help="start at the earliest retained offset (with --group: where the group has no committed offset)")
@click.option("--partition", type=click.IntRange(0), multiple=True, help="only these partitions (no group)")
@click.option("--max-records", type=click.IntRange(1), default=None, help="stop after this many")
@click.option("--timeout-ms", type=click.IntRange(0), default=None, help="stop after this long without a record")
@click.option("--format", "fmt", default="text", show_default=True,
              help="text: the value; json: one lossless object per line (base64 where not UTF-8); or a kcat-style "
                   "format string of " + " ".join(f"%{t} ({what})" for t, what in FORMAT_TOKENS.items())
                   + r", with \n and \t, e.g. '%p %o %k %s\n'")
@click.option("--print-key", is_flag=True, help="text: print KEY<tab>VALUE (an absent key as empty)")
@bootstrap_option
@friendly_errors
def consume(topic_name: str, group: str | None, from_beginning: bool, partition: tuple[int, ...],
            max_records: int | None, timeout_ms: int | None, fmt: str, print_key: bool, bootstrap: str) -> None:
    """Print records of TOPIC as they arrive, until --max-records or --timeout-ms (or Ctrl-C)."""
    from .consumer import Consumer

    if fmt not in ("text", "json"):
        try:
            check_format(fmt)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--format") from None

    reset = "earliest" if from_beginning else "latest"
    if group is not None and partition:
        raise click.UsageError("--partition and --group exclude each other")
    from .admin import Admin

    with Admin(bootstrap) as admin:
        count = len(admin.list_topics().get(topic_name, {}).get("partitions", ())) or None
    if count is None:
        from .errors import UnknownTopic

        raise UnknownTopic(f"unknown topic {topic_name!r}; create it with `bus topic create {topic_name}`")
    if group is not None:
        # The group's committed offsets come first; --from-beginning only matters where it has none.
        consumer = Consumer(bootstrap, topics=[topic_name], group=group, auto_offset_reset=reset)
    else:
        consumer = Consumer(bootstrap, auto_offset_reset=reset)
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
                    out.write(record_json(record) + "\n")
                elif fmt == "text":
                    out.write(record_formatted(record, "%k\t%s\n" if print_key else "%s\n"))
                else:
                    out.write(record_formatted(record, fmt))
            seen += len(records)
            out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


# -- benchmarks ----------------------------------------------------------------------------------------

# The bench is its own package (bench/) with its own extra (pyproject.toml: psutil, redis with hiredis,
# nats-py), which a client install need not have. The command imports it only when it runs, so --help
# needs neither, and a missing one is a one-line hint rather than a traceback.
BENCH_PACKAGE = "bench"
BENCH_EXTRA_MODULES = frozenset({"psutil", "redis", "hiredis", "nats"})  # top-level names, as imported
BENCH_INSTALL = "pip install -e '.[bench]'"


def bench_not_installed(exc: ModuleNotFoundError) -> bool:
    """Whether ``exc`` says the bench or a module of its extra is missing. Any other missing module is a
    bug (in the bench or the install) and keeps its traceback."""
    name = exc.name or ""
    return name == BENCH_PACKAGE or name.partition(".")[0] in BENCH_EXTRA_MODULES


@main.command()
@click.option("--records", default=200_000, show_default=True, type=click.IntRange(1),
              help="records per produce run (all producers together), and per consume run (loaded, then read)")
@click.option("--record-bytes", default=100, show_default=True, type=click.IntRange(8),
              help="bytes of each record's value (no key); latency mode writes its send time in the first 8")
@click.option("--values", default="random", show_default=True, type=click.Choice(["random", "json"]),
              help="what the values hold, the same for every system: random (opaque, incompressible) bytes, or "
                   "JSON-like event records of --record-bytes each (>= 32; docs/benchmarks.md)")
@click.option("--partitions", default=1, show_default=True, type=click.IntRange(1, 10_000),
              help="partitions of the bench's topic (streams / subjects for the peers); records are spread over them")
@click.option("--nodes", default=None, type=click.IntRange(1, 64),
              help="nodes of the cluster the bench starts (default: the largest --replication-factor; "
                   "ignored with --bootstrap)")
@click.option("--replication-factor", default="1", show_default=True,
              help="replicas of each partition of the bench's topic; a list (1,3) measures one bus system "
                   "per value, side by side in the same run")
@click.option("--min-insync-replicas", default=None, type=click.IntRange(1),
              help="of the bench's topic (default: the bus's, 2 with 3 or more replicas, else 1)")
@click.option("--producers", default=1, show_default=True, type=click.IntRange(1), help="producer processes")
@click.option("--consumers", default=1, show_default=True, type=click.IntRange(1), help="consumer processes")
@click.option("--acks", default="1", show_default=True,
              help="0, 1 or all: the bench producer's (1, as the figures before replication were taken; the "
                   "Producer's own default is all); a list (1,all) measures one bus system per value")
@click.option("--compression", default="none", show_default=True,
              help="none, lz4 or zstd: the bus producer's compression (each batch's payload compressed whole); a "
                   "list (none,zstd) measures one bus system per value, with the bytes each left on disk")
@click.option("--linger-ms", default=5.0, show_default=True, type=click.FloatRange(0),
              help="how long a producer waits for a batch to fill (the bus takes whole ms)")
@click.option("--batch-bytes", default=1 << 20, show_default=True, type=click.IntRange(8),
              help="payload bytes a producer packs into one batch (every system; before compression)")
@click.option("--sync", default="always", show_default=True, type=click.Choice(["always", "none"]),
              help="always: every system acknowledges only after fsync")
@click.option("--runs", default=1, show_default=True, type=click.IntRange(1), help="runs per system; the median counts")
@click.option("--latency-rate", default=5000, show_default=True, type=click.IntRange(1),
              help="records/s offered in latency and failover modes")
@click.option("--latency-seconds", default=5.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="how long latency mode offers --latency-rate records/s")
@click.option("--kills", default=20, show_default=True, type=click.IntRange(1),
              help="failover mode: kill -9 of the partition's leader this many times per run, while a producer "
                   "offers --latency-rate records/s")
@click.option("--peers", default="raw,redis,nats", show_default=True,
              help="baselines beside the bus: raw,redis,nats, and Kafka's clients against the bus's Kafka listener: "
                   "confluent-kafka,kafka-python,aiokafka (or none); missing ones are skipped with a note")
@click.option("--modes", default="produce,consume,latency", show_default=True,
              help="produce,consume,latency,failover (failover: only the bus, with a replication factor >= 2)")
@click.option("--bootstrap", default=None, help="bench this running cluster instead of starting one")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="write all results here")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="draw latency and throughput (png)")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="scratch space (default: system temp)")
@click.option("--group/--assign", default=True, show_default=True,
              help="consumers as one consumer group, or by assign() over a split of the partitions")
@click.option("--send-many/--no-send-many", default=True, show_default=True,
              help="also measure Producer.send_many as its own row")
@click.option("--aio/--no-aio", default=False, show_default=True,
              help="also measure bus.aio's Producer and Consumer as rows of their own (produce, consume)")
@click.option("--drain-order/--no-drain-order", default=False, show_default=True,
              help="also measure the consumer serving its partitions in the draining order, not in turn (consume): "
                   "what fair polling costs")
def bench(**options: Any) -> None:  # each option by name, as bench_command takes them
    """Measure the bus beside the raw pyzmq+LMDB ceiling, Redis Streams and NATS JetStream."""
    try:
        from bench.runner import bench_command

        status = bench_command(say=click.echo, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except ModuleNotFoundError as exc:
        if not bench_not_installed(exc):
            raise
        click.echo(f"error: bus bench needs the bench extra (no module named {exc.name!r}): {BENCH_INSTALL}",
                   err=True)
        sys.exit(1)
    sys.exit(status)


if __name__ == "__main__":
    main()
