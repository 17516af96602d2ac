"""LLM: the vLLM-style offline API over one LLMEngine (generate / chat / stats)."""
from __future__ import annotations

from collections.abc import Sequence

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
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
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
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id in order:
                    results[order[out.request_id]] = out
        return results  # type: ignore[return-value]

    def chat(self, messages, sampling_params=None, system_prompt: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the chat template to one conversation (a list of messages) or a list of them."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer; this engine was built with skip_tokenizer_init=True")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                           system_prompt=system_prompt) for c in convs]
        return self.generate(prompts, sampling_params)

    def stats(self) -> dict:
        return self.engine.stats()
