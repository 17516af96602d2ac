"""Text workloads for the job path: a dummy-weight model folder with the default model's tokenizer,
seeded English-like prompts, and a hook that stamps when a process's engine takes its first step."""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from benchmarks.shapes import SHAPES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")
FIRST_STEP_ENV = "BATCHLLM_FIRST_STEP_FILE"  # where install_first_step_stamp writes its stamps

_WORDS = """the of and to in is was for on that with as by at from it his an were are which this be
have has had not but they their one all new first more after who also two time years other
city river people world state school music family history water light night house road book
small great long early large high local public common under between during before through
against without within around about over into across toward along behind beyond village
engine garden market window letter morning winter summer island forest mountain valley
station harbor bridge castle church field farm story voice child mother father friend teacher
doctor soldier farmer writer painter student worker traveler stranger neighbor king queen
quickly slowly quietly carefully suddenly often never always sometimes almost nearly rather
bright dark cold warm heavy quiet loud ancient modern simple strange careful gentle proud
walked carried opened closed wrote read found lost built crossed remembered watched followed
answered explained believed decided returned noticed wondered promised arrived discovered""".split()


def write_text_model_dir(shape: str, folder: Path, tokenizer_model: str = "smollm2-135m") -> Path:
    """folder/<shape>-text: `shape`'s config.json (benchmarks/shapes.py) with the vocabulary and
    special tokens of `tokenizer_model` (the default model, fetched once into the hub cache), and
    that model's tokenizer files; load it with load_format=dummy."""
    from batchllm.hub import resolve_model

    src = resolve_model(tokenizer_model)
    out = Path(folder) / f"{shape}-text"
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    tok_config = json.loads((src / "config.json").read_text())
    config = dict(SHAPES[shape], vocab_size=tok_config["vocab_size"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in tok_config:
            config[key] = tok_config[key]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def text_prompts(n: int, seed: int = 0, min_words: int = 80, max_words: int = 600) -> list[str]:
    """`n` prompts of min_words..max_words words (uniform), sentences of 6-18 words, the same every run."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words, target = [], rng.randint(min_words, max_words)
        while len(words) < target:
            sentence = rng.choices(_WORDS, k=min(rng.randint(6, 18), target - len(words)))
            sentence[0] = sentence[0].capitalize()
            sentence[-1] += rng.choice((".", ".", ".", "?", "!"))
            words.extend(sentence)
        prompts.append(" ".join(words))
    return prompts


def install_first_step_stamp(path: str | os.PathLike | None = None) -> None:
    """Make LLMEngine.step write {"first_step_start": t, "first_step_end": t} (time.time())
    to `path` (default: $BATCHLLM_FIRST_STEP_FILE) the first time any engine in this process
    steps. Observes only: the step itself is unchanged."""
    from batchllm.engine.llm_engine import LLMEngine

    target = Path(path or os.environ[FIRST_STEP_ENV])
    original = LLMEngine.step
    done = [False]

    def step(self, *args, **kwargs):
        if done[0]:
            return original(self, *args, **kwargs)
        done[0] = True
        start = time.time()
        try:
            return original(self, *args, **kwargs)
        finally:
            target.write_text(json.dumps({"first_step_start": start, "first_step_end": time.time()}))

    LLMEngine.step = step
