"""The pure part of the fault harness: recording a history and checking it for anomalies."""

from .checker import ANOMALIES, Report, check
from .history import Event, History

__all__ = ["ANOMALIES", "Event", "History", "Report", "check"]
