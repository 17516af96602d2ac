"""Which implementation a model gets (model_impl auto | native | transformers), said in the log;
what the transformers fallback refuses, naming the architecture and the reason, both when the
model loads and in a job's pre-flight (exit 2, before any model work); a job end to end on it."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from batchllm import LLM
from batchllm.config import ConfigError, ModelConfig
from batchllm.jobs import run_job, validate_job
from batchllm.jobs.errors import JobModelError
from batchllm.loader import load_model
from batchllm.models import registry
from batchllm.models.registry import UnsupportedModelError
from tests.cli.helpers import write_job
from tests.e2e.test_generate import GREEDY, VOCAB, make_prompts
from tests.jobs.helpers import committed, job, write_jsonl

CPU = torch.device("cpu")


def _bert_folder(path: Path, **overrides) -> Path:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               vocab_size=300, **overrides).save_pretrained(path)
    return path


def test_auto_logs_which_implementation_it_picked(tiny_model_factory, caplog):
    with caplog.at_level(logging.INFO, logger="batchllm.models.registry"):
        load_model(ModelConfig(model=str(tiny_model_factory("llama")), load_format="dummy"), CPU)
        load_model(ModelConfig(model=str(tiny_model_factory("phi3")), load_format="dummy"), CPU)
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("LlamaForCausalLM: native implementation (model_impl=auto)") for m in lines)
    assert any(m.startswith("Phi3ForCausalLM: running through transformers' modeling code")
               and "no native implementation" in m for m in lines)


def test_model_impl_native_refuses_an_architecture_without_one(tiny_model_factory):
    with pytest.raises(UnsupportedModelError, match=r"model_impl=native but Phi3ForCausalLM has "
                                                    r"no native implementation") as err:
        LLM(str(tiny_model_factory("phi3")), device="cpu", model_impl="native")
    assert isinstance(err.value, ConfigError)  # a setting the user chose
    with pytest.raises(ConfigError, match=r"model_impl='hf' is invalid: expected auto \| native "
                                          r"\| transformers"):
        ModelConfig(model="x", model_impl="hf")


@pytest.mark.parametrize("overrides, words", [
    (dict(architectures=["BertForMaskedLM"]), r"BertForMaskedLM cannot run through the transformers fallback: the checkpoint is a "
     r"BertForMaskedLM, not a causal language model .*encoder-only model cannot generate"),
    # transformers' causal-LM class of an encoder, built as an encoder: bidirectional attention
    (dict(architectures=["BertLMHeadModel"]), r"BertSelfAttention is not causal"),
])
def test_an_encoder_is_refused_with_its_reason(tmp_path, overrides, words):
    folder = _bert_folder(tmp_path / "bert", **overrides)
    with pytest.raises(UnsupportedModelError, match=words):
        load_model(ModelConfig(model=str(folder), load_format="dummy"), CPU)


def test_what_the_paged_kernels_cannot_do_is_refused_before_loading(tiny_model_factory):
    from tests.tiny_models import tiny_config

    capped = tiny_config("gemma2", attn_logit_softcapping=50.0)
    with pytest.raises(UnsupportedModelError, match=r"Gemma2ForCausalLM cannot run "
                                                    r"through the transformers fallback: "
                                                    r"attn_logit_softcapping=50.0"):
        registry.check_runnable(capped)
    t5 = __import__("transformers").T5Config(architectures=["T5ForConditionalGeneration"])
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        registry.check_runnable(t5)
    hybrid = tiny_config("gemma2", layer_types=("sliding_attention", "linear_attention"))
    with pytest.raises(UnsupportedModelError, match="layer_types include linear_attention"):
        registry.check_runnable(hybrid)
    with pytest.raises(UnsupportedModelError, match=r"tensor_parallel_size=2: Phi3ForCausalLM "
                                                    r"runs through the transformers fallback"):
        registry.check_runnable(tiny_config("phi3"), "auto", tensor_parallel_size=2)
    assert registry.check_runnable(tiny_config("llama"), "auto", tensor_parallel_size=2) == "native"


def test_registry_lists_native_and_fallback_architectures():
    native, fallback = registry.supported_architectures(), registry.fallback_architectures()
    assert {"LlamaForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM"} <= set(native)
    assert {"Phi3ForCausalLM", "Olmo2ForCausalLM", "GraniteForCausalLM",
            "Gemma2ForCausalLM"} == set(fallback)
    assert not set(native) & set(fallback)


@pytest.mark.parametrize("case", ["encoder", "native only", "softcapped"])
def test_a_job_on_a_model_that_cannot_run_fails_in_preflight(tmp_path, tiny_model_factory, case):
    import shutil

    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    engine = {"device": "cpu"}
    if case == "encoder":
        model, words = _bert_folder(tmp_path / "bert", architectures=["BertForMaskedLM"]), "encoder-only"
    elif case == "native only":
        model, words = tiny_model_factory("granite"), "model_impl=native but GraniteForCausalLM"
        engine["model_impl"] = "native"
    else:  # a Gemma 2 config.json without the key: the class default (50.0) applies
        model, words = tmp_path / "gemma2", "attn_logit_softcapping=50.0"
        shutil.copytree(tiny_model_factory("gemma2"), model)
        text = (model / "config.json").read_text()
        (model / "config.json").write_text(text.replace('"attn_logit_softcapping": null,', ""))
    with pytest.raises(JobModelError, match=words) as info:
        validate_job(job(src, tmp_path / "out", model=str(model), engine=engine))
    assert info.value.exit_code == 2 and str(model) in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before the output folder was taken


def test_a_job_runs_end_to_end_on_the_fallback(tmp_path, tiny_model_factory):
    folder = tiny_model_factory("phi3")
    # raw prompts, as LLM.generate below takes them (jobs apply the chat template by default)
    result = run_job(write_job(tmp_path, folder, rows=6, max_tokens=5), finalize_outputs=True,
                     **{"input.chat_template": False})
    assert result.summary["rows"] == 7 and result.summary["errors"] == 1  # one malformed line
    rows = committed(tmp_path / "out").to_pylist()
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 6 and all(r["num_output_tokens"] == 5 for r in good)
    # the same prompts through LLM on the fallback give the same tokens
    llm = LLM(str(folder), dtype="auto", device="cpu")
    tok = llm.get_tokenizer()
    prompts = [tok.encode(f"the cat {i} sat on the mat") for i in range(6)]
    outs = llm.generate(prompts, GREEDY.__class__(temperature=0.0, max_tokens=5))
    assert [r["token_ids"] for r in good] == [o.outputs[0].token_ids for o in outs]


def test_greedy_under_async_scheduling_and_decode_rounds(tiny_model_factory):
    """The engine's other modes (plans queued ahead, several decode steps a round) on the fallback."""
    folder = tiny_model_factory("gemma2")
    prompts = make_prompts(VOCAB, [5, 17, 33, 8], seed=6)
    plain = LLM(str(folder), dtype="float32", device="cpu").generate(prompts, GREEDY)
    fancy = LLM(str(folder), dtype="float32", device="cpu", async_scheduling=True,
                num_decode_steps=4).generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in fancy]
