"""The coordinator's consumer-group shell: carries group requests to the pure state machine in groups.py,
persists the records it returns before replying. (Filled in by the consumer-group work.)"""

from __future__ import annotations


class GroupService:
    def __init__(self, store, topics):
        self.store = store
        self.topics = topics

    def handlers(self) -> dict:
        return {}

    def next_deadline_ms(self):
        return None

    def tick(self, now_ms: int) -> None:
        pass

    def metadata_changed(self, now_ms: int) -> None:
        pass
