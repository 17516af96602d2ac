"""Stop rules, as pure functions: which new tokens a request keeps, and stop strings in its text.

The scheduler applies `accept_tokens` to the tokens a step (or a multi-step decode round)
sampled for a request; the engine's output processor applies `find_stop_string` to the decoded
text. Nothing here holds state.

Token rules, checked after each token in order (the first that holds ends the request there):

    EOS (unless ignore_eos) or a stop_token_id, once min_tokens outputs exist  -> "stop"
    max_tokens outputs reached, or the sequence reaches the model length       -> "length"
"""
from __future__ import annotations

from dataclasses import dataclass

from batchllm.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class Accepted:
    """How many of the sampled tokens a request keeps, and why it ends (if it does)."""

    num_tokens: int
    finish: str | None = None  # "stop" | "length" | None (goes on)
    stop_token: int | None = None  # the stop_token_id that ended it (not set for EOS)


def accept_tokens(params: SamplingParams, eos_token_id: int | None, num_outputs: int,
                  num_tokens: int, new_tokens: list[int], max_model_len: int) -> Accepted:
    """Apply the stop rules to `new_tokens`, sampled one after another for a request that has
    `num_outputs` output tokens and `num_tokens` tokens in all before them."""
    eos = None if params.ignore_eos else eos_token_id
    stops = params.stop_token_ids
    for j, token in enumerate(new_tokens):
        outputs = num_outputs + j + 1
        if outputs >= params.min_tokens:
            if token == eos:
                return Accepted(j + 1, "stop")
            if stops and token in stops:
                return Accepted(j + 1, "stop", token)
        if params.max_tokens is not None and outputs >= params.max_tokens:
            return Accepted(j + 1, "length")
        if num_tokens + j + 1 >= max_model_len:
            return Accepted(j + 1, "length")
    return Accepted(len(new_tokens))


def steps_left(params: SamplingParams, num_outputs: int, num_tokens: int, max_model_len: int) -> int:
    """How many more tokens a request may sample before a length rule ends it (< 1: none)."""
    left = max_model_len - num_tokens
    if params.max_tokens is not None:
        left = min(left, params.max_tokens - num_outputs)
    return left


def find_stop_string(text: str, stop: list[str], include_stop_str_in_output: bool = False,
                     new_text_len: int | None = None) -> tuple[str, str | None]:
    """Earliest stop string in `text`: (text cut at it, the stop string), or (text, None).

    With `new_text_len`, only matches that end inside the last `new_text_len` characters are
    looked for (older text was checked on earlier calls). The stop string itself is cut off
    unless `include_stop_str_in_output`.
    """
    if not stop:
        return text, None
    start = 0
    if new_text_len is not None:
        start = max(0, len(text) - new_text_len - max(len(s) for s in stop) + 1)
    best: tuple[int, str] | None = None
    for s in stop:
        idx = text.find(s, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    if best is None:
        return text, None
    idx, s = best
    return text[:idx + len(s) if include_stop_str_in_output else idx], s
