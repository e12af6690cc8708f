"""DescribeConfigs' answers (Kafka's config names and values for the bus's topics and nodes). Pure: a
requested resource and the placement in, the response's result for it out.

A topic's configs are what the placement holds for it (the controller's ``retention_ms``,
``retention_bytes``, ``min_insync_replicas``) and what the bus does for every topic (deletion by
retention, CreateTime timestamps, the node's largest batch). A setting the topic was not created with is
the bus's default, which is not always Kafka's: a bus topic keeps everything unless it was created with a
retention, so ``retention.ms`` and ``retention.bytes`` default to -1 (Kafka: 7 days and -1). Partitions and
the replication factor are not configs in Kafka (Metadata tells them). A broker's configs are the few
clients look at, the same on every node. Nothing here can be changed through Kafka (no AlterConfigs):
every config is reported read-only.
"""

from __future__ import annotations

from bus.batch import BATCH_BYTES_MAX
from nodes.controller import default_min_insync_replicas

from . import codec

TOPIC, BROKER = 2, 4  # DescribeConfigs' resource types (org.apache.kafka.common.config.ConfigResource.Type)
# Where a config's value comes from (DescribeConfigsResponse's ConfigSource)
DYNAMIC_TOPIC_CONFIG, STATIC_BROKER_CONFIG, DEFAULT_CONFIG = 1, 4, 5
# A config's data type (ConfigType, v3+)
BOOLEAN, STRING, INT, LONG, LIST = 1, 2, 3, 5, 7

# Kafka's name -> (the placement's field or None, the value when it is None or not a field, type)
TOPIC_CONFIGS = {
    "retention.ms": ("retention_ms", "-1", LONG),
    "retention.bytes": ("retention_bytes", "-1", LONG),
    "min.insync.replicas": ("min_insync_replicas", None, INT),  # None: the controller's default for the topic
    "cleanup.policy": (None, "delete", LIST),  # retention deletes whole batches; no compaction
    "compression.type": (None, "producer", STRING),  # every batch is stored as its producer sent it
    "max.message.bytes": (None, str(BATCH_BYTES_MAX), INT),
    "message.timestamp.type": (None, "CreateTime", STRING),  # a record without one gets the append time
}
BROKER_CONFIGS = {
    "message.max.bytes": (str(BATCH_BYTES_MAX), INT),
    "auto.create.topics.enable": ("false", BOOLEAN),  # a Metadata request never creates a topic
    "num.partitions": ("1", INT),  # CreateTopics' default
    "log.retention.ms": ("-1", LONG),
    "log.retention.bytes": ("-1", LONG),
    "log.cleanup.policy": ("delete", LIST),
    "compression.type": ("producer", STRING),
    "log.message.timestamp.type": ("CreateTime", STRING),
}


def _entry(name: str, value: str, source: int, config_type: int, synonyms: bool) -> dict:
    return {"name": name, "value": value, "read_only": True, "config_source": source,
            "is_default": source == DEFAULT_CONFIG, "is_sensitive": False, "config_type": config_type,
            "documentation": None,
            "synonyms": [{"name": name, "value": value, "source": source}] if synonyms else []}


def topic_configs(topic: dict) -> list[tuple[str, str, int, int]]:
    """(name, value, source, type) of every config of ``topic`` (its placement entry)."""
    out = []
    for name, (field, default, config_type) in TOPIC_CONFIGS.items():
        value = topic.get(field) if field is not None else None
        if field == "min_insync_replicas":
            source = (DEFAULT_CONFIG if value == default_min_insync_replicas(topic["replication_factor"])
                      else DYNAMIC_TOPIC_CONFIG)
        else:
            source = DEFAULT_CONFIG if value is None else DYNAMIC_TOPIC_CONFIG
        out.append((name, default if value is None else str(value), source, config_type))
    return out


def describe(resource_type: int, resource_name: str, keys, topics: dict, broker_id: int | None,
             synonyms: bool) -> dict:
    """The result for one resource of a DescribeConfigs request: ``keys`` (None: all) of topic
    ``resource_name`` in ``topics`` (the placement), or of broker ``resource_name`` (this server is broker
    ``broker_id``, the coordinator COORDINATOR_BROKER_ID; "" names the brokers' defaults, as Kafka takes it).
    A key no config has is left out, as Kafka does."""
    row = {"resource_type": resource_type, "resource_name": resource_name, "error_code": codec.NONE,
           "error_message": None, "configs": []}
    if resource_type == TOPIC:
        topic = topics.get(resource_name)
        if topic is None:
            return {**row, "error_code": codec.UNKNOWN_TOPIC_OR_PARTITION,
                    "error_message": f"topic {resource_name!r} does not exist"}
        configs = topic_configs(topic)
    elif resource_type == BROKER:
        if resource_name != "" and (broker_id is None or resource_name != str(broker_id)):
            return {**row, "error_code": codec.INVALID_REQUEST,
                    "error_message": f"broker {resource_name!r} is not this one ({broker_id}); ask it, or ask for \"\""}
        configs = [(name, value, STATIC_BROKER_CONFIG, config_type)
                   for name, (value, config_type) in BROKER_CONFIGS.items()]
    else:
        return {**row, "error_code": codec.INVALID_REQUEST,
                "error_message": f"resource type {resource_type} is not described here (2 topic, 4 broker)"}
    wanted = None if keys is None else set(keys)
    row["configs"] = [_entry(name, value, source, config_type, synonyms)
                      for name, value, source, config_type in configs if wanted is None or name in wanted]
    return row
