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

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's token sequences for SamplingParams.bad_words: each word as it would start the
        text, and (when that gives other tokens of the same count) after a space, so the word is
        banned both at the start and in the middle of the text."""
        out: list[list[int]] = []
        for word in words:
            alone = self.encode(word.lstrip(), add_special_tokens=False)
            if not alone:
                raise TokenizerError(f"bad_words: {word!r} gives no tokens")
            out.append(alone)
            spaced = self.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
                out.append(spaced)
        return out

    def decode_tokens(self, ids: list[int]) -> list[str]:
        """Each id decoded alone, special tokens included (vLLM's Logprob.decoded_token). A
        SentencePiece piece's leading "▁" stays a space, which decoding one token drops."""
        ids = [int(t) for t in ids]
        texts = self.hf.batch_decode([[t] for t in ids], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        pieces = self.hf.convert_ids_to_tokens(ids)
        out = []
        for text, piece in zip(texts, pieces):
            text = text or ""
            if isinstance(piece, str) and piece.startswith("\u2581"):
                spaces = len(piece) - len(piece.lstrip("\u2581"))
                missing = spaces - (len(text) - len(text.lstrip(" ")))
                text = " " * max(0, missing) + text
            out.append(text)
        return out

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    system_prompt: str | None = None, *, chat_template: str | None = None,
                    continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """The chat template (the tokenizer's, or `chat_template`: Jinja text) applied to
        `messages`, as text. continue_final_message: leave the last message open for the model
        to continue (no end-of-turn after it; it cannot go with add_generation_prompt)."""
        if chat_template is None and not self.has_chat_template:
            raise TokenizerError(
                f"the tokenizer of {self.source} has no chat template, so chat messages cannot be "
                f"formatted; send plain prompts instead, pass chat_template=..., or use a "
                f"model/tokenizer that has one")
        if continue_final_message and add_generation_prompt:
            raise TokenizerError("continue_final_message=True continues the last message, "
                                 "add_generation_prompt=True starts a new one: set "
                                 "add_generation_prompt=False to continue the final message")
        messages = list(messages)
        if continue_final_message and not messages:
            raise TokenizerError("continue_final_message=True needs at least one message")
        if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": system_prompt})
        extra = dict(chat_template_kwargs or {})
        if continue_final_message:
            extra["continue_final_message"] = True
        try:
            return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               tokenize=False, chat_template=chat_template,
                                               tools=tools, **extra)
        except Exception as exc:  # the template's own errors (jinja2), or a final message it
            # does not print as given (ValueError)
            if not isinstance(exc, (ValueError, TypeError)) and \
                    type(exc).__module__.split(".")[0] != "jinja2":
                raise
            raise TokenizerError(f"the chat template could not format these messages: {exc}") from exc

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            system_prompt: str | None = None, **options: Any) -> list[int]:
        """Token ids of the chat-formatted conversation (the template adds any BOS itself);
        `options`: render_chat's keywords."""
        text = self.render_chat(messages, add_generation_prompt, system_prompt, **options)
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
