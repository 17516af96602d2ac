"""batchllm.hub: paths pass through, short names resolve to the cached default model, fetches are atomic."""
from __future__ import annotations

import shutil
import time

import pytest
import torch

from batchllm import hub


def test_existing_path_passes_through(tiny_model_dir):
    assert hub.resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_unknown_name_names_the_value_and_lists_short_names():
    with pytest.raises(hub.ModelNotFoundError) as err:
        hub.resolve_model("no-such-model-xyz")
    assert "no-such-model-xyz" in str(err.value)
    assert "smollm2-135m" in str(err.value)


@pytest.mark.parametrize("name", ["smollm2-135m", "SmolLM2-135M-Instruct", "SMOLLM2-135M"])
def test_short_names_are_case_insensitive_and_use_the_cache(name, tmp_path, monkeypatch, tiny_model_dir):
    cached = tmp_path / "models" / "smollm2-135m-instruct"
    shutil.copytree(tiny_model_dir, cached)
    monkeypatch.setenv("BATCHLLM_CACHE", str(tmp_path))

    def no_fetch(*args, **kwargs):
        raise AssertionError("a cached model must not be fetched again")

    monkeypatch.setattr(hub, "fetch_and_convert", no_fetch)
    assert hub.resolve_model(name) == cached


def test_offline_forbids_the_fetch_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHLLM_CACHE", str(tmp_path))
    monkeypatch.setenv("BATCHLLM_OFFLINE", "1")
    with pytest.raises(hub.ModelFetchError, match="BATCHLLM_OFFLINE"):
        hub.resolve_model("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_a_failed_fetch_leaves_no_folder_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHLLM_CACHE", str(tmp_path))
    monkeypatch.delenv("BATCHLLM_OFFLINE", raising=False)

    def half_written(gguf, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise hub.ModelFetchError("conversion crashed midway")

    monkeypatch.setattr(hub, "_download_gguf", lambda known, dest: dest / "x.gguf")
    monkeypatch.setattr(hub, "convert_gguf_to_folder", half_written)
    with pytest.raises(hub.ModelFetchError, match="crashed"):
        hub.resolve_model("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []  # neither the target nor a partial folder


@pytest.mark.slow
def test_default_model_answers_the_capital_of_france(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    assert hub.resolve_model("smollm2-135m") == smollm2_dir  # cached: no second fetch
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert time.perf_counter() - start < 30
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."
