"""Per-request logit_bias, allowed_token_ids and bad_words, applied to a batch's logits on the device.

logit_bias, allowed_token_ids and bad words of one token make one additive row per request
(the bias; -inf where a token is not allowed or banned), kept in a table of slots as the penalty
counts are: a batch adds the rows of its requests that have one, in one gather. A bad word of
several tokens bans its last token only where the request's latest output tokens are the word's
other tokens (vLLM's rule; output tokens only). Each such request keeps its last H output tokens
on the device (H: the longest word prefix tracked), shifted in after every sample, so plans made
ahead (async scheduling) and multi-step rounds need nothing from the host. Requests without
these settings cost nothing: the sampler only calls in for rows that have a state here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_ANY = -2  # a prefix position left of a shorter word's prefix: matches any history token
_NONE = -1  # a history position before the first output token: matches no word token


@dataclass(slots=True)
class ConstraintState:
    """One request's share of the tables: a bias row and / or a history row with its words."""

    bias_slot: int | None
    history_slot: int | None
    prefixes: torch.Tensor | None = None  # [words, width] int64 on the device, right-aligned
    last: torch.Tensor | None = None  # [words] int64: the token each word bans


class LogitsConstraints:
    """The bias and history tables of the requests that have these settings."""

    def __init__(self, device: torch.device, vocab_size: int):
        self.device, self.vocab_size = device, vocab_size
        self._bias = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
        self._history = torch.full((0, 1), _NONE, dtype=torch.long, device=device)
        self._free_bias: list[int] = []
        self._free_history: list[int] = []

    def add(self, params, bad_words_token_ids: list[list[int]] | None) -> ConstraintState | None:
        """A state for a request with logit_bias / allowed_token_ids / bad words (None without).
        Token ids outside the vocabulary raise ValueError naming the setting."""
        words = [list(w) for w in bad_words_token_ids or [] if w]
        for name, ids in (("logit_bias", list(params.logit_bias or {})),
                          ("allowed_token_ids", params.allowed_token_ids or []),
                          ("bad_words", [t for w in words for t in w])):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        single = [w[0] for w in words if len(w) == 1]
        longer = [w for w in words if len(w) > 1]
        state = ConstraintState(None, None)
        if params.logit_bias or params.allowed_token_ids or single:
            state.bias_slot = self._bias_row(params, single)
        if longer:
            state.history_slot = self._history_row(max(len(w) - 1 for w in longer))
            width = max(len(w) - 1 for w in longer)
            prefixes = [[_ANY] * (width - len(w) + 1) + w[:-1] for w in longer]
            state.prefixes = self._tensor(prefixes)
            state.last = self._tensor([w[-1] for w in longer])
        return state if state.bias_slot is not None or state.history_slot is not None else None

    def release(self, state: ConstraintState) -> None:
        if state.bias_slot is not None:
            self._free_bias.append(state.bias_slot)
        if state.history_slot is not None:
            self._free_history.append(state.history_slot)

    def apply(self, logits: torch.Tensor, states: list[ConstraintState | None]) -> bool:
        """Edit `logits` [B, V] (float32) in place for the rows that have a state; returns
        whether any row did."""
        rows = [i for i, s in enumerate(states) if s is not None and s.bias_slot is not None]
        vocab = min(logits.shape[1], self.vocab_size)
        if rows:
            index = self._tensor(rows)
            slots = self._tensor([states[i].bias_slot for i in rows])
            logits[index, :vocab] += self._bias[slots, :vocab]
        worded = [i for i, s in enumerate(states) if s is not None and s.history_slot is not None]
        if worded:
            width = self._history.shape[1]
            prefixes = torch.cat([self._widen(states[i].prefixes, width) for i in worded])
            counts = [states[i].prefixes.shape[0] for i in worded]
            word_rows = self._tensor([i for i, n in zip(worded, counts) for _ in range(n)])
            word_slots = self._tensor([states[i].history_slot for i, n in zip(worded, counts)
                                       for _ in range(n)])
            last = torch.cat([states[i].last for i in worded])
            seen = self._history[word_slots]  # [words, width]
            match = ((seen == prefixes) | (prefixes == _ANY)).all(dim=-1)
            ban = torch.zeros_like(match, dtype=logits.dtype).masked_fill_(match, float("-inf"))
            logits.index_put_((word_rows, last), ban, accumulate=True)  # no host sync
        return bool(rows or worded)

    def record(self, tokens: torch.Tensor, states: list[ConstraintState | None],
               active: list[bool] | None) -> None:
        """Shift each worded request's sampled token into its history (rows that count only)."""
        rows = [i for i, s in enumerate(states) if s is not None and s.history_slot is not None
                and (active is None or active[i])]
        if not rows:
            return
        slots = self._tensor([states[i].history_slot for i in rows])
        shifted = torch.cat([self._history[slots, 1:], tokens[self._tensor(rows)][:, None]], dim=1)
        self._history[slots] = shifted

    # ------------------------------------------------------------------ tables
    def _bias_row(self, params, banned: list[int]) -> int:
        if not self._free_bias:
            old = self._bias.shape[0]
            new = max(8, 2 * old)
            self._bias = torch.cat([self._bias, self._bias.new_zeros(new - old, self.vocab_size)])
            self._free_bias.extend(range(new - 1, old - 1, -1))
        slot = self._free_bias.pop()
        row = torch.zeros(self.vocab_size, dtype=torch.float32)
        if params.allowed_token_ids:
            row.fill_(float("-inf"))
            row[torch.tensor(params.allowed_token_ids, dtype=torch.long)] = 0.0
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            row[ids] += torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        if banned:
            row[torch.tensor(banned, dtype=torch.long)] = float("-inf")
        self._bias[slot] = row.to(self.device)
        return slot

    def _history_row(self, width: int) -> int:
        if width > self._history.shape[1]:  # older rows keep their latest tokens, at the right
            grow = width - self._history.shape[1]
            self._history = torch.nn.functional.pad(self._history, (grow, 0), value=_NONE)
        if not self._free_history:
            old = self._history.shape[0]
            new = max(8, 2 * old)
            more = self._history.new_full((new - old, self._history.shape[1]), _NONE)
            self._history = torch.cat([self._history, more])
            self._free_history.extend(range(new - 1, old - 1, -1))
        slot = self._free_history.pop()
        self._history[slot] = _NONE
        return slot

    @staticmethod
    def _widen(prefixes: torch.Tensor, width: int) -> torch.Tensor:
        grow = width - prefixes.shape[1]
        return torch.nn.functional.pad(prefixes, (grow, 0), value=_ANY) if grow > 0 else prefixes

    def _tensor(self, values: list) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)
