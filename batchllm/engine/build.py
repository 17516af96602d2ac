"""Engine construction: config → device, tokenizer, model, KV cache, runner, scheduler."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from batchllm.config import ConfigError, EngineConfig
from batchllm.core.scheduler import Scheduler
from batchllm.runner.cascade import CascadePolicy
from batchllm.runner.kv_cache import KVCache
from batchllm.runner.memory import bytes_per_block, num_device_blocks
from batchllm.runner.model_runner import ModelRunner

# `on_phase(text)`, if given, hears each loading phase as it starts (the job runner shows them).
PhaseCallback = Callable[[str], None]

# Decode batches up to this size replay CUDA graphs (larger ones run eagerly); one graph per
# captured size (runner/cuda_graphs.capture_sizes), two where shared-prefix attention is on.
MAX_GRAPH_BATCH = 1024


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is visible; use device: cpu")
    return torch.device(name)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype for the kv_cache_dtype setting."""
    return torch.float8_e4m3fn if name in ("fp8", "fp8_e4m3") else model_dtype


def resolve_backend(name: str, device: torch.device) -> str:
    from batchllm.kernels import triton_available

    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if name == "triton" and not triton_available(device):
        raise ConfigError("attention_backend='triton' needs triton and a CUDA device "
                          "(or TRITON_INTERPRET=1); use attention_backend: torch")
    return name


def max_model_len(config: EngineConfig, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 4096
    asked = config.model.max_model_len
    if asked is not None and asked > limit:
        raise ConfigError(f"max_model_len={asked} exceeds the model's max_position_embeddings "
                          f"({limit}); use at most {limit}")
    return asked or limit


def check_tensor_parallel(hf_config, size: int) -> None:
    """Refuse, before any weight loads, a tensor-parallel size the model's shapes cannot split."""
    if size == 1:
        return
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    problems = []
    if heads % size:
        problems.append(f"its {heads} attention heads")
    if (kv >= size and kv % size) or (kv < size and size % kv):
        problems.append(f"its {kv} key/value heads (a size must divide them, or be a multiple of them)")
    inter = getattr(hf_config, "intermediate_size", None)
    if inter and inter % size:
        problems.append(f"its MLP width {inter}")
    if problems:
        raise ConfigError(f"tensor_parallel_size={size} cannot split this model: "
                          f"{' and '.join(problems)} are not divisible by {size}; choose a size "
                          f"that divides {heads} (e.g. " +
                          ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0 and
                                    ((kv >= n and kv % n == 0) or (kv < n and n % kv == 0))) + ")")


def kv_heads_per_rank(num_kv_heads: int, size: int) -> int:
    """KV heads one rank holds: its share, or one (replicated) when there are fewer than ranks."""
    return num_kv_heads // size if num_kv_heads >= size else 1


@dataclass(slots=True)
class RankParts:
    """What every tensor-parallel rank holds: its model shard, KV cache shard and runner."""

    model: torch.nn.Module
    hf_config: object
    max_model_len: int
    kv_cache: KVCache
    runner: ModelRunner


def build_rank(config: EngineConfig, device: torch.device, backend: str, eos_id: int | None,
               agree=None, on_phase: PhaseCallback | None = None) -> RankParts:
    """Load this rank's model shard and size and allocate its KV cache; `agree(n)` gives the
    block count every rank can hold (the minimum over ranks) under tensor parallelism."""
    from batchllm.distributed.parallel_state import get_tp_rank, get_tp_size
    from batchllm.kernels import get_kernels
    from batchllm.loader import load_model
    from batchllm.runner.sampler import Sampler

    phase = on_phase or (lambda text: None)
    phase(f"loading weights of {config.model.model} on {device}")
    model, hf_config = load_model(config.model, device)
    phase("sizing the KV cache")
    model.use_kernels(get_kernels(backend))
    model_len = max_model_len(config, hf_config)
    sched, f, cache = config.scheduler, model.family, config.cache
    size = get_tp_size()
    kv_heads = kv_heads_per_rank(f.num_kv_heads, size)
    dtype = kv_cache_dtype(cache.kv_cache_dtype, next(model.parameters()).dtype)
    block_bytes = bytes_per_block(hf_config.num_hidden_layers, cache.block_size, kv_heads,
                                  f.head_dim, dtype)
    activation = model.activation_bytes(sched.max_num_batched_tokens, sched.max_num_seqs)
    num_blocks = cache.num_gpu_blocks_override or num_device_blocks(
        device, block_bytes, cache.gpu_memory_utilization, cache.cpu_kv_cache_bytes, activation)
    if agree is not None:
        num_blocks = agree(num_blocks)
    if num_blocks < 2:
        raise ConfigError(f"no room for a KV cache on {device} ({num_blocks} blocks of "
                          f"{block_bytes} bytes); raise gpu_memory_utilization or use a smaller model")
    num_cpu_blocks = int(cache.swap_space * (1 << 30)) // block_bytes
    phase(f"allocating the KV cache: {num_blocks} blocks of {cache.block_size} tokens "
          f"({num_blocks * block_bytes / (1 << 30):.2f} GiB)")
    kv = KVCache(hf_config.num_hidden_layers, num_blocks, num_cpu_blocks, cache.block_size,
                 kv_heads, f.head_dim, dtype, device)
    cascade = CascadePolicy(config.cascade_attention and backend == "triton", cache.block_size,
                            config.cascade_min_tokens, config.cascade_min_reqs)
    sampler = Sampler(device, hf_config.vocab_size) if get_tp_rank() == 0 else None
    runner = ModelRunner(model, kv, sampler, cache.block_size, device, eos_id, cascade)
    if (device.type == "cuda" and backend == "triton" and not config.enforce_eager
            and getattr(model, "supports_cuda_graphs", True)):  # the transformers fallback may not
        phase(f"capturing CUDA graphs for decode batches up to "
              f"{min(sched.max_num_seqs, MAX_GRAPH_BATCH)}")
        runner.capture_decode_graphs(min(sched.max_num_seqs, MAX_GRAPH_BATCH), model_len)
    return RankParts(model, hf_config, model_len, kv, runner)


def with_device_defaults(config: EngineConfig, device: torch.device) -> EngineConfig:
    """num_decode_steps, async_scheduling and max_num_batched_tokens left unset take their
    defaults for the device."""
    sched = config.scheduler
    if sched.max_num_batched_tokens is None:
        sched = replace(sched, max_num_batched_tokens=8192 if device.type == "cuda" else 2048)
    if sched.num_decode_steps is None:
        sched = replace(sched, num_decode_steps=8 if device.type == "cuda" else 1)
    if sched.async_scheduling is None:
        sched = replace(sched, async_scheduling=device.type == "cuda")
    return replace(config, scheduler=sched)


@dataclass(slots=True)
class EngineParts:
    """What one engine is made of, built from its config."""

    config: EngineConfig  # with device-dependent defaults filled in
    device: torch.device
    backend: str  # attention kernels: "torch" | "triton"
    tokenizer: object | None
    model: torch.nn.Module
    hf_config: object
    max_model_len: int
    eos_token_ids: list[int]  # the first is the EOS; the others act as stop tokens
    kv_cache: KVCache
    runner: ModelRunner
    scheduler: Scheduler
    tp_group: object | None = None  # distributed.group.TensorParallelGroup under tensor parallelism


def build_engine_parts(config: EngineConfig, skip_tokenizer_init: bool = False,
                       on_phase: PhaseCallback | None = None) -> EngineParts:
    device = resolve_device(config.device)
    tokenizer = None
    if not skip_tokenizer_init:
        if on_phase is not None:
            on_phase("loading the tokenizer")
        from batchllm.hub import resolve_model
        from batchllm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(str(resolve_model(config.model.tokenizer or config.model.model)),
                                   trust_remote_code=config.model.trust_remote_code)
    group, agree = None, None
    if config.tensor_parallel_size > 1:
        from batchllm.distributed.group import start_group
        from batchllm.hub import resolve_model
        from batchllm.loader import load_hf_config

        path = resolve_model(config.model.model)
        check_tensor_parallel(load_hf_config(path, config.model.trust_remote_code),
                              config.tensor_parallel_size)
        group, device = start_group(config, device)
        agree = group.min_over_ranks
    try:
        backend = resolve_backend(config.attention_backend, device)
        config = with_device_defaults(config, device)
        eos = tokenizer.eos_token_id if tokenizer else None
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        rank = build_rank(config, device, backend, eos_ids[0] if eos_ids else None, agree,
                          on_phase)
        if tokenizer is None:
            eos = getattr(rank.hf_config, "eos_token_id", None)
            eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
            rank.runner.eos_token_id = eos_ids[0] if eos_ids else None
        if group is not None:
            rank.runner.tp_group = group
        kv = rank.kv_cache
        scheduler = Scheduler(config.scheduler, config.cache, kv.num_blocks, kv.num_cpu_blocks,
                              rank.max_model_len)
    except BaseException:
        if group is not None:
            group.shutdown()
        raise
    return EngineParts(config, device, backend, tokenizer, rank.model, rank.hf_config,
                       rank.max_model_len, eos_ids, kv, rank.runner, scheduler, group)
