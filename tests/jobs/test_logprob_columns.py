"""A job's logprob columns from the real engine (tiny model, CPU): token_logprobs per output token
and top_logprobs with each alternative's id, its text (the token decoded alone) and log p."""
from __future__ import annotations

from pathlib import Path

import pytest

from batchllm.jobs import run_job
from batchllm.tokenizer import Tokenizer
from tests.jobs.helpers import committed, job, write_jsonl


def test_top_logprobs_carry_decoded_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "the cat sat"}, {"prompt": "on a mat"}])
    run_job(job(src, tmp_path / "out", model=str(tiny_model_dir),
                sampling={"logprobs": 3, "max_tokens": 4, "ignore_eos": True},
                engine={"device": "cpu", "dtype": "float32"}))
    t = committed(tmp_path / "out")
    tok = Tokenizer.load(tiny_model_dir)
    for row in t.to_pylist():
        assert len(row["token_logprobs"]) == len(row["token_ids"]) == 4
        for token, lp, top in zip(row["token_ids"], row["token_logprobs"], row["top_logprobs"]):
            assert len(top) == 3
            assert [x["token"] for x in top] == [tok.decode([x["token_id"]], skip_special_tokens=False)
                                                 for x in top]
            values = [x["logprob"] for x in top]
            assert values == sorted(values, reverse=True)
            assert top[0]["token_id"] == token  # greedy: the sampled token is the most likely
            assert top[0]["logprob"] == pytest.approx(lp, abs=1e-5)
