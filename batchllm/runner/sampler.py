"""Token sampling for a batch of requests, vectorized on the device, with per-request seeds and penalties.

Every row is sampled with the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. draws the
token with probability p. A seeded request draws its E from its own generator, so its tokens do
not depend on what else is in the batch. Greedy rows take argmax of the (penalized) logits.
The only host sync is the one copy of the results at the end of `sample`. Structured output: the
plan's grammar bitmask (`set_grammar`) sets the tokens a constrained row may not take to -inf
before anything else; a batch with no constrained row does no extra work. logit_bias,
allowed_token_ids and bad_words (runner/logits_constraints.py) come next, then penalties, as in
vLLM; log-probs (and a sampled token's rank among all tokens) are those of the logits before them.
Ranks and top log-probs are only computed while some tracked request asks for logprobs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchllm.kernels import greedy_sample_for
from batchllm.runner.sample_records import NONFINITE_ERROR, DeviceSample, SamplerResult, \
    result_from_host
from batchllm.runner.logits_constraints import ConstraintState, LogitsConstraints
from batchllm.sampling_params import SamplingParams


@dataclass(slots=True)
class _RequestState:
    params: SamplingParams
    generator: torch.Generator | None
    min_tokens_ids: list[int]  # ids masked until min_tokens outputs (eos + stop_token_ids)
    penalty_slot: int | None  # row in the sampler's count tables; None: no penalties
    num_outputs: int = 0
    constraints: ConstraintState | None = None  # logit_bias / allowed_token_ids / bad_words
    special: bool = False  # penalties or constraints: the row takes the general path


class Sampler:
    """Holds per-request sampling state from add_request until remove_request."""

    def __init__(self, device: torch.device | str, vocab_size: int):
        self.device, self.vocab_size = torch.device(device), vocab_size
        self._reqs: dict[str, _RequestState] = {}
        # Penalty tables, one row per slot: output token counts and a prompt-token mask.
        self._counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=self.device)
        self._prompt_mask = torch.zeros(0, vocab_size, dtype=torch.bool, device=self.device)
        self._free_slots: list[int] = []
        self._greedy_sample = greedy_sample_for(self.device)
        self._grammar: tuple[dict[str, int], torch.Tensor] | None = None  # see set_grammar
        self._constraints = LogitsConstraints(self.device, vocab_size)
        self._num_logprobs = 0  # tracked requests that ask for logprobs
        self._num_constrained = 0  # tracked requests with a ConstraintState
        # byte -> its 8 bits (little-endian words: byte k of word w holds tokens 32w + 8k ...)
        self._bits_of_byte = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool().to(self.device)

    @property
    def num_requests(self) -> int:
        return len(self._reqs)

    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    seed: int | None, eos_token_id: int | None) -> None:
        """Start tracking a request; a request already tracked (re-scheduled after preemption) keeps its state."""
        if req_id in self._reqs:
            return
        generator = None
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        masked = list(params.stop_token_ids or [])
        if eos_token_id is not None:
            masked.append(eos_token_id)
        slot = None
        if params.needs_penalties:
            slot = self._take_slot()
            self._counts[slot].zero_()
            self._prompt_mask[slot].zero_()
            if prompt_token_ids:
                prompt = torch.tensor(prompt_token_ids, dtype=torch.long).clamp_(0, self.vocab_size - 1)
                self._prompt_mask[slot, prompt.to(self.device)] = True
        constraints = None
        if params.needs_logits_processing:
            try:
                constraints = self._constraints.add(params, params._bad_words_token_ids)
            except ValueError:
                if slot is not None:
                    self._free_slots.append(slot)
                raise
        self._reqs[req_id] = _RequestState(params, generator, masked, slot, constraints=constraints,
                                           special=slot is not None or constraints is not None)
        self._num_logprobs += params.logprobs is not None
        self._num_constrained += constraints is not None

    def remove_request(self, req_id: str) -> None:
        state = self._reqs.pop(req_id, None)
        if state is None:
            return
        if state.penalty_slot is not None:
            self._free_slots.append(state.penalty_slot)
        if state.constraints is not None:
            self._constraints.release(state.constraints)
            self._num_constrained -= 1
        self._num_logprobs -= state.params.logprobs is not None

    def _take_slot(self) -> int:
        if not self._free_slots:
            old = self._counts.shape[0]
            new = max(8, 2 * old)
            grow = (new - old, self.vocab_size)
            self._counts = torch.cat([self._counts, self._counts.new_zeros(grow)])
            self._prompt_mask = torch.cat([self._prompt_mask, self._prompt_mask.new_zeros(grow)])
            self._free_slots.extend(range(new - 1, old - 1, -1))
        return self._free_slots.pop()

    def set_grammar(self, grammar: object | None) -> None:
        """The plan's structured-output mask (a structured.GrammarBitmask or None), applied to the
        rows of its requests in each sample_on_device call until the next plan's; copied to the
        device once, here."""
        if grammar is None:
            self._grammar = None
            return
        bits = torch.from_numpy(grammar.bitmask)
        if self.device.type == "cuda":
            bits = bits.pin_memory()
        self._grammar = ({rid: i for i, rid in enumerate(grammar.req_ids)},
                         bits.to(self.device, non_blocking=True))

    def _grammar_mask(self, req_ids: list[str], vocab: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows of this batch with a grammar, their allowed tokens [rows, vocab] bool) or None."""
        index, bits = self._grammar
        found = [(i, index[r]) for i, r in enumerate(req_ids) if r in index]
        if not found:
            return None
        rows = self._tensor([i for i, _ in found], torch.long)
        words = bits[self._tensor([j for _, j in found], torch.long)]  # [rows, words] int32
        allowed = self._bits_of_byte[words.view(torch.uint8).long()].flatten(1)[:, :vocab]
        if allowed.shape[1] < vocab:  # logits wider than the tokenizer: the rest is not allowed
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
        return rows, allowed

    @staticmethod
    def _mask_logits(logits: torch.Tensor, grammar: tuple[torch.Tensor, torch.Tensor]) -> None:
        rows, allowed = grammar
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            t = t.pin_memory()  # a pageable host copy would block the host
        return t.to(self.device, non_blocking=True)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, req_ids: list[str]) -> SamplerResult:
        """One token per row of `logits` [B, V] (float32 or bfloat16) for the requests `req_ids`, in order."""
        return self.to_host(self.sample_on_device(logits, req_ids), req_ids)

    @torch.no_grad()
    def sample_on_device(self, logits: torch.Tensor, req_ids: list[str],
                         active: list[bool] | None = None) -> DeviceSample:
        """Sample without a host sync: the results stay on the device until `to_host`.
        `active`: the rows whose sample counts (a multi-step round's later sub-steps sample rows
        that are already done); the others do not advance penalties, min_tokens or bad words."""
        states = [self._reqs[r] for r in req_ids]
        params = [s.params for s in states]
        simple = not any(s.special or s.num_outputs < s.params.min_tokens for s in states)
        grammar = None if self._grammar is None else self._grammar_mask(req_ids, logits.shape[1])
        if simple and all(p.greedy for p in params):
            # Fast path: one fused read of the logits in their own dtype (no float32 copy):
            # argmax, log p(token) = logit - logsumexp, the non-finite flag; bad rows get token 0.
            if grammar is not None:  # a row with no allowed token is a bad row (-inf logsumexp)
                self._mask_logits(logits, grammar)
            tokens, token_logprobs, bad_rows = self._greedy_sample(logits)
            raw_logprobs = None
        else:
            logits = logits.float()
            bad_rows = ~torch.isfinite(logits).all(dim=-1)
            if grammar is not None:  # log-probs of constrained rows are over the allowed tokens
                self._mask_logits(logits, grammar)
                bad_rows |= torch.isneginf(logits).all(dim=-1)
            raw_logprobs = torch.log_softmax(logits, dim=-1)
            if not simple:
                logits = logits.clone()
                if self._constraints.apply(logits, [s.constraints for s in states]):
                    bad_rows |= torch.isneginf(logits).all(dim=-1)  # nothing left to sample
                logits = self._apply_penalties(logits, states)
                self._mask_until_min_tokens(logits, states)
            greedy_tokens = logits.argmax(dim=-1)
            sampled = self._sample_random(logits, states, params)
            if sampled is not None:
                greedy = self._tensor([p.greedy for p in params], torch.bool)
                tokens = torch.where(greedy, greedy_tokens, sampled)
            else:
                tokens = greedy_tokens
            token_logprobs = raw_logprobs.gather(1, tokens[:, None])[:, 0]
            tokens = torch.where(bad_rows, torch.zeros_like(tokens), tokens)
        self._count_outputs(tokens, states, active)
        if not self._num_logprobs or all(p.logprobs is None for p in params):
            return DeviceSample(tokens, token_logprobs, bad_rows, None, [])
        # vLLM's rank: how many tokens are at least as likely as the sampled one (itself included)
        if raw_logprobs is None:  # greedy fast path: the logits order tokens as log-probs do
            ranks = (logits >= logits.gather(1, tokens[:, None])).sum(dim=-1)
        else:
            ranks = (raw_logprobs >= token_logprobs[:, None]).sum(dim=-1)
        k = max((p.logprobs or 0) for p in params)
        top = None
        if k > 0:
            if raw_logprobs is None:
                raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
            top = raw_logprobs.topk(k, dim=-1)
        return DeviceSample(tokens, token_logprobs, bad_rows, top, [p.logprobs or 0 for p in params],
                            ranks)

    def to_host(self, d: DeviceSample, req_ids: list[str]) -> SamplerResult:
        """Copy one step's samples to the host (the one sync) and shape them per request."""
        return result_from_host(d.columns().cpu(), d.top_k, d.num_top, req_ids, d.ranks is not None)

    result_from_host = staticmethod(result_from_host)

    def _apply_penalties(self, logits: torch.Tensor, states: list[_RequestState]) -> torch.Tensor:
        rows = [i for i, s in enumerate(states) if s.penalty_slot is not None]
        if not rows:
            return logits
        row_idx = self._tensor(rows, torch.long)
        slots = self._tensor([states[i].penalty_slot for i in rows], torch.long)
        ps = [states[i].params for i in rows]
        rep = self._tensor([p.repetition_penalty for p in ps], torch.float32)[:, None]
        freq = self._tensor([p.frequency_penalty for p in ps], torch.float32)[:, None]
        pres = self._tensor([p.presence_penalty for p in ps], torch.float32)[:, None]
        counts = self._counts[slots].float()
        seen = (counts > 0) | self._prompt_mask[slots]
        sub = logits[row_idx]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0).float()
        logits[row_idx] = sub
        return logits

    def _mask_until_min_tokens(self, logits: torch.Tensor, states: list[_RequestState]) -> None:
        rows, cols = [], []
        for i, s in enumerate(states):
            if s.num_outputs < s.params.min_tokens:
                ids = [t for t in s.min_tokens_ids if 0 <= t < logits.shape[1]]
                rows += [i] * len(ids)
                cols += ids
        if rows:
            logits[self._tensor(rows, torch.long), self._tensor(cols, torch.long)] = float("-inf")

    def _sample_random(self, logits: torch.Tensor, states: list[_RequestState],
                       params: list[SamplingParams]) -> torch.Tensor | None:
        if all(p.greedy for p in params):
            return None
        temps = self._tensor([1.0 if p.greedy else float(p.temperature) for p in params], torch.float32)
        logits = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            logits = self._top_k_top_p(logits, params)
        probs = torch.softmax(logits, dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = self._tensor([float(p.min_p) for p in params], torch.float32)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs).exponential_()
        seeded = [i for i, s in enumerate(states) if s.generator is not None]
        if seeded:
            draws = [torch.empty(probs.shape[1], device=self.device).exponential_(generator=states[i].generator)
                     for i in seeded]
            noise[self._tensor(seeded, torch.long)] = torch.stack(draws)
        return (probs / noise).argmax(dim=-1)

    def _top_k_top_p(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        vocab = logits.shape[1]
        top_k = self._tensor([p.top_k if p.top_k > 0 else vocab for p in params], torch.long)
        top_p = self._tensor([float(p.top_p) for p in params], torch.float32)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        drop = rank >= top_k[:, None]
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
        drop |= before > top_p[:, None]  # keeps the smallest prefix reaching top_p (at least one)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)

    def _count_outputs(self, tokens: torch.Tensor, states: list[_RequestState],
                       active: list[bool] | None) -> None:
        if active is not None and all(active):
            active = None
        if active is None:
            for s in states:
                s.num_outputs += 1
        else:
            for s, counts in zip(states, active):
                s.num_outputs += bool(counts)
        if self._num_constrained:
            self._constraints.record(tokens, [s.constraints for s in states], active)
        rows = [i for i, s in enumerate(states) if s.penalty_slot is not None
                and (active is None or active[i])]
        if rows:
            slots = self._tensor([states[i].penalty_slot for i in rows], torch.long)
            picked = tokens[self._tensor(rows, torch.long)]
            flat = slots * self.vocab_size + picked  # scatter_add_: no host sync, unlike index_put_
            self._counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
