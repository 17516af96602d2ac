"""A tensor-parallel group of processes: the engine's process is rank 0, ranks 1..N-1 are spawned.

    rank 0 (the engine)                              rank r (spawned worker, tp_worker.py)
    scheduler, tokenizer, sampler, outputs           model shard, KV cache shard, runner
    runner.launch(plan) ── plan (gloo broadcast) ──► runner.launch(plan)
    forward of its shard ◄──── all-reduce ─────────► forward of its shard
    samples, broadcasts the tokens ─────────────────► takes them (decode rounds, the next plan)

Plans travel pickled over a gloo group on the host; activations over the world group (NCCL on
GPUs, one GPU per rank; gloo on CPU). Every collective has a timeout
(`BATCHLLM_DIST_TIMEOUT_S`, default 300 s), so a dead rank fails the engine instead of hanging it.
One tensor-parallel engine per process at a time: its `shutdown()` ends the group.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from batchllm.distributed.parallel_state import get_tp_size, init_tensor_parallel

STOP = "stop"


def timeout_s() -> float:
    return float(os.environ.get("BATCHLLM_DIST_TIMEOUT_S", "300"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: torch.device, rank: int, size: int) -> tuple[torch.device, str]:
    """This rank's device and the backend for activations: one GPU per rank with NCCL when
    enough are visible; all ranks on cuda:0 with gloo when BATCHLLM_TP_SHARE_GPU=1 (a functional
    check on a one-GPU machine, not for speed); gloo on CPU."""
    if device.type != "cuda":
        return torch.device("cpu"), "gloo"
    if torch.cuda.device_count() >= size:
        return torch.device("cuda", rank), "nccl"
    if os.environ.get("BATCHLLM_TP_SHARE_GPU") == "1":
        return torch.device("cuda", 0), "gloo"
    raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs, but "
                     f"{torch.cuda.device_count()} are visible; lower tensor_parallel_size or make "
                     "more GPUs visible (CUDA_VISIBLE_DEVICES)")


def init_rank(rank: int, size: int, port: int, backend: str) -> dist.ProcessGroup:
    """Join the group as `rank`; returns the host (gloo) group that plans travel on."""
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=timeout_s()))
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    init_tensor_parallel(rank, size, dist.group.WORLD)
    return cpu_group


@dataclass
class TensorParallelGroup:
    """Rank 0's handle on its group: send plans, agree on sizes, shut the workers down."""

    size: int
    cpu_group: Any
    processes: list = field(default_factory=list)
    live: bool = True

    def send(self, obj: object) -> None:
        dist.broadcast_object_list([obj], src=0, group=self.cpu_group)

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def check_workers(self) -> None:
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self.processes) if not p.is_alive()]
        if dead:
            rank, code = dead[0]
            raise RuntimeError(f"tensor-parallel rank {rank} is gone (exit code {code})")

    def shutdown(self) -> None:
        if not self.live:
            return
        self.live = False
        try:
            if all(p.is_alive() for p in self.processes):
                self.send(STOP)
        except (RuntimeError, ValueError):
            pass  # a rank is gone: the others stop on the broken connection
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        if dist.is_initialized():
            dist.destroy_process_group()
        init_tensor_parallel(0, 1)


def start_group(config, device: torch.device) -> tuple[TensorParallelGroup, torch.device]:
    """Spawn ranks 1..N-1 (each builds its shard with `config`) and join as rank 0."""
    from batchllm.distributed.tp_worker import worker_main

    size = config.tensor_parallel_size
    if get_tp_size() > 1 or dist.is_initialized():
        raise RuntimeError("a tensor-parallel engine (or another torch.distributed group) is live "
                           "in this process; call its shutdown() before starting another")
    my_device, backend = rank_device(device, 0, size)
    port = _free_port()
    threads = max(1, torch.get_num_threads() // size) if my_device.type == "cpu" else None
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, size):
        p = ctx.Process(target=worker_main, args=(config, rank, size, port, threads),
                        name=f"batchllm-tp-rank-{rank}", daemon=True)
        p.start()
        procs.append(p)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cpu_group = init_rank(0, size, port, backend)
    except Exception:
        for p in procs:
            p.kill()
        raise
    if my_device.type == "cuda":
        torch.cuda.set_device(my_device)
    return TensorParallelGroup(size, cpu_group, procs), my_device
