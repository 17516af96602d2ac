"""input.chat_template: prompt columns go through the model's chat template (one user message) by
default when the tokenizer has one; a job whose answers are mostly empty says so."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchllm.core.outputs import CompletionOutput, RequestOutput
from batchllm.jobs import run_job, validate_job
from batchllm.jobs.errors import JobSpecError
from batchllm.sampling_params import SamplingParams
from batchllm.tokenizer import Tokenizer
from tests.jobs.fake_engine import FakeEngine, FakeTokenizer, expected_text
from tests.jobs.helpers import committed, job, write_jsonl

PROMPTS = ["What is the capital of France?", "Name a colour.", "Say hi."]


def _engine_with(tokenizer) -> FakeEngine:
    engine = FakeEngine(max_model_len=256)
    engine.tokenizer = tokenizer
    return engine


def _texts(tmp_path: Path, name: str, engine: FakeEngine, **input_keys) -> list[str]:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS])
    run_job(job(src, tmp_path / name, input=input_keys), engine=engine)
    return committed(tmp_path / name)["text"].to_pylist()


def test_a_prompt_column_goes_through_the_chat_template_when_the_model_has_one(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    tok = Tokenizer.load(tiny_model_dir)  # the tiny model's tokenizer has CHAT_TEMPLATE
    assert tok.has_chat_template
    base = SamplingParams(max_tokens=3, temperature=0.0)

    def chat(p: str, system: str | None = None) -> str:
        return expected_text(tok.apply_chat_template([{"role": "user", "content": p}],
                                                     system_prompt=system), base)

    auto = _texts(tmp_path, "auto", _engine_with(tok))  # no key: auto
    assert auto == [chat(p) for p in PROMPTS]
    assert _texts(tmp_path, "true", _engine_with(tok), chat_template=True) == auto
    plain = _texts(tmp_path, "false", _engine_with(tok), chat_template=False)
    assert plain == [expected_text(tok.encode(p), base) for p in PROMPTS] != auto
    system = _texts(tmp_path, "system", _engine_with(tok), system_prompt="Be brief.")
    assert system == [chat(p, "Be brief.") for p in PROMPTS]


class _NoTemplate(FakeTokenizer):
    has_chat_template = False


def test_auto_sends_plain_prompts_when_there_is_no_template_and_true_refuses_to_start(
        tmp_path: Path) -> None:
    base = SamplingParams(max_tokens=3, temperature=0.0)
    tok = _NoTemplate()
    assert _texts(tmp_path, "auto", _engine_with(tok)) == [
        expected_text(tok.encode(p), base) for p in PROMPTS]
    for key, value in (("chat_template", True), ("system_prompt", "S")):
        with pytest.raises(JobSpecError, match=r"has no chat template.*input\.chat_template: false"):
            _texts(tmp_path, f"refused-{key}", _engine_with(tok), **{key: value})
        assert not list((tmp_path / f"refused-{key}" / "chunks").glob("*.arrow"))


def test_chat_template_values_and_a_system_prompt_without_the_template(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    with pytest.raises(JobSpecError, match=r"input\.chat_template='yes' is invalid: expected "
                                           r"auto \| true \| false"):
        validate_job(job(src, tmp_path / "o", input={"chat_template": "yes"}))
    with pytest.raises(JobSpecError, match="input.system_prompt goes into the chat template"):
        validate_job(job(src, tmp_path / "o", input={"chat_template": False,
                                                     "system_prompt": "S"}))


class _EosFirst(FakeEngine):
    """Answers every prompt whose text ends in '?' with end-of-sequence at once (one token)."""

    def step(self) -> list[RequestOutput]:
        outs = super().step()
        for out in outs:
            if out.prompt_token_ids[-1] == FakeTokenizer().encode("?")[-1]:
                out.outputs = [CompletionOutput(0, "", [2], finish_reason="stop")]
        return outs


@pytest.mark.parametrize("empty, warned", [(3, True), (2, True), (1, False), (0, False)])
def test_most_rows_ending_at_their_first_token_is_a_notice(tmp_path: Path, empty: int,
                                                           warned: bool) -> None:
    prompts = [f"q{i}?" for i in range(empty)] + [f"s{i}." for i in range(3 - empty)]
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts])
    heard: list[str] = []
    r = run_job(job(src, tmp_path / "out"), engine=_EosFirst(), on_notice=heard.append)
    assert r.summary["ended_at_first_token"] == empty
    notes = [n for n in r.summary.get("notices", []) if "ended at their first token" in n]
    assert bool(notes) == warned and bool([n for n in heard if n in notes]) == warned
    if warned:
        assert f"{empty} of 3 rows" in notes[0] and "input.chat_template" in notes[0]
        on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert on_disk["notices"] == r.summary["notices"]


@pytest.mark.slow
def test_the_default_model_answers_plain_prompts(tmp_path: Path, smollm2_dir: Path) -> None:
    """The default (instruct) model given a prompt column and no system prompt: through its chat
    template (auto) the answers are not empty; without it (what a prompt column got before
    input.chat_template) half of these rows end at their first token."""
    prompts = ["What is the capital of France?", "Name three fruits.", "What is 2 + 2?",
               "Write one sentence about the sea.", "Who wrote Hamlet?", "What colour is grass?"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts])

    def run(name: str, **input_keys):
        return run_job(job(src, tmp_path / name, model=str(smollm2_dir), input=input_keys,
                           sampling={"max_tokens": 16, "temperature": 0.0},
                           engine={"device": "cpu", "dtype": "float32"}))

    r = run("auto")
    t = committed(tmp_path / "auto")
    assert all(text.strip() for text in t["text"].to_pylist()), t["text"].to_pylist()
    assert "Paris" in t["text"][0].as_py()
    assert r.summary["ended_at_first_token"] == 0 and "notices" not in r.summary
    raw = run("raw", chat_template=False)
    assert raw.summary["ended_at_first_token"] >= 2
    assert "" in committed(tmp_path / "raw")["text"].to_pylist()
