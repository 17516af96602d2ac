"""Job executors: how work units reach engine replicas (base.py holds the interface)."""
from __future__ import annotations

from batchllm.jobs.executors.base import Executor, RunContext, RunReport
from batchllm.jobs.executors.devices import replica_devices
from batchllm.jobs.executors.local import LocalExecutor
from batchllm.jobs.executors.multiprocess import MultiProcessExecutor
from batchllm.jobs.executors.queue import UnitQueue

__all__ = ["Executor", "RunContext", "RunReport", "LocalExecutor", "MultiProcessExecutor",
           "UnitQueue", "replica_devices"]
