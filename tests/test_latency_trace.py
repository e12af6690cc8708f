"""scripts/latency_trace.py, the hop-by-hop latency trace (docs/benchmarks.md, the latency path), on a short
run: it starts its cluster and clients, every record it offers reaches ``poll()``, and it prints a row for
every hop of the path with its percentiles in order."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOPS = ["due -> sent", "sent -> packed", "packed -> wired", "wired -> turn", "turn -> received",
        "received -> node_in", "node_in -> commit_from", "commit_from -> committed", "committed -> fetch_out",
        "fetch_out -> fetched", "fetched -> polled", "due -> polled (end to end)", "fetch_out -> produce_out",
        "produce_out -> acked", "due -> acked"]


def test_the_trace_follows_every_record_through_every_hop():
    rate, seconds, warmup_s = 500, 2, 0.5
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "latency_trace.py"), "--rate", str(rate),
                          "--seconds", str(seconds), "--warmup-s", str(warmup_s)],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    traced = int(re.search(r"^(\d+) records traced", run.stdout, re.M).group(1))
    # Every record offered after the warm-up reached poll() (the pacer's last one is due just before the end).
    assert traced == rate * seconds - int(rate * warmup_s), run.stdout
    rows = {}
    for line in run.stdout.splitlines():
        match = re.fullmatch(r"(.+?)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)", line)
        if match:
            rows[match.group(1)] = [float(match.group(i)) for i in (2, 3, 4)]
    assert list(rows) == HOPS, run.stdout
    for hop, (p50, p90, p99) in rows.items():
        assert p50 <= p90 <= p99, (hop, run.stdout)
    assert rows["due -> polled (end to end)"][0] > 0
