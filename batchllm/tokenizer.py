"""The only place that touches the HF tokenizer: encode, chat template, decode, incremental detokenization, stop strings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from batchllm.core.stop import find_stop_string  # noqa: F401  (re-exported: stop strings live with the stop rules)

# Tokens of context kept before the unread ones when decoding incrementally: enough for a
# tokenizer to decide on a leading space or to complete a multi-byte character.
_CONTEXT_TOKENS = 6


class TokenizerError(ValueError):
    """The tokenizer cannot do what was asked (no chat template, unreadable folder…)."""


class Tokenizer:
    """A thin wrapper over a Hugging Face tokenizer with the few calls batchllm needs."""

    def __init__(self, hf_tokenizer: Any, source: str = "<in memory>"):
        self.hf = hf_tokenizer
        self.source = source

    @classmethod
    def load(cls, path_or_gguf: str | Path, trust_remote_code: bool = False) -> "Tokenizer":
        """Load from a model folder, or from the tokenizer embedded in a .gguf file."""
        from transformers import AutoTokenizer

        path = Path(path_or_gguf)
        try:
            if path.suffix == ".gguf":
                hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            else:
                hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot load a tokenizer from {path}: {exc}") from exc
        return cls(hf, str(path))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    system_prompt: str | None = None) -> str:
        """The chat template applied to `messages`, as text."""
        if not self.has_chat_template:
            raise TokenizerError(
                f"the tokenizer of {self.source} has no chat template, so chat messages cannot be "
                f"formatted; send plain prompts instead, or use a model/tokenizer that has one")
        messages = list(messages)
        if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": system_prompt})
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            system_prompt: str | None = None) -> list[int]:
        """Token ids of the chat-formatted conversation (the template adds any BOS itself)."""
        text = self.render_chat(messages, add_generation_prompt, system_prompt)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns output tokens into text deltas as they arrive.

    Each call decodes only a short window: a few context tokens before the unread ones. Text is
    held back while the window ends in an incomplete UTF-8 character (decoded as U+FFFD), so a
    character split across tokens is emitted whole once its last byte arrives.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        tail = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._ids = tail  # context tail of the prompt, then every output token
        self._num_context = len(tail)
        self._prefix_offset = 0  # window start (context for spacing / merging)
        self._read_offset = len(tail)  # tokens before this are already emitted as text
        self.output_ids: list[int] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_ids: list[int]) -> str:
        """Add output tokens; return the text they complete (may be "" while a character is split)."""
        self._ids.extend(token_ids)
        self.output_ids.extend(token_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end), decoded as is."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        delta = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta
