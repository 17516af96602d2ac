"""Engine, cache and scheduler settings: frozen, validated dataclasses (no torch import)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

PREEMPTION_MODES = ("recompute", "swap", "auto")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
QUANTIZATIONS = (None, "fp8")
MODEL_IMPLS = ("auto", "native", "transformers")


class ConfigError(ValueError):
    """A setting a user gave is invalid; the message names the setting and the value."""


def _check(cond: bool, name: str, value: object, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache: block size, how much memory it may take, prefix caching and swap space."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    num_gpu_blocks_override: int | None = None
    # KV cache budget on CPU (bytes); None = 1 GiB.
    cpu_kv_cache_bytes: int | None = None
    swap_space: float = 4.0  # GiB of CPU memory for preemption by swap
    enable_prefix_caching: bool = True
    # Storage of cached K/V: "auto" = the model's dtype; "fp8" (= "fp8_e4m3") stores them as
    # float8 e4m3 (scale 1, saturating at +-448): half the bytes of bf16, so twice the tokens fit
    # and decode attention reads half as much. Outputs change slightly (K/V keep 3 mantissa bits).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", self.block_size,
               "a power of two between 1 and 128")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               self.gpu_memory_utilization, "a fraction in (0, 1]")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override > 0,
               "num_gpu_blocks_override", self.num_gpu_blocks_override, "a positive integer")
        _check(self.swap_space >= 0, "swap_space", self.swap_space, "GiB >= 0")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype,
               " | ".join(KV_CACHE_DTYPES))


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Token budget per step, sequence cap, and the preemption policy."""

    max_num_seqs: int = 256
    # Tokens computed per step (decodes first, then prefill chunks). None: 8192 on CUDA; 2048 on
    # CPU, where a step's time grows with its tokens and a long prompt would hold up every other
    # row's next token for as long as its whole prefill takes.
    max_num_batched_tokens: int | None = None
    # A prompt computes at most this many of its tokens per step (0: up to the whole budget), so
    # one long prompt leaves room for other prompts to start beside it.
    long_prefill_token_threshold: int = 0
    preemption_mode: str = "auto"
    # In `auto` mode, a request with at least this many computed tokens is swapped; shorter ones
    # are recomputed. Recomputing N tokens costs one prefill of N tokens (fast, compute bound, and
    # usually helped by the prefix cache); swapping costs two PCIe copies of its KV blocks. Below a
    # few thousand tokens the prefill is cheaper than the round trip plus the wait for swap-in.
    swap_threshold_tokens: int = 2048
    # Decode steps run per scheduling round when every running request is decoding and no
    # waiting request could be admitted: the runner feeds each sampled token straight back on the
    # device, so the host's per-step work (plan, inputs, results) is paid once per round. Tokens
    # past a stop are discarded. None: 8 on CUDA, 1 on CPU.
    num_decode_steps: int | None = None
    # Overlap the host's work with the device's: while one step (or multi-step decode round)
    # runs, the next is planned and queued (its decode tokens fed by the first one's samples on
    # the device), and the first one's results are applied while the second runs. Outputs are
    # unchanged; a request that stops early wastes at most one step or round of its own rows.
    # Preemption and swapping wait for a step that is not chained. None: on for CUDA, off for CPU.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, "max_num_seqs", self.max_num_seqs, "a positive integer")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0,
               "max_num_batched_tokens", self.max_num_batched_tokens, "a positive integer or null")
        _check(self.long_prefill_token_threshold >= 0, "long_prefill_token_threshold",
               self.long_prefill_token_threshold, "an integer >= 0 (0: off)")
        _check(self.num_decode_steps is None or 1 <= self.num_decode_steps <= 64,
               "num_decode_steps", self.num_decode_steps, "an integer in [1, 64] or null")
        _check(self.preemption_mode in PREEMPTION_MODES, "preemption_mode", self.preemption_mode,
               " | ".join(PREEMPTION_MODES))


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which model, in which dtype, and what may be trusted when loading it."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None  # None: from the model config
    seed: int = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False  # .bin / .pt weights are refused unless this is set
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    # "fp8": W8A8, the decoder's linear layers hold float8 e4m3 weights with one scale per output
    # row (quantized as they load), activations are quantized per token as they run. None: as
    # the checkpoint is (an FP8 checkpoint runs in FP8, any other unquantized).
    quantization: str | None = None
    # auto: batchllm's own implementation when the architecture has one, else transformers'
    # modeling code with batchllm's paged KV cache and attention; native | transformers: force one
    model_impl: str = "auto"

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "dtype", self.dtype, " | ".join(DTYPES))
        _check(self.quantization in QUANTIZATIONS, "quantization", self.quantization, "null or fp8")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len",
               self.max_model_len, "a positive integer")
        _check(self.load_format in ("auto", "safetensors", "gguf", "dummy", "pt"), "load_format",
               self.load_format, "auto | safetensors | gguf | dummy | pt")
        _check(self.model_impl in MODEL_IMPLS, "model_impl", self.model_impl, " | ".join(MODEL_IMPLS))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything one engine needs: model, cache, scheduler, device and backend choices."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "auto"
    attention_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs
    # Decode batches whose requests all start with the same cached blocks (a shared system prompt
    # or few-shot preamble, the n samples of one prompt) read those keys once per step for the
    # whole batch instead of once per request (Triton backend; used when the shared part is at
    # least 256 tokens, the batch has 8 or more requests and sharing at least halves the keys the
    # batch reads). Outputs equal within rounding.
    cascade_attention: bool = True
    # ...used when at least this many leading keys are shared and the batch has at least this
    # many requests (below, the merge costs about what the shared read saves)
    cascade_min_tokens: int = 256
    cascade_min_reqs: int = 8
    # Tensor parallelism: the model's heads, MLP and vocabulary split over this many ranks (one
    # process each: this one is rank 0, the others are started by the engine), all-reduced after
    # each layer; one GPU per rank (NCCL), or CPU processes (gloo).
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
               "tensor_parallel_size", self.tensor_parallel_size, "a positive integer")
        _check(self.cascade_min_tokens > 0, "cascade_min_tokens", self.cascade_min_tokens,
               "a positive integer")
        _check(self.cascade_min_reqs > 1, "cascade_min_reqs", self.cascade_min_reqs,
               "an integer > 1")
        _check(self.device in DEVICES or self.device.startswith("cuda:"), "device", self.device,
               "auto | cpu | cuda | cuda:N")
        _check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
               self.attention_backend, " | ".join(ATTENTION_BACKENDS))


def engine_config_field_names() -> dict[str, type]:
    """Flat keyword names LLM(...) accepts, mapped to the sub-config that owns each."""
    out: dict[str, type] = {}
    for cls in (ModelConfig, CacheConfig, SchedulerConfig):
        for f in fields(cls):
            out[f.name] = cls
    for name in ("device", "attention_backend", "enforce_eager", "cascade_attention",
                 "cascade_min_tokens", "cascade_min_reqs", "tensor_parallel_size"):
        out[name] = EngineConfig
    return out


def build_engine_config(model: str, **kwargs: object) -> EngineConfig:
    """Build an EngineConfig from flat keywords (as LLM(...) and job.yaml `engine:` take them)."""
    owners = engine_config_field_names()
    parts: dict[type, dict[str, object]] = {ModelConfig: {}, CacheConfig: {}, SchedulerConfig: {},
                                            EngineConfig: {}}
    for key, value in kwargs.items():
        if key not in owners:
            import difflib

            near = difflib.get_close_matches(key, list(owners), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown engine setting {key!r}.{hint}")
        parts[owners[key]][key] = value
    return EngineConfig(
        model=ModelConfig(model=model, **parts[ModelConfig]),
        cache=CacheConfig(**parts[CacheConfig]),
        scheduler=SchedulerConfig(**parts[SchedulerConfig]),
        **parts[EngineConfig],
    )
