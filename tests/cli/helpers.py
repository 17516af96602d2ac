"""Helpers for CLI tests: job files over a tiny model, `batchllm run` subprocesses, their rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from batchllm.io.writers import read_arrow

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = ["time_queued_s", "time_to_first_token_s", "time_total_s"]


def write_job(tmp_path: Path, model: Path | str, rows: int = 6, out: Path | None = None,
              **extra: object) -> Path:
    """in.jsonl (rows prompts and one malformed line) and job.yaml, greedy, in tmp_path."""
    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"the cat {i} sat on the mat"}) + "\n")
        f.write("{not json\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"""model: {model}
input: {{path: {src}, id_column: id}}
output: {{path: {out or tmp_path / 'out'}, unit_rows: {extra.get('unit_rows', 4)}, chunk_rows: 2}}
sampling: {{max_tokens: {extra.get('max_tokens', 4)}, temperature: 0.0}}
engine: {{device: cpu, max_num_seqs: {extra.get('max_num_seqs', 8)}}}
""")
    return job


def final_rows(out: Path) -> pa.Table:
    (path,) = [p for p in (out / "final").glob("*.arrow")]
    return read_arrow(path).drop_columns(TIMINGS)


def chunk_rows(out: Path) -> pa.Table:
    """Every committed row by (input_row), without timings or the input file's path."""
    t = pa.concat_tables([read_arrow(p) for p in sorted((out / "chunks").glob("*.arrow"))])
    return t.sort_by([("input_row", "ascending")]).drop_columns(TIMINGS + ["input_file"])


def cli(job: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "batchllm.cli", "run", str(job), "-q", *args]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
            **extra}


def wait_for_chunks(out: Path, more_than: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Poll out/chunks until more than `more_than` chunks are committed; returns the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(list((out / "chunks").glob("*.arrow"))) if (out / "chunks").exists() else 0
        if n > more_than:
            return n
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before committing a chunk "
                                 f"beyond {more_than}")
        time.sleep(0.005)
    raise AssertionError(f"no chunk beyond {more_than} within {timeout}s")
