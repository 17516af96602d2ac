"""Request: one sample of one prompt as the scheduler sees it — tokens, progress, status, hashes.

Token regions of a request (prompt and outputs are one sequence to the scheduler):

    |<------------------------ num_tokens ------------------------>|
    |<------- prompt_token_ids ------->|<--- output_token_ids ---->|
    |<---- num_computed_tokens ---->|  (K/V in the cache)          |

Each step the scheduler catches num_computed_tokens up towards num_tokens; a step whose chunk
reaches num_tokens samples one more output token. num_computed_tokens advances when a step is
planned; the tokens that step samples are placeholders until its results come back:

    |<---------------- num_planned_tokens ---------------->|
    |<------------ num_tokens ------------>|<placeholders>|
    |<------- num_computed_tokens (planned) ------->|      |  (the last token: next input)
"""
from __future__ import annotations

import enum

from batchllm.core.outputs import RequestMetrics
from batchllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


def finish_reason_of(status: RequestStatus) -> str | None:
    """The user-facing finish reason ("stop" | "length" | "abort" | "error") of a status."""
    return _FINISH_REASONS.get(status)


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...], extra_keys: tuple) -> int:
    """Hash of one full block, chained over its parent's hash (stable within a process)."""
    return hash((parent_hash, token_ids, extra_keys))


def admission_error(request: "Request", model_max_len: int, cache_max_len: int) -> str | None:
    """Why a request can never run (empty, longer than the model or the whole cache), or None."""
    n = request.num_prompt_tokens
    if n == 0:
        return f"request {request.request_id!r}: the prompt is empty (0 tokens)"
    if n > model_max_len:
        return (f"request {request.request_id!r}: prompt has {n} tokens, more than "
                f"max_model_len={model_max_len}; shorten it or raise max_model_len")
    if n > cache_max_len:
        return (f"request {request.request_id!r}: prompt has {n} tokens but the KV cache holds "
                f"only {cache_max_len}; raise gpu_memory_utilization or use a smaller model")
    return None


class Request:
    """Mutable per-request state owned by the scheduler (the runner never sees this object)."""

    __slots__ = ("request_id", "group_id", "sample_index", "prompt_token_ids", "output_token_ids",
                 "all_token_ids", "sampling_params", "eos_token_id", "seed", "num_computed_tokens",
                 "num_cached_tokens", "status", "stop_reason", "error", "metrics", "block_hashes",
                 "priority", "was_scheduled", "num_preemptions", "num_output_placeholders")

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 arrival_time: float, eos_token_id: int | None = None, group_id: str | None = None,
                 sample_index: int = 0, seed: int | None = None) -> None:
        self.request_id = request_id
        self.group_id = group_id if group_id is not None else request_id
        self.sample_index = sample_index
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.seed = seed if seed is not None else sampling_params.seed
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.block_hashes: list[int] = []  # hashes of the full blocks seen so far (prefix cache)
        self.priority: tuple[float, int] = (arrival_time, 0)  # lower runs first; set by scheduler
        self.was_scheduled = False  # NewRequestData sent to the runner
        self.num_preemptions = 0
        # tokens that plans already scheduled (and still running) sample for this request:
        # counted ahead as placeholders, filled in by Scheduler.update
        self.num_output_placeholders = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_planned_tokens(self) -> int:
        """Tokens the request will have once the plans already scheduled return."""
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_planned_outputs(self) -> int:
        return len(self.output_token_ids) + self.num_output_placeholders

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return finish_reason_of(self.status)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def extend_output_tokens(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def full_block_hashes(self, block_size: int, num_tokens: int | None = None) -> list[int]:
        """Hashes of (at least) the full blocks among the first `num_tokens` tokens.

        The list is cached on the request and only ever extended (tokens are append-only), so
        it may hold more hashes than asked for; callers index it rather than copy it.
        """
        n_full = (self.num_tokens if num_tokens is None else num_tokens) // block_size
        hashes = self.block_hashes
        extra = self.sampling_params.extra_keys
        while len(hashes) < n_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            chunk = tuple(self.all_token_ids[i * block_size:(i + 1) * block_size])
            hashes.append(hash_block(parent, chunk, extra))
        return hashes

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
