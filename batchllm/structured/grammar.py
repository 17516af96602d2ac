"""Constraints -> llguidance grammars, compiled once per distinct constraint (a bounded LRU cache).

JSON is generated compactly with the separators of `json.dumps` (", " and ": "), no other
whitespace: a small model cannot then pad its output with blank lines until max_tokens. Schema
keywords llguidance does not implement are refused (never silently ignored), so every output
that completes validates against its schema.
"""
from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from typing import Any

from batchllm.sampling_params import StructuredOutputsParams

INSTALL_HINT = "pip install 'batchllm[structured]' (or: pip install llguidance)"
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CACHED = 1024  # distinct constraints kept compiled (per-row schemas may be many)


class StructuredOutputError(ValueError):
    """A constraint cannot be used: invalid schema / regex / grammar, or no grammar library."""


def available() -> bool:
    """Whether the grammar library (llguidance) is installed."""
    return importlib.util.find_spec("llguidance") is not None


def _library() -> Any:
    if not available():
        raise StructuredOutputError(f"structured output needs the llguidance package: {INSTALL_HINT}")
    import llguidance

    return llguidance


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (not yet checked); raises StructuredOutputError
    for a schema given as text that is not JSON."""
    llg = _library()
    kind = params.kind
    try:
        if kind in ("json", "json_object"):
            schema: Any = {"type": "object"} if kind == "json_object" else params.json
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, (dict, bool)):
                raise StructuredOutputError(
                    f"structured_outputs.json: a JSON schema is an object, got {type(schema).__name__}")
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return llg.grammar_from("choice", json.dumps(params.choice))
        return llg.grammar_from("grammar", params.grammar)
    except (ValueError, RecursionError) as e:
        if isinstance(e, StructuredOutputError):
            raise
        what = "the schema is not valid JSON" if kind == "json" else "cannot read it"
        raise StructuredOutputError(f"structured_outputs.{kind}: {what}: {_first_line(e)}") from None


def describe(kind: str, error: str) -> str:
    """A library error in a user's words, naming what was wrong."""
    what = {"json": "invalid or unsupported JSON schema", "json_object": "invalid JSON object grammar",
            "regex": "invalid regex", "choice": "invalid choice",
            "grammar": "invalid grammar"}.get(kind, "invalid constraint")
    return f"structured_outputs.{kind}: {what}: {_short(error)}"


def check_grammar(params: StructuredOutputsParams) -> str | None:
    """Why the constraint cannot be compiled (any tokenizer), or None: a pre-flight check."""
    try:
        text = grammar_text(params)
    except StructuredOutputError as e:
        return str(e)
    error = _library().LLMatcher.validate_grammar(text)
    return describe(params.kind, error) if error and not error.startswith("WARNING") else None


class GrammarCache:
    """Compiled constraints for one tokenizer: a prototype matcher per distinct constraint, copied
    for each request (a copy shares the compiled lexer, so its masks are warm at once)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        llg = _library()
        import llguidance.hf

        try:
            self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                                          eos_token=list(eos_token_ids) or None)
        except ValueError as e:
            raise StructuredOutputError(f"structured output needs a fast (Rust) Hugging Face "
                                        f"tokenizer: {_first_line(e)}") from None
        self.executor = llg.LLExecutor()
        self.vocab_size = vocab_size
        self._cache: OrderedDict[str, Any] = OrderedDict()  # key -> prototype matcher | error text
        self.num_compiled = 0

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh matcher at the start of the constraint; raises StructuredOutputError."""
        key = params.key
        found = self._cache.get(key)
        if found is None:
            found = self._compile(params)
            self._cache[key] = found
            if len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if isinstance(found, str):
            raise StructuredOutputError(found)
        return found.deep_copy()

    def _compile(self, params: StructuredOutputsParams) -> Any:
        try:
            text = grammar_text(params)
        except StructuredOutputError as e:
            return str(e)
        llg = _library()
        proto = llg.LLMatcher(self.tokenizer, text, log_level=0)
        self.num_compiled += 1
        if proto.is_error():
            return describe(params.kind, proto.get_error())
        return proto


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _short(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    out = " ".join(lines[:3]) if lines else "unknown error"
    return out if len(out) <= limit else out[:limit - 3] + "..."
