"""Pre-flight checks of a model's files without loading any weight: the folder or file exists,
config.json and the tokenizer's JSON files parse, and every safetensors file is whole (its header
parses and its data reaches as far as the header says). A model problem fails here, exit 2, with
the file named, before any model work."""
from __future__ import annotations

import json
from pathlib import Path

from batchllm.jobs.errors import JobModelError

SAFETENSORS_MAX_HEADER = 100 << 20  # the format's own limit
_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "model.safetensors.index.json")


def check_model(model: str, where: str) -> None:
    """The model is an existing folder / .gguf file or a known short name (nothing is fetched);
    a local folder's files are checked as the module docstring says."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
                raise JobModelError(f"{where}: model folder {model} has no config.json (nor a "
                                    ".gguf file); point `model` at a Hugging Face model folder")
            check_model_files(path, where)
        elif path.suffix == ".safetensors":
            check_safetensors(path, where)
        return
    from batchllm import hub

    if hub.known_model(model) is None:
        raise JobModelError(f"{where}: model {model!r} is not an existing file or folder, nor a "
                            f"known short name ({', '.join(hub.short_names())})")


def check_architecture(model: str, where: str, model_impl: str = "auto",
                       trust_remote_code: bool = False, tensor_parallel_size: int = 1) -> None:
    """A model folder's architecture can run under these engine settings: natively, or through the
    transformers fallback (a causal LM whose attention batchllm can serve); else exit 2 with why.
    Torch is imported only when the architecture has no native implementation."""
    path = Path(model).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        return  # a known short name (native) or a .gguf file: checked when it loads
    from batchllm.models import registry

    config = _check_json(config_file, where)
    try:
        if registry.native_architecture(config) is None or model_impl == "transformers":
            from batchllm.loader import ModelLoadError, load_hf_config

            try:
                config = load_hf_config(path, trust_remote_code)
            except ModelLoadError as e:
                raise JobModelError(f"{where}: {e}") from None
        registry.check_runnable(config, model_impl, tensor_parallel_size)
    except registry.UnsupportedModelError as e:
        raise JobModelError(f"{where}: model {model}: {e}") from None


def check_model_files(folder: Path, where: str) -> None:
    for name in _JSON_FILES:
        f = folder / name
        if f.exists():
            value = _check_json(f, where)
            if name == "tokenizer.json":
                _check_tokenizer(f, value, where)
    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f, where)


def _check_tokenizer(path: Path, value: dict, where: str) -> None:
    """A `tokenizers` file always holds a `model` object and an `added_tokens` list."""
    if not isinstance(value.get("model"), dict) or not isinstance(value.get("added_tokens"), list):
        raise JobModelError(f"{where}: model file {path} is not a tokenizer file (it lacks the "
                            "`model` object or the `added_tokens` list); the model folder is "
                            "damaged, download or copy it again")


def _check_json(path: Path, where: str) -> dict:
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except OSError as e:
        raise JobModelError(f"{where}: cannot read model file {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:
        raise JobModelError(f"{where}: model file {path} is not valid JSON ({_first_line(e)}); "
                            "the model folder is damaged, download or copy it again") from None
    if not isinstance(value, dict):
        raise JobModelError(f"{where}: model file {path} must hold a JSON object, it holds "
                            f"{type(value).__name__}")
    return value


def check_safetensors(path: Path, where: str) -> None:
    """A safetensors file: 8-byte header length, a JSON header of tensors with data offsets, and
    at least as many data bytes as the largest offset."""
    def bad(why: str) -> JobModelError:
        return JobModelError(f"{where}: model file {path} is damaged: {why}; download or copy "
                             "the model again")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"it has {size} bytes, too few for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
                raise bad(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise JobModelError(f"{where}: cannot read model file {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:
        raise bad(f"its header is not valid JSON ({_first_line(e)})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise bad(f"tensor {name!r} has no valid data_offsets in the header")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise bad(f"it is truncated: the header needs {8 + n + end} bytes, the file has {size}")


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__
