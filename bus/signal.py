"""A condition variable that also calls a hook on every notify_all(): how a client's background thread wakes
an asyncio loop (bus/aio.py) with the same signal that wakes the sync client's waiting threads.

The hook (``on_notify``) runs in the notifying thread with the condition's lock held, so it must only
schedule (``loop.call_soon_threadsafe``), never block or take another lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Signal(threading.Condition):
    on_notify: Callable[[], object] | None = None

    def notify_all(self) -> None:
        super().notify_all()
        if self.on_notify is not None:
            self.on_notify()
