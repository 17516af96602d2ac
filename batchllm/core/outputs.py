"""The records that cross between scheduler, runner and user: plans, sampled tokens, results.

The scheduler hands the runner a SchedulerOutput each step and gets a RunnerOutput back; these
two are the only types that cross that line. RequestOutput / CompletionOutput are what users get.
No torch here: core/ is pure CPU planning.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from batchllm.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """Sent once, the first step a request (one sample of it) is scheduled.

    The runner keeps per-request sampling state (params, generator, output-token counts for
    penalties) under `req_id` until the id appears in `SchedulerOutput.finished_req_ids`.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int | None  # effective seed of this sample (None: unseeded)


@dataclass(slots=True)
class ScheduledChunk:
    """One request's share of the step's flattened token batch.

        |<------ num_computed_tokens ------>|<-- token_ids (this step) -->|
        | already in the KV cache (blocks)  | computed now, K/V written   |

    Positions of `token_ids` are num_computed_tokens .. num_computed_tokens + len(token_ids) - 1.
    `block_table` covers every token up to the end of this chunk. When `sample` is true, the last
    token's logits are sampled (the chunk reaches the end of the request's known tokens).
    """

    req_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    sample: bool
    # Multi-step decode: the runner computes this many tokens one after another, each fed by the
    # one sampled before it (block_table already covers them all). 1 for ordinary chunks.
    num_steps: int = 1


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan. The runner applies, in order: swap_out, swap_in, copy_blocks, forward."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu block, cpu block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu block, gpu block)
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write
    finished_req_ids: list[str] = field(default_factory=list)  # runner drops their state
    preempted_req_ids: list[str] = field(default_factory=list)
    num_steps: int = 1  # > 1: a multi-step decode plan (every chunk is one decode token)
    # A plan made while the one before it still runs: where prev_rows[i] >= 0, chunk i's last
    # input token is still a placeholder (-1 in token_ids): the last token the previous plan
    # samples in its row prev_rows[i] (rows: its sampled chunks, in order), taken on the
    # device. None when every chunk carries its tokens.
    prev_rows: list[int] | None = None
    # hashes of the full blocks that requests admitted in this plan compute (Scheduler keeps
    # them until the plan's results are applied and the blocks cached)
    computing_hashes: set[int] = field(default_factory=set)
    # Structured output: the allowed tokens of the constrained rows this plan samples (a
    # batchllm.structured.GrammarBitmask, set by the engine when it launches the plan; None when
    # no sampled row is constrained). The scheduler never sets or reads it.
    grammar: object | None = None

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.swap_out and not self.swap_in and not self.copy_blocks


@dataclass(slots=True)
class RunnerOutput:
    """A plan's samples, per request that samples (chunks with `sample=True`, in plan order).

    token_ids[i] holds the tokens request req_ids[i] sampled, one per step it ran (one for an
    ordinary step, `chunk.num_steps` in a multi-step decode round); logprobs[i][j] is log p of
    token_ids[i][j], ranks[i][j] its rank (1: the most likely; when some request asked for
    logprobs) and top_logprobs[i][j] maps ids to log p (when some request asked for top ones).
    prompt_logprobs: per request that asked, the prompt positions this plan computed."""

    req_ids: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] | None = None  # log p of each sampled token (temperature 1 softmax)
    top_logprobs: list[list[dict[int, float]]] | None = None
    errors: dict[str, str] = field(default_factory=dict)  # req_id -> why it failed (NaN logits…)
    ranks: list[list[int]] | None = None
    prompt_logprobs: dict[str, "PromptLogprobsChunk"] | None = None


@dataclass(slots=True)
class PromptLogprobsChunk:
    """Log-probs of the prompt tokens start .. start + len(logprobs) - 1, each given the tokens
    before it (start >= 1: the first prompt token has none); top[j] maps the k most likely ids
    at that position to their log p, in rank order."""

    start: int
    logprobs: list[float]
    ranks: list[int]
    top: list[dict[int, float]]


@dataclass(slots=True)
class Logprob:
    """vLLM's record of one token's log-probability: rank 1 is the most likely token (a token
    tied with others gets the worst of their ranks); decoded_token: the token decoded alone."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's shapes: per generated token, token id -> Logprob (the sampled token and the top ones);
# per prompt token the same, None for the first (nothing precedes it)
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (time.time()) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One sample of a request. logprobs[i] (when SamplingParams.logprobs is set) maps token ids
    to their Logprob at output position i: token_ids[i] first, then the top `logprobs` ones."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # structured output: whether the text completes its grammar (None: not constrained)
    structured_output_valid: bool | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_logprobs(self) -> list[float] | None:
        """log p of each generated token (None when logprobs were not asked for)."""
        if self.logprobs is None:
            return None
        return [step[t].logprob for t, step in zip(self.token_ids, self.logprobs)]


@dataclass(slots=True)
class RequestOutput:
    """What LLM.generate returns per prompt, in input order."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = False
    error: str | None = None  # set when the request could not be served (too long, bad ids…)
    metrics: RequestMetrics | None = None
    prompt_logprobs: PromptLogprobs | None = None  # when SamplingParams.prompt_logprobs is set
