"""Streaming keeps memory flat: a 2-million-row JSONL and Parquet input run through a fast fake
engine in a child process whose peak memory must stay within a bound far below the input's size
as Python rows (slow: about a minute each on a laptop core)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cli.helpers import env

pytestmark = pytest.mark.slow

ROWS = 2_000_000
# Ids checked for duplicates cost 24 bytes a row at pre-flight (hash, order, sorted copy); the
# rest must not grow with the input. Rows held as Python dicts would take ~400 bytes each.
BOUND_MB = 64 + 48 * ROWS / 2**20

CHILD = """
import json, sys, time
from batchllm.jobs import run_job
from tests.jobs.fake_engine import FakeEngine

class Lean(FakeEngine):  # FakeEngine without its per-request bookkeeping (seen_ids)
    def add_request(self, request_id, prompt, sampling_params, arrival_time=None):
        self.waiting[request_id] = (list(prompt), sampling_params, arrival_time or time.time())

def status_mb(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024

with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) counts from here: imports
    f.write("5")                               # before it may peak higher than the job itself
base = status_mb("VmRSS")
spec = {"input": {"path": sys.argv[1], "id_column": "id"},
        "output": {"path": sys.argv[2], "keep_columns": ["label"]},
        "sampling": {"max_tokens": 2, "temperature": 0.0}, "engine": {"max_num_seqs": 256}}
r = run_job(spec, engine=Lean(per_step=768, max_model_len=128))
peak = status_mb("VmHWM")
print(json.dumps({"grown_mb": peak - base, "rows": r.rows, "errors": r.errors}))
"""


def run_child(src: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], env=env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_two_million_row_jsonl_runs_in_bounded_memory(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        for i in range(ROWS):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"the quick brown fox {i}", "label": i})
                    + "\n")
    got = run_child(src, tmp_path / "out")
    assert got["rows"] == ROWS and got["errors"] == 0
    assert got["grown_mb"] < BOUND_MB, got


def test_a_two_million_row_parquet_runs_in_bounded_memory(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("label", pa.int64())])
    with pq.ParquetWriter(src, schema) as w:
        for start in range(0, ROWS, 250_000):
            rows = range(start, start + 250_000)
            w.write_table(pa.table({"id": [f"r{i}" for i in rows],
                                    "prompt": [f"the quick brown fox {i}" for i in rows],
                                    "label": list(rows)}, schema=schema))
    got = run_child(src, tmp_path / "out")
    assert got["rows"] == ROWS and got["errors"] == 0
    assert got["grown_mb"] < BOUND_MB, got
