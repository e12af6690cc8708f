"""The fault harness's workload as a process of its own, for runs whose clients live elsewhere (e.g. in a
network namespace, tests/test_netns.py): ``python -m tests.harness.client run ...`` produces at a steady
rate, drains, checks, and leaves the history (JSON lines) and a JSON summary in files; ``metadata`` prints
the coordinator's view of the nodes, ``describe`` its view of a topic's partitions (leader, ISR), and
``hw`` one node's own answer for its high watermarks (whatever the coordinator says: a leader cut off from
it still answers). The parent reads the files; the two share CLOCK_MONOTONIC, so the history's
``time_ms`` compares with the parent's ``time.monotonic()``.

This module only wires workload.py to a command line; it owns no logic of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bus import Admin
from bus.connection import Requester

from .checker import check
from .history import History
from .workload import ProducerWorker, drain, wait_serving_topic


def _run(args) -> int:
    if args.create_topic:
        with Admin(args.bootstrap) as admin:
            admin.create_topic(args.topic, args.partitions, replication_factor=args.replication_factor)
    wait_serving_topic(args.bootstrap, args.topic, args.partitions, timeout_s=60)
    with Admin(args.bootstrap) as admin:
        owners = {i: p["leader"] for i, p in enumerate(admin.list_topics()[args.topic]["partitions"])}
    history = History()
    options = {"request_timeout_ms": args.request_timeout_ms, "delivery_timeout_ms": args.delivery_timeout_ms,
               "linger_ms": 5, "retry_backoff_ms": 20}
    share = args.records // args.producers
    workers = [ProducerWorker(f"producer-{i}", args.bootstrap, args.topic, args.partitions, share, history,
                              seed=args.seed, producer_options=options, rate=args.rate / args.producers,
                              flush_timeout_s=args.delivery_timeout_ms / 1000 + 10)
               for i in range(args.producers)]
    print(json.dumps({"started_ms": time.monotonic_ns() // 1_000_000, "owners": owners}), flush=True)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    errors = [repr(w.error) for w in workers if w.error is not None]
    records, log_start = drain(args.bootstrap, args.topic, args.partitions, timeout_s=120)
    history.record_drain(records)
    report = check(history, log_start=log_start)
    history.save(args.history)
    outcomes = {"ok": 0, "fail": 0, "unknown": 0}
    for worker in workers:
        for key, value in worker.outcomes.items():
            outcomes[key] += value
    summary = {"counts": dict(report.counts), "ok": report.ok, "table": report.table(), "outcomes": outcomes,
               "drained": len(records), "owners": owners, "errors": errors}
    with open(args.result, "w") as f:
        json.dump(summary, f)
    print(json.dumps({"finished": True, "ok": report.ok}), flush=True)
    return 0


def _metadata(args) -> int:
    import zmq

    context = zmq.Context()
    requester = Requester(context, args.bootstrap, args.timeout_ms)
    try:
        nodes = requester.metadata().nodes
        print(json.dumps({str(k): v for k, v in nodes.items()}))
        return 0
    except Exception as exc:  # reported, not raised: the parent polls
        print(json.dumps({"error": repr(exc)}))
        return 1
    finally:
        requester.close()
        context.term()


def _describe(args) -> int:
    import zmq

    context = zmq.Context()
    requester = Requester(context, args.bootstrap, args.timeout_ms)
    try:
        metadata = requester.metadata([args.topic])
        partitions = [{"leader": p["leader"], "leader_epoch": p["leader_epoch"], "isr": p["isr"],
                       "replicas": p["replicas"]} for p in metadata.topics[args.topic]["partitions"]]
        print(json.dumps({"partitions": partitions,
                          "alive": {str(k): v.get("alive") for k, v in metadata.nodes.items()}}))
        return 0
    except Exception as exc:  # reported, not raised: the parent polls
        print(json.dumps({"error": repr(exc)}))
        return 1
    finally:
        requester.close()
        context.term()


def _hw(args) -> int:
    import zmq

    from bus import wire

    context = zmq.Context()
    requester = Requester(context, args.address, args.timeout_ms)
    try:
        partitions = [int(p) for p in args.partitions.split(",")]
        result = requester.request(args.address, wire.LIST_OFFSETS,
                                   {"parts": [[args.topic, p, "latest"] for p in partitions]})
        print(json.dumps({str(p): (offset if code is None else code)
                          for p, (code, _, offset, _, _) in zip(partitions, result["parts"])}))
        return 0
    except Exception as exc:
        print(json.dumps({"error": repr(exc)}))
        return 1
    finally:
        requester.close()
        context.term()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.client")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="produce, drain, check")
    run.add_argument("--bootstrap", required=True)
    run.add_argument("--topic", default="netns")
    run.add_argument("--partitions", type=int, default=6)
    run.add_argument("--create-topic", action="store_true")
    run.add_argument("--replication-factor", type=int, default=None, help="of the topic created (default: the cluster's)")
    run.add_argument("--records", type=int, required=True)
    run.add_argument("--rate", type=float, required=True, help="sends per second in all")
    run.add_argument("--producers", type=int, default=2)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--request-timeout-ms", type=int, default=500)
    run.add_argument("--delivery-timeout-ms", type=int, default=2_000)
    run.add_argument("--history", required=True)
    run.add_argument("--result", required=True)
    metadata = commands.add_parser("metadata", help="print the coordinator's view of the nodes")
    metadata.add_argument("--bootstrap", required=True)
    metadata.add_argument("--timeout-ms", type=int, default=2_000)
    describe = commands.add_parser("describe", help="print the coordinator's view of a topic's partitions")
    describe.add_argument("--bootstrap", required=True)
    describe.add_argument("--topic", default="netns")
    describe.add_argument("--timeout-ms", type=int, default=2_000)
    hw = commands.add_parser("hw", help="print one node's high watermarks, as it answers them itself")
    hw.add_argument("--address", required=True, help="the node's address")
    hw.add_argument("--topic", default="netns")
    hw.add_argument("--partitions", required=True, help="comma-separated")
    hw.add_argument("--timeout-ms", type=int, default=2_000)
    args = parser.parse_args(argv)
    return {"run": _run, "metadata": _metadata, "describe": _describe, "hw": _hw}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
