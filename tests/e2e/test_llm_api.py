"""LLM's vLLM-style calls: generate's progress bar (on by default), chat's template options."""
from __future__ import annotations

import inspect

import pytest

from batchllm import LLM, SamplingParams
from batchllm.tokenizer import TokenizerError
from tests.e2e.test_generate import VOCAB, make_prompts


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", device="cpu", max_num_seqs=2)


class RecordingBar:
    """A tqdm-like class that records what generate tells it."""

    made: list["RecordingBar"] = []

    def __init__(self, total: int, **kw) -> None:
        self.total, self.kw, self.n, self.postfix, self.closed = total, kw, 0, None, False
        RecordingBar.made.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        self.closed = True


def test_generate_shows_a_progress_bar_by_default(llm, capsys):
    assert inspect.signature(LLM.generate).parameters["use_tqdm"].default is True
    prompts = make_prompts(VOCAB, [5, 7, 9, 4, 6], seed=50)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "5/5" in err and "output:" in err
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_the_bar_advances_as_requests_finish(llm):
    RecordingBar.made.clear()
    prompts = make_prompts(VOCAB, [5, 7, 9, 4], seed=51)
    seen = []
    real_step = llm.engine.step

    def step():  # the bar's count each time requests come back: it moves with them
        outs = real_step()
        if outs:
            seen.append(RecordingBar.made[-1].n)
        return outs

    llm.engine.step = step
    try:
        llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                               for n in (1, 4, 8, 12)], use_tqdm=RecordingBar)
    finally:
        del llm.engine.step
    bar = RecordingBar.made[-1]
    assert bar.total == 4 and bar.n == 4 and bar.closed
    assert len(set(seen)) > 1  # requests finished at different steps, the bar moved in between
    assert "output:" in bar.postfix and "toks/s" in bar.postfix


def test_chat_takes_a_template_and_continues_the_final_message(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}]
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if not "
                "(continue_final_message and loop.last) %}{{ '\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    out = llm.chat(conv[:1], sp, chat_template=template, use_tqdm=False)[0]
    assert out.prompt_token_ids == tok.encode("[user] Hi\n[assistant] ", add_special_tokens=False)
    cont = llm.chat(conv, sp, chat_template=template, add_generation_prompt=False,
                    continue_final_message=True, use_tqdm=False)[0]
    assert cont.prompt_token_ids == tok.encode("[user] Hi\n[assistant] Once upon",
                                               add_special_tokens=False)
    # with the model's own template the final message stays open: no end-of-turn after it
    own = llm.chat(conv, sp, add_generation_prompt=False, continue_final_message=True,
                   use_tqdm=False)[0]
    text = tok.decode(own.prompt_token_ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\nOnce upon")
    with pytest.raises(TokenizerError, match="add_generation_prompt=False"):
        llm.chat(conv, sp, continue_final_message=True)


def test_chat_template_from_a_file(llm, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2),
                   chat_template=str(path), use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("<Hi>", add_special_tokens=False)
