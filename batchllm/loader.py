"""Model loading: a model name or path → our model class with its weights (safetensors, GGUF, .bin, dummy).

Weights stream tensor by tensor into `model.load_weights`, so a checkpoint is never held twice in
memory. Pickled weights (.bin / .pt) can run code when read and are refused unless the user sets
`allow_pickle`; even then they are read with `weights_only=True`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from batchllm import hub
from batchllm.config import ModelConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".weight_scale")


class ModelLoadError(RuntimeError):
    """The model folder or file cannot be loaded; the message names the file and what to do."""


WeightIter = Iterator[tuple[str, torch.Tensor]]


def load_model(model_config: ModelConfig, device: torch.device) -> tuple[nn.Module, object]:
    """Build the model of `model_config.model` on `device` and fill its weights; returns (model, hf_config)."""
    from batchllm.models.registry import build_model

    path = hub.resolve_model(model_config.model)
    fmt = model_config.load_format
    gguf = _gguf_file(path) if fmt in ("auto", "gguf") else None
    if fmt == "gguf" and gguf is None:
        raise ModelLoadError(f"load_format='gguf' but {path} is not a .gguf file nor a folder "
                             f"holding exactly one .gguf file")
    hf_model = None
    if gguf is not None and fmt != "dummy":
        hf_model = _load_gguf_hf_model(gguf)
        hf_config = hf_model.config
    else:
        hf_config = load_hf_config(path if gguf is None else gguf, model_config.trust_remote_code)
    dtype = resolve_dtype(model_config.dtype, hf_config, device)
    model = build_model(hf_config, model_config.model_impl, dtype, device,
                        trust_remote_code=model_config.trust_remote_code)
    if fmt == "dummy":
        init_dummy_weights(model, model_config.seed)
        plan = _fp8_plan(model, model_config, hf_config, path, listed=False)
        if plan is not None:
            plan.create(from_existing=True)
    else:
        if hf_model is not None:
            weights: WeightIter = iter(hf_model.state_dict().items())
            source = str(gguf)
        else:
            weights, source = checkpoint_weights(path, fmt, model_config.allow_pickle)
        plan = _fp8_plan(model, model_config, hf_config, path, listed=hf_model is None)
        if plan is not None:
            plan.create(from_existing=False)
            weights = plan.stream(weights, device)
        try:
            loaded = model.load_weights(weights)
        except (KeyError, ValueError) as exc:  # a tensor with no place or the wrong shape
            raise ModelLoadError(f"the checkpoint {source} does not fit {type(model).__name__} "
                                 f"built from its config: {exc}") from exc
        check_all_loaded(model, loaded, source)
        del hf_model
    if plan is not None:
        try:
            plan.finish(device)
        except ValueError as exc:
            raise ModelLoadError(f"the checkpoint {path}: {exc}") from exc
    # the config the model runs by: a multimodal config's text part (Gemma3ForConditionalGeneration)
    return model.eval(), getattr(model, "config", hf_config)


def _fp8_plan(model: nn.Module, model_config: ModelConfig, hf_config, path: Path, listed: bool):
    """The model's FP8 plan (layers/quantization), or None when it runs unquantized; `listed`:
    read the checkpoint's tensor names (which projections an FP8 checkpoint stores in FP8)."""
    from batchllm.layers.quantization import UnsupportedQuantization, plan_fp8
    from batchllm.models.llama import FUSED_NAMES

    names = None
    if listed and getattr(hf_config, "quantization_config", None) is not None:
        files = [path] if path.is_file() else _safetensors_files(path)
        if not files or any(f.suffix != ".safetensors" for f in files):
            raise ModelLoadError(f"{path} is a quantized checkpoint; batchllm reads those from "
                                 f"*.safetensors files only")
        names = _tensor_names(files)
    try:
        return plan_fp8(model, model_config.quantization, hf_config, names, FUSED_NAMES)
    except UnsupportedQuantization as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def _tensor_names(files: list[Path]) -> list[str]:
    """Every tensor name in safetensors files (headers only)."""
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names.extend(f.keys())
        except Exception as exc:  # SafetensorError: a damaged header
            raise ModelLoadError(f"cannot read {file}: {exc}; the file is damaged or incomplete, "
                                 "download or copy the model again") from exc
    return names


def load_hf_config(path: Path, trust_remote_code: bool = False):
    """The HF config of a model folder (or a .gguf file)."""
    from transformers import AutoConfig

    try:
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model config of {path}: {exc}") from exc


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    """'auto' = the checkpoint's float dtype (float32 on CPU); otherwise the named dtype."""
    if name != "auto":
        return _DTYPES[name]
    if torch.device(device).type == "cpu":
        return torch.float32
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = _DTYPES.get(dt.removeprefix("torch."))
    return dt if dt in _DTYPES.values() else torch.float32


def _gguf_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1 and not any(path.glob("*.safetensors")):
        return ggufs[0]
    return None


def _load_gguf_hf_model(gguf: Path):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad GGUF; name the file
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc}") from exc


def checkpoint_weights(path: Path, load_format: str, allow_pickle: bool) -> tuple[WeightIter, str]:
    """A stream of (HF name, tensor) from a model folder, and a description of where from."""
    if path.is_file():
        files = [path]
    else:
        files = _safetensors_files(path) if load_format in ("auto", "safetensors") else []
    if files and files[0].suffix == ".safetensors":
        from batchllm.distributed.parallel_state import get_tp_size

        lazy = get_tp_size() > 1
        return _stream_safetensors(files, lazy), ", ".join(str(f) for f in files)
    if load_format == "safetensors":
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    pickled = files or _pickle_files(path)
    if not pickled:
        raise ModelLoadError(f"no weights found in {path}: expected model.safetensors, sharded "
                             f"*.safetensors with model.safetensors.index.json, or a .gguf file")
    if not allow_pickle:
        raise ModelLoadError(
            f"{pickled[0]} holds pickled weights, which can run code when loaded; batchllm refuses "
            f"them by default. Convert the model to safetensors, or set allow_pickle: true if you "
            f"trust its source (it is then read with torch.load(weights_only=True)).")
    return _stream_pickle(pickled), ", ".join(str(f) for f in pickled)


def _files_from_index(path: Path, index_name: str) -> list[Path] | None:
    index = path / index_name
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{index} is not a valid weight index (needs a 'weight_map'): {exc}") from exc
    files = [path / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index} lists weight files that do not exist: {', '.join(missing)}")
    return files


def _safetensors_files(path: Path) -> list[Path]:
    indexed = _files_from_index(path, "model.safetensors.index.json")
    if indexed is not None:
        return indexed
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors"))


def _pickle_files(path: Path) -> list[Path]:
    indexed = _files_from_index(path, "pytorch_model.bin.index.json")
    if indexed is not None:
        return indexed
    return sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))


def _stream_safetensors(files: list[Path], lazy: bool = False) -> WeightIter:
    """(name, tensor) of every tensor in the files; `lazy`: (name, CheckpointSlice) instead, so a
    tensor-parallel rank reads only the part its layers take."""
    from safetensors import safe_open

    from batchllm.layers.weight_loading import CheckpointSlice

    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError (not an OSError): a damaged or truncated file
            raise ModelLoadError(f"cannot read {file}: {exc}; the file is damaged or incomplete, "
                                 "download or copy the model again") from exc
        with handle as f:
            for name in f.keys():
                if lazy:
                    yield name, CheckpointSlice(f.get_slice(name))
                    continue
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:  # data missing past the header (a truncated file)
                    raise ModelLoadError(f"cannot read tensor {name!r} from {file}: {exc}; the "
                                         "file is damaged or incomplete") from exc
                yield name, tensor


def _stream_pickle(files: list[Path]) -> WeightIter:
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # unpickling errors come in many types; name the file
            raise ModelLoadError(f"cannot read {file} with torch.load(weights_only=True): {exc}") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelLoadError(f"{file} does not hold a state dict (got {type(state).__name__})")
        yield from state.items()
        del state


def check_all_loaded(model: nn.Module, loaded: set[str], source: str) -> None:
    """Raise naming every parameter (or fused part) the checkpoint did not fill.

    `loaded` holds parameter names, or `name[start:end]` for row ranges of fused parameters.
    """
    covered: dict[str, list[tuple[int, int]]] = {}
    for entry in loaded:
        base, _, rows = entry.partition("[")
        if rows:
            start, end = (int(x) for x in rows.rstrip("]").split(":"))
            covered.setdefault(base, []).append((start, end))
        else:
            covered[base] = [(0, -1)]
    missing = []
    for name, param in model.named_parameters():
        if name.endswith(_IGNORED_SUFFIXES):  # FP8 layers check their own scales (Fp8Plan.finish)
            continue
        ranges = covered.get(name)
        if ranges is None:
            missing.append(name)
        elif ranges != [(0, -1)] and _uncovered_rows(sorted(ranges), param.shape[0]):
            missing.append(f"{name} (rows {_uncovered_rows(sorted(ranges), param.shape[0])})")
    if missing:
        raise ModelLoadError(f"the checkpoint {source} lacks weights for {len(missing)} parameters: "
                             f"{', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}")


def _uncovered_rows(ranges: list[tuple[int, int]], n: int) -> str:
    gaps, pos = [], 0
    for start, end in ranges:
        if start > pos:
            gaps.append(f"{pos}:{start}")
        pos = max(pos, end)
    if pos < n:
        gaps.append(f"{pos}:{n}")
    return ", ".join(gaps)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights straight on the model's device: N(0, std) everywhere, norm scales = 1."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.device not in gens:
            gens[param.device] = torch.Generator(param.device).manual_seed(seed)
        if "norm" in name.split(".")[-2:][0]:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=gens[param.device])
