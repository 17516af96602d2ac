"""The engine as the job runner sees it (batchllm.engine.LLMEngine honours this), and its factory."""
from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from batchllm.config import build_engine_config
from batchllm.core.outputs import RequestOutput
from batchllm.jobs.errors import JobModelError
from batchllm.jobs.preprocess import TokenizerLike
from batchllm.jobs.spec import JobSpec
from batchllm.sampling_params import SamplingParams


class EngineLike(Protocol):
    tokenizer: TokenizerLike | None
    max_model_len: int

    def add_request(self, request_id: str, prompt: str | list[int], sampling_params: SamplingParams,
                    arrival_time: float | None = None) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def get_num_unfinished_requests(self) -> int: ...

    def abort_request(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, Any]: ...


def build_engine(spec: JobSpec, on_phase: Callable[[str], None] | None = None) -> EngineLike:
    """Load the job's model into a streaming engine (the only place jobs/ imports the engine);
    `on_phase(text)` hears each loading phase (weights, KV cache, CUDA graphs) as it starts."""
    from batchllm.engine import LLMEngine  # here: validating a job loads no torch

    start = time.monotonic()
    try:
        engine = LLMEngine(build_engine_config(spec.model, tokenizer=spec.tokenizer, **spec.engine),
                           on_phase=on_phase)
    except (ValueError, RuntimeError, OSError) as e:  # ModelLoadError, ConfigError, unsupported...
        raise JobModelError(f"{spec.source or 'job'}: cannot load model {spec.model}: "
                            f"{type(e).__name__}: {e}") from e
    if on_phase is not None:
        on_phase(f"engine ready in {time.monotonic() - start:.1f} s")
    return engine
