"""Lightning callbacks used by `dvlx.fit`."""

from callbacks.checkpoint_io import AtomicCheckpointIO
from callbacks.data_faults import DataFaultMonitor
from callbacks.export import ExportOnTrainEnd
from callbacks.throughput import throughput_monitor

__all__ = ["AtomicCheckpointIO", "DataFaultMonitor", "ExportOnTrainEnd", "throughput_monitor"]
