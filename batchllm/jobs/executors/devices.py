"""Which device each engine replica of a data-parallel job gets (engine.data_parallel_size)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from batchllm.jobs.errors import JobSpecError
from batchllm.jobs.spec import JobSpec


def replica_devices(spec: JobSpec) -> list[str | None]:
    """One entry per engine replica: the CUDA_VISIBLE_DEVICES value it gets (None: CPU)."""
    n, device, where = spec.data_parallel_size, str(spec.engine.get("device", "auto")), \
        spec.source or "job"
    gpus = [] if device == "cpu" else _visible_gpus()
    count = max(1, len(gpus)) if n == "auto" else int(n)
    if count > 1 and ":" in device:
        raise JobSpecError(f"{where}: engine.device={device!r} pins every replica to one GPU; with "
                           "engine.data_parallel_size use device: auto (or cuda)")
    if gpus and count > len(gpus):
        raise JobSpecError(f"{where}: engine.data_parallel_size={n} but only {len(gpus)} CUDA "
                           f"device(s) are visible ({','.join(gpus)}); use at most {len(gpus)} or "
                           "'auto'")
    return [gpus[i] if gpus else None for i in range(count)]


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
