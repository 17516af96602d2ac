"""A tensor-parallel rank > 0: builds its model and KV cache shard, then runs every plan rank 0
sends until told to stop (or until the group breaks, e.g. rank 0 died)."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def worker_main(config, rank: int, size: int, port: int, threads: int | None) -> None:
    from batchllm.distributed.group import STOP, init_rank, rank_device
    from batchllm.engine.build import build_rank, resolve_backend, resolve_device, with_device_defaults

    if threads is not None:
        torch.set_num_threads(threads)
    device, backend = rank_device(resolve_device(config.device), rank, size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cpu_group = init_rank(rank, size, port, backend)

    def agree(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group)
        return int(t.item())

    try:
        config = with_device_defaults(config, device)
        runner = build_rank(config, device, resolve_backend(config.attention_backend, device),
                            None, agree).runner
        prev = None
        with torch.inference_mode():
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=0, group=cpu_group)
                plan = box[0]
                if plan == STOP:
                    break
                prev = runner.launch(plan, prev)
    except Exception as exc:  # rank 0 is gone or failed: nothing to answer to
        print(f"batchllm tensor-parallel rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
