"""Structured output (constrained decoding): grammars compiled once, per-request matchers, token bitmasks.

Built on llguidance, an optional dependency (`pip install 'batchllm[structured]'`): batchllm
imports without it, and a constrained request without it fails with a message saying how to
install it. Nothing here is imported by core/ (planning) or by the runner (which only reads a
`GrammarBitmask`).
"""
from batchllm.structured.bitmask import GrammarBitmask
from batchllm.structured.grammar import INSTALL_HINT, StructuredOutputError, available, check_grammar

__all__ = ["GrammarBitmask", "INSTALL_HINT", "StructuredOutputError", "available", "check_grammar",
           "StructuredOutputs"]


def __getattr__(name: str):
    if name == "StructuredOutputs":  # the engine side; imports the grammar library when used
        from batchllm.structured.matchers import StructuredOutputs

        return StructuredOutputs
    raise AttributeError(name)
