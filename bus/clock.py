"""The bus's clocks, in milliseconds, and how long any loop waits before it looks at its state again.

Two clocks, for two questions: ``now_ms()`` is the wall clock (record timestamps, retention by age: values
that other machines and a restarted process must read the same way); ``monotonic_ms()`` never goes back
and measures durations (sessions, deadlines, timeouts), so a wall-clock step cannot expire a session.
A leaf: imports nothing of the bus.
"""

from __future__ import annotations

import time

# Every loop (a server's, a client's background thread) waits at most this long in one poll, so that a stop
# request or a deadline computed before the wait is noticed promptly.
LOOP_WAIT_MS_MAX = 100


def now_ms() -> int:
    """Wall-clock time: milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def monotonic_ms() -> int:
    """Milliseconds on a clock that never goes back (for durations and deadlines only)."""
    return time.monotonic_ns() // 1_000_000
