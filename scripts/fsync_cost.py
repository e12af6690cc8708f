"""What an fdatasync costs on this machine's disk (docs/benchmarks.md, N): 4 KB overwrites synced by 1, 2 and 3
processes at once (does the device merge concurrent flushes?), and 8 KB writes synced after appending to a
file, into a sparse file, into posix_fallocate'd blocks and over pre-zeroed blocks (what a commit growing
LMDB's file pays).

    python scripts/fsync_cost.py [directory]     (default: the system's temporary directory)
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import tempfile
import time

DIRECTORY = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
SYNCS = 1000  # per process, concurrent runs
WRITES = 2000  # per kind, file growth runs


def _overwrites(path: str, go, out) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    go.wait()
    took = []
    for i in range(SYNCS):
        os.pwrite(fd, b"x" * 4096, (i % 256) * 4096)
        started = time.perf_counter()
        os.fdatasync(fd)
        took.append(time.perf_counter() - started)
    os.close(fd)
    os.unlink(path)
    out.put(statistics.median(took) * 1e3)


def concurrent(processes: int) -> None:
    spawn = multiprocessing.get_context("spawn")
    go, out = spawn.Event(), spawn.Queue()
    children = [spawn.Process(target=_overwrites, args=(os.path.join(DIRECTORY, f"fsync-cost-{i}"), go, out))
                for i in range(processes)]
    for child in children:
        child.start()
    started = time.perf_counter()
    go.set()
    for child in children:
        child.join()
    elapsed = time.perf_counter() - started
    medians = [round(out.get(), 3) for _ in children]
    print(f"{processes} process(es) syncing at once: median fdatasync ms {medians}, "
          f"{processes * SYNCS / elapsed:,.0f} syncs/s in all")


def growth(kind: str) -> None:
    path = os.path.join(DIRECTORY, f"fsync-cost-{kind}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    size = WRITES * 8192 + (1 << 20)
    if kind == "sparse":
        os.ftruncate(fd, size)
    elif kind == "fallocate":
        os.posix_fallocate(fd, 0, size)
    elif kind == "zeroed":
        os.write(fd, bytes(size))
        os.fsync(fd)
    took = []
    for i in range(WRITES):
        os.pwrite(fd, b"x" * 8192, i * 8192)
        started = time.perf_counter()
        os.fdatasync(fd)
        took.append(time.perf_counter() - started)
    os.close(fd)
    os.unlink(path)
    took.sort()
    print(f"8 KB writes, {kind:>9}: fdatasync p50 {statistics.median(took) * 1e3:.3f} / "
          f"p99 {took[int(len(took) * 0.99)] * 1e3:.3f} ms")


if __name__ == "__main__":
    for n in (1, 2, 3):
        concurrent(n)
    for kind in ("append", "sparse", "fallocate", "zeroed"):
        growth(kind)
