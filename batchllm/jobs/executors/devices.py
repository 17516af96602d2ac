"""Which devices each engine replica of a job gets (engine.data_parallel_size × tensor_parallel_size)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from batchllm.jobs.errors import JobSpecError
from batchllm.jobs.spec import JobSpec


def replica_devices(spec: JobSpec) -> list[str | None]:
    """One entry per engine replica: the CUDA_VISIBLE_DEVICES value it gets (None: CPU). A
    replica of tensor_parallel_size N gets N GPUs; `auto` makes as many replicas as fit."""
    n, device, where = spec.data_parallel_size, str(spec.engine.get("device", "auto")), \
        spec.source or "job"
    tp = int(spec.engine.get("tensor_parallel_size", 1) or 1)
    gpus = [] if device == "cpu" else _visible_gpus()
    count = max(1, len(gpus) // tp) if n == "auto" else int(n)
    if count > 1 and ":" in device:
        raise JobSpecError(f"{where}: engine.device={device!r} pins every replica to one GPU; with "
                           "engine.data_parallel_size use device: auto (or cuda)")
    if gpus and count * tp > len(gpus):
        layout = f"{count} replica(s) × tensor_parallel_size {tp}" if tp > 1 else f"{count}"
        raise JobSpecError(f"{where}: engine.data_parallel_size={n} needs {layout} = "
                           f"{count * tp} GPUs but only {len(gpus)} CUDA device(s) are visible "
                           f"({','.join(gpus)}); use fewer replicas or 'auto'")
    if not gpus:
        return [None] * count
    return [",".join(gpus[i * tp:(i + 1) * tp]) for i in range(count)]


def _visible_gpus() -> list[str]:
    import torch

    count = torch.cuda.device_count()
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [d.strip() for d in named.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


@contextmanager
def visible_devices(device: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES=device while a replica process starts (it inherits the environment)."""
    if device is None:
        yield
        return
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    try:
        yield
    finally:
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old
