"""batchllm: offline batch inference for LLMs. Public API: LLM, SamplingParams, run_job, JobSpec."""
from __future__ import annotations

from batchllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "run_job", "JobSpec"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import batchllm` must not import torch
    if name == "LLM":
        from batchllm.llm import LLM

        return LLM
    if name in ("run_job", "JobSpec"):
        from batchllm import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module 'batchllm' has no attribute {name!r}")
