"""The engine: construction (build.py), output processing (output_processor.py) and the step
(llm_engine.py). `LLM` (batchllm.llm) is the user-facing API on top of it."""
from __future__ import annotations

from batchllm.engine.llm_engine import LLMEngine

__all__ = ["LLMEngine"]
