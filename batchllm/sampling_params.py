"""SamplingParams: how each request is sampled and when it stops (vLLM's names and defaults)."""
from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field, fields, replace
from typing import Any

INT64_MAX = 2**63 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch.Generator takes


class SamplingParamsError(ValueError):
    """A sampling setting is invalid; the message names the field and the value."""


@dataclass(slots=True)
class StructuredOutputsParams:
    """Constrained decoding (vLLM's names): exactly one of a JSON schema (`json`, an object or its
    JSON text), any JSON object (`json_object`), a `regex`, a `choice` of strings or a `grammar`
    (Lark, or GBNF with `::=` rules). Checked for shape here; compiled by batchllm.structured."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError(
                "structured_outputs: give exactly one of json, regex, choice, grammar, json_object "
                f"(got {', '.join(given) or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        ok = {"json": isinstance(value, (dict, str)) and bool(value),
              "regex": isinstance(value, str) and bool(value) and _encodable(value),
              "grammar": isinstance(value, str) and bool(value.strip()) and _encodable(value),
              "json_object": value is True,
              "choice": isinstance(value, list) and bool(value) and all(
                  isinstance(c, str) and c and _encodable(c) for c in value)}[kind]
        if not ok:
            expected = {"json": "a JSON schema (an object, or its JSON text)",
                        "regex": "a non-empty regular expression", "grammar": "a non-empty grammar",
                        "json_object": "true", "choice": "a non-empty list of non-empty strings"}
            shown = repr(value)
            raise SamplingParamsError(f"structured_outputs.{kind}="
                                      f"{shown if len(shown) <= 80 else shown[:77] + '...'} is "
                                      f"invalid: expected {expected[kind]}")

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> str:
        """The constraint as canonical text: equal constraints compile once (the cache key)."""
        value = getattr(self, self.kind)
        return self.kind + ":" + json.dumps(value, sort_keys=True, ensure_ascii=False)

    @classmethod
    def coerce(cls, value: object) -> "StructuredOutputsParams | None":
        """From an object of the same shape (a job's YAML / JSON); None stays None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise SamplingParamsError(f"structured_outputs must be an object with one of "
                                      f"{', '.join(cls.KINDS)}; got {type(value).__name__}")
        unknown = [k for k in value if k not in cls.KINDS]
        if unknown:
            import difflib

            near = difflib.get_close_matches(str(unknown[0]), cls.KINDS, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else f" Valid: {', '.join(cls.KINDS)}."
            raise SamplingParamsError(f"structured_outputs: unknown key {unknown[0]!r}.{hint}")
        return cls(**value)


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: also the top k
    prompt_logprobs: int | None = None  # the same for each prompt token (the first has none)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (in [-100, 100])
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # each word's last token is banned where it would end it
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len)
    extra_keys: tuple = field(default=())  # e.g. an adapter id; part of prefix-cache hashes
    # bad_words as token sequences (set by the engine from its tokenizer; not a user setting)
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Normalize only the shapes that are valid; anything else is left for validate() to name.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = [_index(t) for t in self.stop_token_ids]
        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0
        self.logit_bias = _bias_dict(self.logit_bias)
        if isinstance(self.allowed_token_ids, tuple):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.allowed_token_ids, list):
            self.allowed_token_ids = [_index(t) for t in self.allowed_token_ids]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif isinstance(self.bad_words, (list, tuple)):
            self.bad_words = list(dict.fromkeys(self.bad_words)) if all(
                isinstance(w, str) for w in self.bad_words) else list(self.bad_words)
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        self.validate()

    def validate(self) -> None:
        """Every field's type and range; raises SamplingParamsError naming the field and value.
        Booleans are not numbers here, numbers are finite, integers fit in 64 bits."""
        def bad(name: str, expected: str) -> SamplingParamsError:
            shown = repr(getattr(self, name))
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            return SamplingParamsError(f"{name}={shown} is invalid: expected {expected}")

        def integer(name: str, lo: int, hi: int = INT64_MAX, null: bool = False) -> None:
            v = getattr(self, name)
            if not (v is None and null) and not (_is_int(v) and lo <= v <= hi):
                bound = f"an integer in [{lo}, {hi}]" if hi != INT64_MAX else f"an integer >= {lo}"
                raise bad(name, bound + (" or null" if null else ""))

        def number(name: str, ok: bool, expected: str) -> None:
            v = getattr(self, name)
            if not _is_number(v) or not ok:
                raise bad(name, expected)

        integer("n", 1)
        integer("max_tokens", 1, null=True)
        integer("min_tokens", 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"at most max_tokens ({self.max_tokens})")
        number("temperature", _is_number(self.temperature) and self.temperature >= 0,
               "a finite number >= 0")
        number("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]")
        integer("top_k", 0)
        number("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]")
        if self.seed is not None and not (_is_int(self.seed) and SEED_MIN <= self.seed
                                          and self.seed + self.n - 1 <= SEED_MAX):
            raise bad("seed", "an integer in [-2**63, 2**64 - n] (a 64-bit seed; sample i of n "
                              "uses seed + i) or null")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            number(name, _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]")
        number("repetition_penalty", _is_number(self.repetition_penalty)
               and self.repetition_penalty > 0, "a finite number > 0")
        if not isinstance(self.stop, list) or any(
                not isinstance(s, str) or not s or not _encodable(s) for s in self.stop):
            raise bad("stop", "a non-empty string or a list of them (valid Unicode text)")
        if not isinstance(self.stop_token_ids, list) or any(
                not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids (integers >= 0)")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        integer("logprobs", 0, 20, null=True)
        integer("prompt_logprobs", 0, 20, null=True)
        if self.logit_bias is not None and not _bias_ok(self.logit_bias):
            raise bad("logit_bias", "an object of token id (an integer >= 0, or its text) -> bias "
                                    "(a finite number; clamped to [-100, 100])")
        if self.allowed_token_ids is not None and (
                not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids
                or any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.allowed_token_ids)):
            raise bad("allowed_token_ids", "a non-empty list of token ids (integers >= 0) or null")
        if self.bad_words is not None and (not isinstance(self.bad_words, list) or any(
                not isinstance(w, str) or not w.strip() or not _encodable(w) for w in self.bad_words)):
            raise bad("bad_words", "a list of non-empty strings (valid Unicode text) or null")
        v = self.truncate_prompt_tokens
        if v is not None and not (_is_int(v) and (v == -1 or 1 <= v <= INT64_MAX)):
            raise bad("truncate_prompt_tokens", "an integer >= 1 (keep the prompt's last k "
                                                "tokens), -1 (the model's length) or null")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_logits_processing(self) -> bool:
        """logit_bias, allowed_token_ids or bad_words: the sampler edits this request's logits."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words)

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    def with_overrides(self, **overrides: object) -> "SamplingParams":
        """A copy with some fields replaced (per-row overrides); unknown names raise."""
        names = {f.name for f in fields(self)}
        for key in overrides:
            if key not in names:
                import difflib

                near = difflib.get_close_matches(key, sorted(names), n=1)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise SamplingParamsError(f"unknown sampling setting {key!r}.{hint}")
        return replace(self, **overrides)

    @classmethod
    def field_names(cls) -> list[str]:
        """The user's settings (not the ones the engine fills in, named with a leading _)."""
        return [f.name for f in fields(cls) if not f.name.startswith("_")]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _index(v: object) -> object:
    """An integer-like value (numpy or torch integer) as an int; anything else unchanged."""
    if isinstance(v, (bool, float)) or not hasattr(v, "__index__"):
        return v
    return operator.index(v)


def _bias_dict(value: object) -> object:
    """logit_bias with integer keys (JSON gives them as text) and biases clamped to [-100, 100]
    as vLLM does; a value of another shape is returned unchanged for validate() to name."""
    if not isinstance(value, dict):
        return value
    out: dict[object, object] = {}
    for key, bias in value.items():
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        key = _index(key)
        out[key] = min(100.0, max(-100.0, float(bias))) if _is_number(bias) else bias
    return out


def _bias_ok(value: object) -> bool:
    return isinstance(value, dict) and all(
        _is_int(k) and 0 <= k <= INT64_MAX and _is_number(b) for k, b in value.items())


def _is_number(v: object) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return math.isfinite(v) if isinstance(v, float) else abs(v) <= 2**1023


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
