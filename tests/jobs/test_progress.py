"""Progress that tells the truth: tokens/s as the engine generates them, an ETA that follows rows
remaining at the real pace, timestamped log lines with a start banner and loading phases, error
counts that survive a resume."""
from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

from batchllm.jobs import run_job
from batchllm.jobs.executor import RunFigures, StopSignal
from batchllm.jobs.progress import LogProgress, ProgressState, progress_callback
from tests.jobs.helpers import job, write_jsonl
from tests.jobs.stream_engine import StreamEngine


class Recorder:
    """A progress sink that keeps what it is shown."""

    def __init__(self) -> None:
        self.states: list[ProgressState] = []
        self.events: list[str] = []

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def show(self, state: ProgressState) -> None:
        self.states.append(state)

    def event(self, text: str) -> None:
        self.events.append(text)


def _simulate(num_rows: int, slots: int, lengths: list[int], step_s: float = 0.01):
    """A continuous-batching engine on a fake clock: `slots` rows decode one token a step each,
    a finished row's slot is refilled at once. Returns (end time, [(time, state)])."""
    clock, generated, shown = [0.0], [0], []
    rec = Recorder()
    update = progress_callback(rec, 0, num_rows, lambda: {"num_generated_tokens": generated[0]},
                               clock=lambda: clock[0])
    f, running, nxt = RunFigures(), {}, 0
    while nxt < num_rows or running:
        while len(running) < slots and nxt < num_rows:
            running[nxt], nxt = 0, nxt + 1
        clock[0] += step_s
        for r in list(running):
            running[r] += 1
            generated[0] += 1
            if running[r] >= lengths[r]:
                del running[r]
                f.rows += 1
                f.output_tokens += lengths[r]
        n = len(rec.states)
        update(f, len(running))
        if len(rec.states) > n:
            shown.append((clock[0], rec.states[-1]))
    return clock[0], shown


def test_tokens_per_s_counts_generated_tokens_before_any_row_finishes() -> None:
    # 64 rows of 1000 tokens each: no row finishes for 10 s; the engine makes 6400 tokens/s.
    end, shown = _simulate(64, 64, [1000] * 64)
    before = [(t, s) for t, s in shown if s.rows_done == 0]
    assert len(before) > 10
    for t, s in before:
        assert abs(s.output_tokens_per_s - 6400) < 1, (t, s.output_tokens_per_s)
        assert s.generated_tokens == round(t / 0.01) * 64


def test_eta_follows_rows_remaining_at_the_real_pace() -> None:
    rnd = random.Random(0)
    lengths = [rnd.randint(50, 150) for _ in range(2000)]
    end, shown = _simulate(2000, 64, lengths)
    finished = [(t, s) for t, s in shown if s.rows_done > 0]
    assert finished and all(s.eta_s is not None for _, s in finished)
    for t, s in finished:  # never the wild over-estimate of rows/elapsed early on
        assert s.eta_s <= 1.25 * (end - t) + 0.5, (t, s.rows_done, s.eta_s, end - t)
    for t, s in finished:
        if 0.05 <= s.rows_done / 2000 <= 0.8:  # (the last batch drains slower)
            assert abs(s.eta_s - (end - t)) <= 0.2 * (end - t), (t, s.rows_done, s.eta_s, end - t)


def test_tokens_per_s_is_smoothed_over_a_window_not_the_last_tick() -> None:
    rec, clock, generated = Recorder(), [0.0], [0]
    update = progress_callback(rec, 0, 100, lambda: {"num_generated_tokens": generated[0]},
                               clock=lambda: clock[0])
    for i in range(200):  # 1000 tok/s on average, in bursts: every other tick makes none
        clock[0] += 0.5
        generated[0] += 1000 if i % 2 else 0
        update(RunFigures(), 1)
    rates = [s.output_tokens_per_s for s in rec.states[20:]]
    assert min(rates) > 900 and max(rates) < 1100


def test_plain_log_has_a_start_banner_timestamps_and_errors_that_survive_a_resume(
        tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}"} if i % 4 else {"prompt": ""} for i in range(40)]  # 10 errors
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    stop = StopSignal()

    def halfway(engine: StreamEngine) -> None:
        if engine.steps == 12:
            stop.signum = 2

    spec = job(src, tmp_path / "out", output={"unit_rows": 8, "chunk_rows": 4},
               engine={"max_num_seqs": 1})
    first = io.StringIO()
    try:
        run_job(spec, engine=StreamEngine(max_running=2, step_s=0.05, on_step=halfway), stop=stop,
                progress=LogProgress(first, every_s=0.0))
    except Exception:
        pass
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    lines = first.getvalue().splitlines()
    assert re.match(stamp + r"batchllm .*model smollm2-135m \| 40 rows in 1 shard\(s\)", lines[0])
    assert "a new job" in lines[0] and all(re.match(stamp, ln) for ln in lines)
    assert re.search(r"rows \d+/40 \| [\d.]+ tok/s .*\| errors \d+ \|", lines[-1])  # > 0.5 s
    errors_first = json.loads((tmp_path / "out" / "summary.json").read_text())["errors"]
    assert 0 < errors_first < 10
    rec = Recorder()
    second = run_job(spec, engine=StreamEngine(max_running=2), progress=rec)
    assert second.summary["errors"] == 10
    assert rec.states[-1].errors == 10 and rec.states[-1].rows_done == 40
    assert "already committed" in rec.events[0] and f"({errors_first} errors)" in rec.events[0]


def test_loading_phases_reach_the_progress_display(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    rec = Recorder()
    run_job({**job(src, tmp_path / "out"), "model": str(tiny_model_dir),
             "engine": {"device": "cpu", "dtype": "float32"}}, progress=rec)
    text = "\n".join(rec.events)
    for phase in ("loading the tokenizer", "loading weights of", "allocating the KV cache",
                  "engine ready in"):
        assert phase in text, text
    assert text.index("loading weights") < text.index("allocating the KV cache")


def test_the_engine_still_builds_without_a_phase_callback(tiny_model_dir: Path) -> None:
    from batchllm.config import build_engine_config
    from batchllm.engine import LLMEngine

    heard: list[str] = []
    config = build_engine_config(str(tiny_model_dir), device="cpu", dtype="float32")
    LLMEngine(config)  # the old signature
    LLMEngine(config, on_phase=heard.append)
    assert any(h.startswith("allocating the KV cache: ") and "blocks of 16 tokens" in h
               for h in heard)
