"""The BENCHMARKS.md workloads as seeded token-id prompts with fixed output lengths."""
from __future__ import annotations

import random
from dataclasses import dataclass

from benchmarks.shapes import SHAPES


@dataclass(slots=True)
class Workload:
    name: str
    shape: str
    prompts: list[list[int]]
    output_lens: list[int]
    shared_prefix_len: int = 0  # W-prefix: leading tokens every prompt shares
    schemas: list[dict] | None = None  # W-json: each request's JSON schema (structured output)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


WORKLOADS = ("W-8B", "W-nano", "W-hf", "W-prefix", "W-pressure", "W-moe", "W-70B", "W-json")
# W-json's three schemas: nested objects, enums, arrays, bounded numbers, a pattern
JSON_SCHEMAS = (
    {"type": "object", "additionalProperties": False, "required": ["name", "age", "address"],
     "properties": {"name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "address": {"type": "object", "additionalProperties": False,
                                "required": ["city", "country"],
                                "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"enum": ["FR", "DE", "US", "JP"]}}}}},
    {"type": "object", "additionalProperties": False, "required": ["sentiment", "score", "keywords"],
     "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "keywords": {"type": "array", "minItems": 1, "maxItems": 3,
                                 "items": {"type": "string", "maxLength": 16}}}},
    {"type": "object", "additionalProperties": False, "required": ["items", "express"],
     "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
         "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
         "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 50}}}},
         "express": {"type": "boolean"}}})


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # stay below the special tokens that sit at the top of the Llama / Qwen vocabularies
    return [rng.randrange(vocab - 1024) for _ in range(n)]


def build_workload(name: str, seed: int = 0) -> Workload:
    """Prompts and output lengths of workload `name` (W-pressure reuses W-hf's)."""
    rng = random.Random(seed)
    if name in ("W-8B", "W-70B"):  # the same 1000 x 256/256 on two shapes (W-70B: several GPUs)
        shape = "Llama-3.1-8B" if name == "W-8B" else "Llama-3.1-70B"
        v = SHAPES[shape]["vocab_size"]
        return Workload(name, shape, [_ids(rng, 256, v) for _ in range(1000)], [256] * 1000)
    if name == "W-nano":
        v = SHAPES["Qwen3-0.6B"]["vocab_size"]
        in_lens = [rng.randint(100, 1024) for _ in range(256)]
        out_lens = [rng.randint(100, 1024) for _ in range(256)]
        return Workload(name, "Qwen3-0.6B", [_ids(rng, n, v) for n in in_lens], out_lens)
    if name in ("W-hf", "W-pressure", "W-json"):  # W-json: W-hf's prompts, one schema each
        v = SHAPES["Llama-3.2-1B"]["vocab_size"]
        prompts = [_ids(rng, rng.randint(64, 1024), v) for _ in range(512)]
        schemas = [JSON_SCHEMAS[i % 3] for i in range(512)] if name == "W-json" else None
        return Workload(name, "Llama-3.2-1B", prompts, [256] * 512, schemas=schemas)
    if name == "W-prefix":
        v = SHAPES["Llama-3.2-1B"]["vocab_size"]
        prefix = _ids(rng, 2048, v)
        prompts = [prefix + _ids(rng, 64, v) for _ in range(1024)]
        return Workload(name, "Llama-3.2-1B", prompts, [128] * 1024, shared_prefix_len=2048)
    if name == "W-moe":
        v = SHAPES["Qwen3-30B-A3B"]["vocab_size"]
        return Workload(name, "Qwen3-30B-A3B", [_ids(rng, 1024, v) for _ in range(1000)], [128] * 1000)
    raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")


def warmup_workload(work: Workload, n: int = 64, seed: int = 12345) -> tuple[list[list[int]], list[int]]:
    """A short run on the same shape with fresh ids (so it seeds no prefix cache the timed pass
    could hit): n prompts of 32..256 tokens, 16 output tokens each."""
    rng = random.Random(seed)
    v = SHAPES[work.shape]["vocab_size"]
    return [_ids(rng, rng.randint(32, 256), v) for _ in range(n)], [16] * n
