"""Shared test fixtures: tiny random model folders and the real default model (SmolLM2-135M)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may download from the HF hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import make_tiny_model_dir  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (config, model.safetensors, tokenizer), shared by the session."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make(family="llama", seed=0, **config_overrides) -> folder; the same arguments reuse one folder."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", seed: int = 0, **overrides: object) -> Path:
        key = (family, seed, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = make_tiny_model_dir(tmp_path_factory.mktemp(f"tiny-{family}"), family,
                                            seed=seed, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct), converted once into the batchllm cache."""
    from batchllm import hub

    try:
        return hub.resolve_model(hub.DEFAULT_MODEL)
    except hub.ModelFetchError as exc:
        pytest.skip(f"default model SmolLM2-135M-Instruct is not available offline and could not "
                    f"be fetched: {exc}")
