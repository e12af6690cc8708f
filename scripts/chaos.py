#!/usr/bin/env python
"""A seeded fault run out of CI: a LocalCluster in a temp dir, producers, the nemesis, the final drain, and
the checker's table. Exit status 0 only when the run is clean (no anomaly of any kind).

    python scripts/chaos.py --records 1000000 --seed 7 --kills 20 --pauses 10
    python scripts/chaos.py --records 1000000 --replication-factor 3 --kills 0 --kill-leaders 20 --wipes 5 \
        --isolations 10 --pauses 20 --coordinator-kills 3
    python scripts/chaos.py --records 100000 --proxy --drop 0.01 --duplicate 0.02 --delay 0.05 --cuts 2
    python scripts/chaos.py --records 100000 --stalls 4 --stall-hold-s 3.5 5 --delivery-timeout-ms 3000
    python scripts/chaos.py --records 40000 --kills 2 --pauses 0 --sabotage ack_before_sync   # must fail
    python scripts/chaos.py --records 20000 --rate 4000 --kills 0 --pauses 0 --isolations 1 \
        --sabotage ack_all_on_leader_fsync                                                # must fail

    python scripts/chaos.py --groups --seed 3 --consumer-kills 4 --consumer-pauses 4 --coordinator-kills 2
    python scripts/chaos.py --groups --records 100000 --produce-rate 4000 --kills 2   # consume while producing
    python scripts/chaos.py --groups --sabotage skip_member_epoch_check               # must fail

``--groups`` is the consumer-group run (tests/harness/group_workload.py): consumer processes in one group
on a filled topic while consumers are killed -9 (and replaced by new processes) and SIGSTOPped past their
session, and the coordinator is killed; then the group's committed offsets are read back and checked.
The same seed gives the same values, partitions and fault schedule (not the same thread timings).
``--history PATH`` keeps the history (JSON lines) for re-checking: ``tests.harness.check(History.load(PATH))``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.harness.group_workload import GroupRunConfig, run_groups  # noqa: E402
from tests.harness.runner import RunConfig, run  # noqa: E402


def main(argv=None) -> int:
    defaults = RunConfig()
    group_defaults = GroupRunConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, help=f"sends over the whole run (default {defaults.records}; "
                                                    f"--groups: {group_defaults.records})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--kills", type=int, help=f"kill -9 + restart of a random node (default {defaults.kills}; "
                                                  f"--groups: {group_defaults.kills})")
    parser.add_argument("--pauses", type=int, help=f"SIGSTOP + SIGCONT of a random node (default {defaults.pauses}; "
                                                   f"--groups: {group_defaults.pauses})")
    parser.add_argument("--coordinator-kills", type=int, help="kill -9 + restart of the coordinator (default 0; "
                                                              f"--groups: {group_defaults.coordinator_kills})")
    parser.add_argument("--kill-leaders", type=int, default=0,
                        help="kill -9 + restart of a random partition's current leader")
    parser.add_argument("--wipes", type=int, default=0,
                        help="kill -9 a node, delete its data directory, restart it empty (once every ISR is full)")
    parser.add_argument("--isolations", type=int, default=0,
                        help="cut a random partition's leader off from the coordinator and the other nodes for a "
                             "while (its clients still reach it)")
    parser.add_argument("--isolate-hold-s", type=float, nargs=2, default=defaults.isolate_hold_s,
                        metavar=("MIN", "MAX"), help="how long an isolation lasts (past the session timeout)")
    parser.add_argument("--cascades", type=int, default=0,
                        help="KIP-101's double failover: a leader killed, its successor cut off as it takes over")
    parser.add_argument("--replication-factor", type=int, help="of the topic (default: the cluster's, min(3, nodes))")
    parser.add_argument("--min-insync-replicas", type=int, help="of the topic (default: 2 with 3 replicas or more)")
    parser.add_argument("--readers", type=int, default=defaults.readers,
                        help="consumers reading every partition during the run (phantom_reads)")
    parser.add_argument("--cuts", type=int, default=0, help="a node's proxy drops everything for a while")
    parser.add_argument("--stalls", type=int, default=0,
                        help="a node's proxy holds everything for a while, then delivers it late")
    parser.add_argument("--stall-hold-s", type=float, nargs=2, default=defaults.stall_hold_s, metavar=("MIN", "MAX"),
                        help="how long a stall lasts (past --delivery-timeout-ms, old requests land after the "
                             "producer gave up on them)")
    parser.add_argument("--proxy", action="store_true", help="a fault proxy in front of every node")
    parser.add_argument("--drop", type=float, default=0.0, help="proxy: probability a message is dropped")
    parser.add_argument("--duplicate", type=float, default=0.0, help="proxy: ... delivered twice")
    parser.add_argument("--delay", type=float, default=0.0, help="proxy: ... delayed 1-50 ms")
    parser.add_argument("--zombies", type=int, default=0, help="rounds of the zombie-producer fencing scenario")
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--partitions", type=int, default=defaults.partitions)
    parser.add_argument("--producers", type=int, default=defaults.producers)
    parser.add_argument("--rate", type=int, default=defaults.rate, help="sends per second in all (0: unlimited)")
    parser.add_argument("--value-bytes", type=int, default=defaults.value_bytes)
    parser.add_argument("--request-timeout-ms", type=int, default=defaults.request_timeout_ms)
    parser.add_argument("--delivery-timeout-ms", type=int, default=defaults.delivery_timeout_ms)
    parser.add_argument("--sabotage", default="", help="sabotage switches for the cluster, comma-separated (tests/harness/sabotage.py)")
    parser.add_argument("--history", help="save the history here (JSON lines)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory (logs, LMDB)")
    groups = parser.add_argument_group("consumer-group run (--groups)")
    groups.add_argument("--groups", action="store_true", help="the consumer-group run instead of the producers'")
    groups.add_argument("--consumers", type=int, default=group_defaults.consumers, help="consumer processes")
    groups.add_argument("--consumer-kills", type=int, default=group_defaults.consumer_kills,
                        help="kill -9 a consumer, then start a new one (a new member)")
    groups.add_argument("--consumer-pauses", type=int, default=group_defaults.consumer_pauses,
                        help="SIGSTOP a consumer past its session timeout, then SIGCONT")
    groups.add_argument("--consumer-pause-hold-s", type=float, nargs=2, metavar=("MIN", "MAX"),
                        default=group_defaults.consumer_pause_hold_s, help="how long a consumer stays stopped")
    groups.add_argument("--session-timeout-ms", type=int, default=group_defaults.session_timeout_ms)
    groups.add_argument("--heartbeat-interval-ms", type=int, default=group_defaults.heartbeat_interval_ms)
    groups.add_argument("--consumer-rate", type=float, default=group_defaults.rate,
                        help="records per second each consumer handles at most")
    groups.add_argument("--produce-rate", type=int, default=group_defaults.produce_rate,
                        help="0: fill the topic first; else produce at this rate while the group consumes")
    args = parser.parse_args(argv)
    if (args.drop or args.duplicate or args.delay) and not args.proxy:
        parser.error("--drop, --duplicate and --delay need --proxy")
    if args.groups:
        if args.proxy or args.cuts or args.stalls or args.zombies or args.isolations or args.cascades:
            parser.error("--groups runs without proxies or zombie producers")
        if args.kill_leaders or args.wipes or args.replication_factor or args.min_insync_replicas:
            parser.error("--groups runs with the cluster's default topic and node faults (--kills, --pauses)")
        return _run(lambda data_dir, log: run_groups(GroupRunConfig(
            records=_given(args.records, group_defaults.records), seed=args.seed,
            kills=_given(args.kills, group_defaults.kills), pauses=_given(args.pauses, group_defaults.pauses),
            coordinator_kills=_given(args.coordinator_kills, group_defaults.coordinator_kills),
            consumers=args.consumers, consumer_kills=args.consumer_kills, consumer_pauses=args.consumer_pauses,
            consumer_pause_hold_s=tuple(args.consumer_pause_hold_s), session_timeout_ms=args.session_timeout_ms,
            heartbeat_interval_ms=args.heartbeat_interval_ms, rate=args.consumer_rate,
            produce_rate=args.produce_rate, nodes=args.nodes, partitions=args.partitions,
            value_bytes=args.value_bytes, sabotage=args.sabotage, history_path=args.history), data_dir, log=log),
            args, argv)

    config = RunConfig(records=_given(args.records, defaults.records), seed=args.seed,
                       kills=_given(args.kills, defaults.kills), pauses=_given(args.pauses, defaults.pauses),
                       coordinator_kills=_given(args.coordinator_kills, 0), cuts=args.cuts, stalls=args.stalls,
                       stall_hold_s=tuple(args.stall_hold_s), proxy=args.proxy, kill_leaders=args.kill_leaders,
                       wipes=args.wipes, isolations=args.isolations, isolate_hold_s=tuple(args.isolate_hold_s),
                       cascades=args.cascades, replication_factor=args.replication_factor,
                       min_insync_replicas=args.min_insync_replicas, readers=args.readers,
                       drop=args.drop, duplicate=args.duplicate, delay=args.delay, zombies=args.zombies,
                       nodes=args.nodes, partitions=args.partitions, producers=args.producers, rate=args.rate,
                       value_bytes=args.value_bytes, request_timeout_ms=args.request_timeout_ms,
                       delivery_timeout_ms=args.delivery_timeout_ms, sabotage=args.sabotage,
                       history_path=args.history)
    return _run(lambda data_dir, log: run(config, data_dir, log=log), args, argv)


def _given(value, default):
    return default if value is None else value


def _run(start, args, argv) -> int:
    """Run ``start(data_dir, log)`` in a temp dir; print the summary; 0 only when the run is clean."""
    data_dir = tempfile.mkdtemp(prefix="bus-chaos-")
    started_s = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started_s:7.1f}s] {message}", flush=True)

    clean = False
    try:
        result = start(data_dir, log)
        print(result.summary())
        clean = result.report.ok
    finally:
        if args.keep or not clean:
            print(f"cluster directory kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"{'CLEAN' if clean else 'NOT CLEAN'} in {time.monotonic() - started_s:.1f} s "
          f"(python scripts/chaos.py {' '.join(argv if argv is not None else sys.argv[1:])})")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
