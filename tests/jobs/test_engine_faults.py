"""Requests the real engine cannot serve become error rows; the other rows are unaffected.

A tiny model whose embedding row for one token ('Z') is NaN makes exactly the prompts that
contain that token produce non-finite logits; a 4-block KV cache (64 tokens) cannot hold a
100-token prompt; token id 99999 is outside the 274-token vocabulary. The clean model's run over
the same input is the reference for every other row.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from batchllm.jobs import run_job
from tests.jobs.helpers import committed, job, write_jsonl


@pytest.fixture(scope="module")
def nan_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from transformers import AutoTokenizer

    (z,) = AutoTokenizer.from_pretrained(tiny_model_dir).encode("Z", add_special_tokens=False)
    folder = tmp_path_factory.mktemp("nan-model")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][z] = float("nan")
    save_file(weights, folder / "model.safetensors")
    return folder, z


def test_nan_logits_bad_token_ids_and_a_prompt_too_long_for_the_cache_are_error_rows(
        tmp_path: Path, tiny_model_dir: Path, nan_model: tuple[Path, int]) -> None:
    model, z = nan_model
    rows = [[1, 70, 71, 72], [1, 70, z, 72], [1, 99999], list(range(10, 110)), [1, 80, 81],
            [1, 90, 91, 92, 93]]
    src = write_jsonl(tmp_path / "in.jsonl", [{"ids": r} for r in rows])

    def run(model_dir: Path, out: str):
        spec = job(src, tmp_path / out, model=str(model_dir), input={"token_ids_column": "ids"},
                   engine={"device": "cpu", "max_num_seqs": 2, "num_gpu_blocks_override": 4},
                   sampling={"max_tokens": 4})
        r = run_job(spec)
        return r, committed(tmp_path / out)

    r, t = run(model, "nan")
    _, clean = run(tiny_model_dir, "clean")
    errors = t["error"].to_pylist()
    assert r.rows == 6 and r.errors == 3
    assert "NaN or infinite logits" in errors[1]
    assert "99999 is outside the vocabulary" in errors[2]
    assert "KV cache holds only 64" in errors[3]
    assert t["finish_reason"].to_pylist()[1:4] == ["error"] * 3
    assert clean["error"][1].as_py() is None  # the clean model serves the 'Z' row
    for i in (0, 4, 5):  # rows without the poisoned token are exactly the clean model's
        assert errors[i] is None
        assert t["token_ids"][i].as_py() == clean["token_ids"][i].as_py()
        assert len(t["token_ids"][i].as_py()) == 4


class _Boom:
    """Unpickling this runs a shell command: what a hostile .bin checkpoint can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_refused_and_never_executed_even_when_allowed(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    import pickle

    from batchllm.jobs.errors import JobModelError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Boom(marker)}, f)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    spec = job(src, tmp_path / "out", model=str(model), engine={"device": "cpu"})
    with pytest.raises(JobModelError, match="allow_pickle"):
        run_job(spec)
    spec["engine"]["allow_pickle"] = True
    spec["output"]["path"] = str(tmp_path / "out2")
    with pytest.raises(JobModelError, match="weights_only"):
        run_job(spec)
    assert not marker.exists()
