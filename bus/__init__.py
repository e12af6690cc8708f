"""The bus: a durable, partitioned event log on ZeroMQ and LMDB. This package is what a service imports."""

from . import errors
from .admin import Admin
from .consumer import Consumer
from .errors import BusError
from .producer import FutureList, Producer, RecordFuture
from .records import Record, RecordMetadata, TopicPartition

__all__ = ["Admin", "BusError", "Consumer", "FutureList", "Producer", "Record", "RecordFuture",
           "RecordMetadata", "TopicPartition", "errors"]
