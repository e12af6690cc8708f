"""How long a thread that wants the GIL waits for it, while a Producer is open.

Each client has a background thread (the producer's sender, the consumer's fetcher) that does the socket
I/O while the user's thread runs ``send()`` or decodes records. Every pyzmq call releases the GIL, and a
thread waiting to take it back gets it only when the running thread is asked to let go: after CPython's
switch interval, 5 ms by default. So while ``send()`` runs in a tight loop each step of the sender's cycle
(poll, each frame sent, each reply received) can wait 5 ms, and its requests crawl: measured, 100-byte
records through one partition, ``send_many`` 1.46 M records/s with 5 ms and 2.19 M with 0.5 ms, the whole
gain being the sender keeping the node busy. 1 ms does as well for ``send_many`` and the 200 MB/s latency
run, and ``send()`` gains 5 % over 0.5 ms (fewer hand-overs); 0.2 ms and less lose to switching
(docs/benchmarks.md). The consumer's threads do not contend that way, and it gains nothing.

So the first producer to open lowers the interval to ``SWITCH_INTERVAL_S`` (never raises it), and the last
to close puts back what it found, unless something else changed it meanwhile. Threads that never contend
for the GIL are not affected; the cost is a hand-over at most every 1 ms where there was one every 5 ms.
"""

from __future__ import annotations

import sys
import threading

SWITCH_INTERVAL_S = 0.001

_lock = threading.Lock()
_holders = 0
_found_s: float | None = None  # the interval before the first holder lowered it


def acquire() -> None:
    global _holders, _found_s
    with _lock:
        if _holders == 0:
            found = sys.getswitchinterval()
            if found > SWITCH_INTERVAL_S:
                _found_s = found
                sys.setswitchinterval(SWITCH_INTERVAL_S)
            else:
                _found_s = None
        _holders += 1


def release() -> None:
    global _holders, _found_s
    with _lock:
        assert _holders > 0, "gil.release() without acquire()"
        _holders -= 1
        if _holders == 0 and _found_s is not None:
            if abs(sys.getswitchinterval() - SWITCH_INTERVAL_S) < 1e-9:  # nobody else set it meanwhile
                sys.setswitchinterval(_found_s)
            _found_s = None
