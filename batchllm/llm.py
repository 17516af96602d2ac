"""LLM: the vLLM-style offline API over one LLMEngine (generate / chat / stats)."""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Callable

from batchllm.config import build_engine_config
from batchllm.core.outputs import RequestOutput
from batchllm.engine import LLMEngine
from batchllm.sampling_params import SamplingParams


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    out = []
    for p in prompts:
        if isinstance(p, dict):
            p = p.get("prompt_token_ids", p.get("prompt"))
        out.append(p)
    return out


class LLM:
    """vLLM-style offline API: `LLM(model, ...).generate(prompts, sampling_params)`.

    With tensor_parallel_size=N the engine starts N - 1 more processes (spawned: call it under
    `if __name__ == "__main__":` in a script) and holds this process's torch.distributed group
    until `shutdown()`; one such engine per process at a time."""

    def __init__(self, model: str, tokenizer: str | None = None, skip_tokenizer_init: bool = False,
                 **kwargs: object):
        config = build_engine_config(str(model), tokenizer=tokenizer, **kwargs)
        self.engine = LLMEngine(config, skip_tokenizer_init=skip_tokenizer_init)
        self._counter = 0

    def shutdown(self) -> None:
        """Stop the engine's other tensor-parallel ranks (with tensor_parallel_size > 1); an
        engine of one rank has nothing to stop. Also done when the LLM is garbage collected."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | Callable[..., Any] = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order. use_tqdm: a
        progress bar on stderr that advances as requests finish, with input and output tok/s
        (or a tqdm-like class to build it with; False: none)."""
        items = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"got {len(params)} sampling_params for {len(items)} prompts; "
                                 "pass one, or one per prompt")
        order: dict[str, int] = {}
        for i, (p, sp) in enumerate(zip(items, params)):
            rid = str(self._counter)
            self._counter += 1
            order[rid] = i
            self.engine.add_request(rid, p, sp)
        results: list[RequestOutput | None] = [None] * len(items)
        bar = _ProgressBar(len(items), use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.finished(out)
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def chat(self, messages, sampling_params=None, use_tqdm: bool | Callable[..., Any] = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             system_prompt: str | None = None) -> list[RequestOutput]:
        """Generate for one conversation (a list of {role, content} messages) or a list of them,
        formatted by the chat template (vLLM's arguments): `chat_template` replaces the
        tokenizer's (Jinja text, or a path to a file holding it); add_generation_prompt opens the
        assistant's turn; continue_final_message instead leaves the last message open, for the
        model to continue (set add_generation_prompt=False with it); `tools` and
        `chat_template_kwargs` go to the template. system_prompt (batchllm's): a system message
        put first where a conversation has none."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this engine was built with skip_tokenizer_init=True")
        if chat_template is not None and "{" not in chat_template and os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                           system_prompt=system_prompt, chat_template=chat_template,
                                           continue_final_message=continue_final_message,
                                           tools=tools, chat_template_kwargs=chat_template_kwargs)
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stats(self) -> dict:
        return self.engine.stats()


class _ProgressBar:
    """generate's progress: a tqdm bar of finished requests with input and output tok/s."""

    def __init__(self, total: int, use_tqdm: bool | Callable[..., Any]) -> None:
        self.bar = None
        self.tokens_in = self.tokens_out = 0
        self.start = time.perf_counter()
        if not use_tqdm or total == 0:
            return
        if callable(use_tqdm):
            make = use_tqdm
        else:
            from tqdm.auto import tqdm as make
        self.bar = make(total=total, desc="Processed prompts", dynamic_ncols=True,
                        postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")

    def finished(self, out: RequestOutput) -> None:
        if self.bar is None:
            return
        self.tokens_in += len(out.prompt_token_ids) * max(1, len(out.outputs))
        self.tokens_out += sum(len(c.token_ids) for c in out.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        text = (f"est. speed input: {self.tokens_in / elapsed:.2f} toks/s, "
                f"output: {self.tokens_out / elapsed:.2f} toks/s")
        if hasattr(self.bar, "set_postfix_str"):
            self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
