"""Damaged model files fail the job before any model work, exit 2, naming the file; the loader
itself names a damaged safetensors file instead of raising SafetensorError."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from batchllm.jobs import validate_job
from batchllm.jobs.engine_api import build_engine
from batchllm.jobs.errors import JobModelError
from batchllm.jobs.spec import load_spec
from batchllm.loader import ModelLoadError, checkpoint_weights
from tests.jobs.helpers import job, write_jsonl


def weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


DAMAGE = {
    "truncated": ("model.safetensors", lambda d: d[: len(d) // 2],
                  r"model.safetensors is damaged: it is truncated: the header needs \d+ bytes, "
                  r"the file has \d+"),
    "header only": ("model.safetensors", lambda d: d[: header_end(d)], "it is truncated"),
    "empty": ("model.safetensors", lambda d: b"", "it has 0 bytes, too few"),
    "garbage": ("model.safetensors", lambda d: b"\x10\0\0\0\0\0\0\0not json at all!",
                "its header is not valid JSON"),
    "huge header length": ("model.safetensors", lambda d: b"\xff" * 8 + d[8:],
                           "its header claims"),
    "config not json": ("config.json", lambda d: b'{"model_type": "llama",', "config.json is not "
                        "valid JSON"),
    "config a list": ("config.json", lambda d: b"[]", "config.json must hold a JSON object"),
    "tokenizer not json": ("tokenizer.json", lambda d: d[:100], "tokenizer.json is not valid JSON"),
    "tokenizer of another kind": ("tokenizer.json", lambda d: b'{"vocab": {}}',
                                  "tokenizer.json is not a tokenizer file"),
}


@pytest.fixture
def damaged(tmp_path: Path, tiny_model_dir: Path, request: pytest.FixtureRequest) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    name, edit, _ = DAMAGE[request.param]
    (folder / name).write_bytes(edit((folder / name).read_bytes()))
    return folder


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_a_damaged_model_file_fails_before_any_model_work_naming_it(tmp_path: Path,
                                                                    damaged: Path,
                                                                    request) -> None:
    name, _, words = DAMAGE[request.node.callspec.params["damaged"]]
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    with pytest.raises(JobModelError, match=words) as info:
        validate_job(job(src, tmp_path / "out", model=str(damaged)))
    assert str(damaged / name) in str(info.value) and info.value.exit_code == 2


@pytest.mark.parametrize("cut", ["half", "header only", "one byte short"])
def test_the_loader_names_a_damaged_safetensors_file(tmp_path: Path, tiny_model_dir: Path,
                                                     cut: str) -> None:
    data = weights(tiny_model_dir)
    end = {"half": len(data) // 2, "header only": header_end(data),
           "one byte short": len(data) - 1}[cut]
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[:end])
    stream, source = checkpoint_weights(bad, "auto", allow_pickle=False)
    with pytest.raises(ModelLoadError, match=f"{bad}.*damaged or incomplete"):
        list(stream)


def test_building_the_engine_on_a_damaged_file_is_a_model_error_not_a_traceback(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Past the pre-flight check (the file damaged after it, say): still exit 2, file named."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    spec = load_spec(job(src, tmp_path / "out", model=str(folder), engine={"device": "cpu"}))
    data = weights(folder)
    (folder / "model.safetensors").write_bytes(data[: header_end(data) + 10])
    with pytest.raises(JobModelError, match="model.safetensors") as info:
        build_engine(spec)
    assert info.value.exit_code == 2
