"""FP8 checkpoints in the formats the HF hub uses, written here as tiny safetensors folders, load into FP8 layers as they are (or dequantized where batchllm keeps bf16); bad ones fail naming the key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchllm.config import ModelConfig
from batchllm.layers.quantization import fp8_layers
from batchllm.layers.quantization.fp8 import FP8, dequantize_weight, quantize_weight
from batchllm.loader import ModelLoadError, load_model
from benchmarks.fp8_accuracy import teacher_forced_logits

CPU = torch.device("cpu")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = [32, 32]
SEQS = [list(range(3, 40)), list(range(100, 117))]

CT_GROUP = {"input_activations": {"dynamic": True, "num_bits": 8, "strategy": "token",
                                  "symmetric": True, "type": "float"},
            "targets": ["Linear"],
            "weights": {"dynamic": False, "num_bits": 8, "observer": "minmax",
                        "strategy": "channel", "symmetric": True, "type": "float"}}
CONFIGS = {
    "ct-channel": {"quant_method": "compressed-tensors", "format": "float-quantized",
                   "config_groups": {"group_0": CT_GROUP}, "ignore": ["lm_head"],
                   "quantization_status": "compressed", "kv_cache_scheme": None},
    "ct-tensor-static": {"quant_method": "compressed-tensors", "format": "float-quantized",
                         "config_groups": {"group_0": {
                             **CT_GROUP, "input_activations": {**CT_GROUP["input_activations"],
                                                               "dynamic": False, "strategy": "tensor"},
                             "weights": {**CT_GROUP["weights"], "strategy": "tensor"}}},
                         "ignore": ["lm_head", "model.layers.1.self_attn.o_proj"]},
    "fbgemm": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
               "modules_to_not_convert": ["lm_head"]},
    "fp8-block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": BLOCK},
    "fp8-tensor": {"quant_method": "fp8", "activation_scheme": "static"},
}


def _quantize(w: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """One projection's checkpoint tensors (weight and scales) in format `kind`."""
    if kind in ("ct-channel", "fbgemm"):
        q, s = quantize_weight(w)
        return {"weight": q, "weight_scale": s.reshape(-1, 1)}
    if kind == "fp8-block":
        rows, cols = -(-w.shape[0] // BLOCK[0]), -(-w.shape[1] // BLOCK[1])
        blocks = w.reshape(rows, BLOCK[0], cols, BLOCK[1])
        s = blocks.abs().amax(dim=(1, 3)) / 448
        q = (blocks / s[:, None, :, None]).reshape(w.shape).to(FP8)
        return {"weight": q, "weight_scale_inv": s}
    s = w.abs().max() / 448  # per tensor, with a static activation scale the loader drops
    scale = s.reshape(1) if kind == "ct-tensor-static" else s.reshape(())
    act = "input_scale" if kind != "fp8-block" else "activation_scale"
    return {"weight": (w / s).to(FP8), "weight_scale": scale, act: torch.tensor([0.05])}


def write_fp8_checkpoint(src: Path, dst: Path, kind: str) -> Path:
    """An FP8 copy of the float checkpoint in `src`, in format `kind` (CONFIGS)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = CONFIGS[kind]
    (dst / "config.json").write_text(json.dumps(config))
    ignore = set(CONFIGS[kind].get("ignore", []))
    out = {}
    for name, tensor in load_file(src / "model.safetensors").items():
        module, _, leaf = name.rpartition(".")
        if module.rpartition(".")[2] in PROJ and leaf == "weight" and module not in ignore:
            out.update({f"{module}.{k}": v for k, v in _quantize(tensor, kind).items()})
        else:
            out[name] = tensor
    out["model.layers.0.self_attn.k_scale"] = torch.tensor(1.0)  # a KV-cache scale: dropped
    save_file(out, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("float"), "llama", seed=3)


def _load(path: Path, **kw):
    return load_model(ModelConfig(model=str(path), **kw), CPU)[0]


@pytest.mark.parametrize("kind", ["ct-channel", "fbgemm"])
def test_per_channel_checkpoints_equal_quantizing_the_float_model(float_dir, tmp_path, kind):
    """Per-row scales stored by the checkpoint are what `quantization: fp8` computes: same
    parameters, same logits."""
    fp8_dir = write_fp8_checkpoint(float_dir, tmp_path / kind, kind)
    stored, quantized = _load(fp8_dir), _load(float_dir, quantization="fp8")
    layers, want = fp8_layers(stored), fp8_layers(quantized)
    assert sorted(layers) == sorted(want) and len(layers) == 2 * 4  # qkv, o, gate_up, down
    for name, layer in layers.items():
        assert torch.equal(layer.weight.float(), want[name].weight.float()), name
        assert torch.equal(layer.weight_scale, want[name].weight_scale), name
    assert layers["model.layers.0.mlp.down_proj"].quant_method.amax_cap == (
        1200.0 if kind == "fbgemm" else None)
    torch.testing.assert_close(teacher_forced_logits(stored, SEQS, 8),
                               teacher_forced_logits(quantized, SEQS, 8), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ct-tensor-static", "fp8-tensor"])
def test_per_tensor_checkpoints_keep_each_parts_values_and_scale(float_dir, tmp_path, kind):
    fp8_dir = write_fp8_checkpoint(float_dir, tmp_path / kind, kind)
    ckpt = load_file(fp8_dir / "model.safetensors")
    model = _load(fp8_dir)
    qkv = fp8_layers(model)["model.layers.0.self_attn.qkv_proj"]
    parts = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(qkv.weight.float(), torch.cat([ckpt[f"{p}.weight"].float() for p in parts]))
    assert torch.equal(qkv.weight_scale, torch.cat([ckpt[f"{p}.weight_scale"].reshape(1).expand(
        ckpt[f"{p}.weight"].shape[0]) for p in parts]))
    if kind == "ct-tensor-static":  # the config's ignore list: stored in float, left so
        o_proj = model.get_submodule("model.layers.1.self_attn.o_proj")
        assert o_proj.quant_method is None and o_proj.weight.dtype == torch.float32
        assert torch.equal(o_proj.weight, ckpt["model.layers.1.self_attn.o_proj.weight"])
    _close_to_float_model(model, float_dir)


def test_block_scaled_checkpoints_are_requantized_per_row(float_dir, tmp_path):
    fp8_dir = write_fp8_checkpoint(float_dir, tmp_path / "block", "fp8-block")
    ckpt = load_file(fp8_dir / "model.safetensors")
    model = _load(fp8_dir)
    down = fp8_layers(model)["model.layers.1.mlp.down_proj"]
    w, s = ckpt["model.layers.1.mlp.down_proj.weight"], ckpt["model.layers.1.mlp.down_proj.weight_scale_inv"]
    stored = w.float() * s.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
    got = dequantize_weight(down.weight, down.weight_scale)
    # one more rounding to e4m3 (per row now): within 2^-4 relative, plus the subnormal floor
    assert ((got - stored).abs() <= stored.abs() / 16 + down.weight_scale[:, None] * 2 ** -9).all()
    _close_to_float_model(model, float_dir)


def _close_to_float_model(model, float_dir: Path) -> None:
    exact = teacher_forced_logits(_load(float_dir), SEQS, 8)
    got = teacher_forced_logits(model, SEQS, 8)
    assert (got - exact).abs().mean() < 0.2 * exact.abs().mean()


def test_lazy_slices_load_the_same_as_whole_tensors(float_dir, tmp_path):
    """Tensor-parallel ranks read safetensors lazily (CheckpointSlice): FP8 weights, scales and
    the dequantized block path take those the same as whole tensors."""
    from batchllm import loader
    from batchllm.layers.quantization import plan_fp8
    from batchllm.models.llama import FUSED_NAMES

    for kind in ("fbgemm", "fp8-block", "ct-tensor-static"):
        fp8_dir = write_fp8_checkpoint(float_dir, tmp_path / kind, kind)
        want = _load(fp8_dir)
        model = _load(float_dir, load_format="dummy")  # a fresh model of the same shape
        hf_config = loader.load_hf_config(fp8_dir)
        files = [fp8_dir / "model.safetensors"]
        plan = plan_fp8(model, None, hf_config, loader._tensor_names(files), FUSED_NAMES)
        plan.create(from_existing=False)
        model.load_weights(plan.stream(loader._stream_safetensors(files, lazy=True), CPU))
        plan.finish(CPU)
        for name, param in want.named_parameters():
            assert torch.equal(dict(model.named_parameters())[name].float(), param.float()), (kind, name)


def test_fp8_checkpoint_and_fp8_setting_agree(float_dir, tmp_path):
    fp8_dir = write_fp8_checkpoint(float_dir, tmp_path / "ct", "ct-channel")
    a, b = _load(fp8_dir), _load(fp8_dir, quantization="fp8")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p.float(), q.float()), name


def _edit(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, named", [
    (dict(quant_method="gptq"), "quant_method='gptq'"),
    (dict(config_groups={"group_0": {**CT_GROUP, "weights": {**CT_GROUP["weights"], "type": "int"}}}),
     "config_groups.group_0.weights"),
    (dict(format="pack-quantized"), "float-quantized"),
])
def test_quantization_configs_batchllm_cannot_load_are_named(float_dir, tmp_path, changes, named):
    fp8_dir = write_fp8_checkpoint(float_dir, tmp_path / "bad", "ct-channel")
    _edit(fp8_dir, **changes)
    with pytest.raises(ModelLoadError, match=named.replace("(", r"\(").replace("[", r"\[")) as err:
        _load(fp8_dir)
    assert str(fp8_dir) in str(err.value)


def test_a_weight_without_its_scale_is_named(float_dir, tmp_path):
    fp8_dir = write_fp8_checkpoint(float_dir, tmp_path / "noscale", "ct-channel")
    tensors = load_file(fp8_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(tensors, fp8_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.layers.1.self_attn.qkv_proj"):
        _load(fp8_dir)
    block_dir = write_fp8_checkpoint(float_dir, tmp_path / "noscale-block", "fp8-block")
    tensors = load_file(block_dir / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, block_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.layers.0.mlp.gate_up_proj"):
        _load(block_dir)
