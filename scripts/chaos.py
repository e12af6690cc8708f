#!/usr/bin/env python
"""A seeded fault run out of CI: a LocalCluster in a temp dir, producers, the nemesis, the final drain, and
the checker's table. Exit status 0 only when the run is clean (no anomaly of any kind).

    python scripts/chaos.py --records 1000000 --seed 7 --kills 20 --pauses 10
    python scripts/chaos.py --records 100000 --proxy --drop 0.01 --duplicate 0.02 --delay 0.05 --cuts 2
    python scripts/chaos.py --records 100000 --stalls 4 --stall-hold-s 3.5 5 --delivery-timeout-ms 3000
    python scripts/chaos.py --records 40000 --kills 2 --pauses 0 --sabotage ack_before_sync   # must fail

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

from tests.harness.runner import RunConfig, run  # noqa: E402


def main(argv=None) -> int:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=defaults.records, help="sends over the whole run")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--kills", type=int, default=defaults.kills, help="kill -9 + restart of a random node")
    parser.add_argument("--pauses", type=int, default=defaults.pauses, help="SIGSTOP + SIGCONT of a random node")
    parser.add_argument("--coordinator-kills", type=int, default=0, help="kill -9 + restart of the coordinator")
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
    parser.add_argument("--sabotage", default="", help="BUS_SABOTAGE for the cluster (nodes/sabotage.py)")
    parser.add_argument("--history", help="save the history here (JSON lines)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory (logs, LMDB)")
    args = parser.parse_args(argv)
    if (args.drop or args.duplicate or args.delay) and not args.proxy:
        parser.error("--drop, --duplicate and --delay need --proxy")

    config = RunConfig(records=args.records, seed=args.seed, kills=args.kills, pauses=args.pauses,
                       coordinator_kills=args.coordinator_kills, cuts=args.cuts, stalls=args.stalls,
                       stall_hold_s=tuple(args.stall_hold_s), proxy=args.proxy,
                       drop=args.drop, duplicate=args.duplicate, delay=args.delay, zombies=args.zombies,
                       nodes=args.nodes, partitions=args.partitions, producers=args.producers, rate=args.rate,
                       value_bytes=args.value_bytes, request_timeout_ms=args.request_timeout_ms,
                       delivery_timeout_ms=args.delivery_timeout_ms, sabotage=args.sabotage,
                       history_path=args.history)
    data_dir = tempfile.mkdtemp(prefix="bus-chaos-")
    started_s = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started_s:7.1f}s] {message}", flush=True)

    clean = False
    try:
        result = run(config, data_dir, log=log)
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
