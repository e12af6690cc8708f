"""Kafka's wire protocol on the bus's servers (issue 13; docs/kafka.md): the framing (``framing.py``), the
messages through kafka-python's kafka.protocol (``codec.py``), Kafka's record batches to and from the bus's
(``records.py``), the APIs over a server's own handlers (``service.py``), the group APIs
(``group_apis.py`` over ``classic_group.py`` and the bus's offsets) and the TCP listener in the server's
loop (``listener.py``).
"""

from __future__ import annotations

from .classic_group import ClassicGroups
from .group_apis import GroupApis
from .listener import KafkaListener
from .service import KafkaService


def listen(address: str, *, cluster_id, brokers, topics, handlers, coordinator, apis: dict,
           frame_bytes_max: int, node_id: int | None = None) -> KafkaListener:
    """A Kafka listener bound to ``address`` (HOST:PORT) serving ``KafkaService(cluster_id, brokers, topics,
    handlers, coordinator, apis, node_id)`` (``apis``: the group APIs, ``GroupApis.apis()``; ``node_id``: the
    broker this is); the server registers it in its poller each loop turn and serves what is ready."""
    service = KafkaService(cluster_id, brokers, topics, handlers, coordinator, apis, node_id)
    return KafkaListener(address, service.handle, frame_bytes_max=frame_bytes_max)


__all__ = ["ClassicGroups", "GroupApis", "KafkaListener", "KafkaService", "listen"]
