"""batchllm.loader: every weight format lands the checkpoint's tensors in our model, or fails clearly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchllm.config import ModelConfig
from batchllm.loader import ModelLoadError, load_model, resolve_dtype

CPU = torch.device("cpu")


def _load(path: Path, **kw) -> torch.nn.Module:
    model, _ = load_model(ModelConfig(model=str(path), **kw), CPU)
    return model


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def test_loaded_weights_are_the_checkpoint_tensors(tiny_model_dir):
    model = _load(tiny_model_dir)
    ckpt = load_file(tiny_model_dir / "model.safetensors")
    params = dict(model.named_parameters())
    # spot-check a plain tensor and a fused one (v_proj sits after q and k in qkv_proj)
    assert torch.equal(params["model.norm.weight"], ckpt["model.norm.weight"])
    qkv = params["model.layers.1.self_attn.qkv_proj.weight"]
    v = ckpt["model.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(qkv[-v.shape[0]:], v)
    assert next(model.parameters()).dtype == torch.float32  # auto on CPU


def test_sharded_safetensors_load_the_same_weights(tiny_model_dir, tmp_path):
    sharded = _copy_without_weights(tiny_model_dir, tmp_path / "sharded")
    tensors = load_file(tiny_model_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / fname)
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = _params(_load(tiny_model_dir)), _params(_load(sharded))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dropped, named", [
    ("model.norm.weight", "model.norm.weight"),
    ("model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.qkv_proj.weight (rows 96:128)"),
])
def test_missing_weights_are_named(tiny_model_dir, tmp_path, dropped, named):
    broken = _copy_without_weights(tiny_model_dir, tmp_path / "broken")
    tensors = load_file(tiny_model_dir / "model.safetensors")
    del tensors[dropped]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ModelLoadError) as err:
        _load(broken)
    assert named in str(err.value)


def test_tied_embeddings_need_no_lm_head(tiny_model_factory):
    folder = tiny_model_factory("qwen3", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    model = _load(folder)
    hidden = torch.randn(3, 64)
    expected = hidden @ load_file(folder / "model.safetensors")["model.embed_tokens.weight"].T
    torch.testing.assert_close(model.compute_logits(hidden), expected)


def test_pickled_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path):
    pickled = _copy_without_weights(tiny_model_dir, tmp_path / "pickled")
    torch.save(load_file(tiny_model_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle") as err:
        _load(pickled)
    assert "pytorch_model.bin" in str(err.value)
    a, b = _params(_load(tiny_model_dir)), _params(_load(pickled, allow_pickle=True))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_folder_without_weights_says_what_it_expected(tiny_model_dir, tmp_path):
    empty = _copy_without_weights(tiny_model_dir, tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        _load(empty)


def test_dummy_weights_need_only_the_config_and_are_seeded(tiny_model_dir, tmp_path):
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(tiny_model_dir / "config.json", only_config / "config.json")
    a = _params(_load(only_config, load_format="dummy", seed=1))
    b = _params(_load(only_config, load_format="dummy", seed=1))
    c = _params(_load(only_config, load_format="dummy", seed=2))
    key = "model.layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert 0.01 < a[key].std().item() < 0.03
    assert torch.equal(a["model.norm.weight"], torch.ones(64))
    assert all(torch.isfinite(p).all() for p in a.values())


def test_explicit_dtype_is_used(tiny_model_dir):
    model = _load(tiny_model_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_auto_dtype_follows_the_checkpoint_on_gpu_and_is_float32_on_cpu():
    from transformers import LlamaConfig

    cfg = LlamaConfig(dtype="bfloat16")
    assert resolve_dtype("auto", cfg, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", cfg, CPU) == torch.float32
    assert resolve_dtype("float16", cfg, CPU) == torch.float16


def test_a_tensor_of_the_wrong_shape_names_the_checkpoint(tiny_model_dir, tmp_path):
    broken = _copy_without_weights(tiny_model_dir, tmp_path / "wrong-shape")
    tensors = load_file(tiny_model_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ModelLoadError) as err:
        _load(broken)
    assert "model.norm.weight" in str(err.value) and "model.safetensors" in str(err.value)
