"""Job options users meet early: input.dataset (saved HF datasets), output.final_format (Parquet
for readers that cannot open Arrow IPC files), and a device the machine does not have."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.io.writers import read_arrow
from batchllm.jobs import finalize, run_job, validate_job
from batchllm.jobs.errors import JobError, JobInputError, JobSpecError
from tests.jobs.fake_engine import FakeEngine
from tests.jobs.helpers import committed, job, write_jsonl


def test_input_dataset_runs_a_saved_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(4)], "label": [1, 2, 3, 4]})
    ds.save_to_disk(str(tmp_path / "my_ds"))
    spec = {"model": "smollm2-135m", "input": {"dataset": str(tmp_path / "my_ds")},
            "output": {"path": str(tmp_path / "out"), "keep_columns": ["label"]},
            "sampling": {"max_tokens": 2}}
    assert validate_job(spec).rows_total == 4
    r = run_job(spec, engine=FakeEngine(), finalize_outputs=True)
    t = committed(tmp_path / "out")
    assert t["id"].to_pylist() == [f"my_ds-{i}" for i in range(4)]
    assert t["label"].to_pylist() == [1, 2, 3, 4] and r.summary["errors"] == 0
    assert [p.name for p in r.final_files] == ["00000-my_ds.arrow"]
    again = run_job(spec, engine=FakeEngine())  # the same folder's bytes: the same job
    assert again.resumed and again.summary["rows"] == 4
    with pytest.raises(JobSpecError, match="give input.path or input.dataset, not both"):
        validate_job({**spec, "input": {"dataset": str(tmp_path / "my_ds"), "path": "x.jsonl"}})
    with pytest.raises(JobInputError, match=r"input\.dataset .*nope.*no such folder"):
        validate_job({**spec, "input": {"dataset": str(tmp_path / "nope")}})


@pytest.mark.parametrize("fmt, suffixes", [("parquet", [".parquet"]),
                                           ("both", [".arrow", ".parquet"]),
                                           ("arrow", [".arrow"])])
def test_final_format_writes_parquet_that_hf_datasets_reads(tmp_path: Path, fmt: str,
                                                            suffixes: list[str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    r = run_job(job(src, tmp_path / "out", output={"final_format": fmt, "unit_rows": 2}),
                engine=FakeEngine(), finalize_outputs=True)
    assert sorted(p.suffix for p in r.final_files) == suffixes
    tables = {p.suffix: (read_arrow(p) if p.suffix == ".arrow" else pq.read_table(p))
              for p in r.final_files}
    for t in tables.values():
        assert t["input_row"].to_pylist() == list(range(5))
    if len(tables) == 2:
        assert tables[".arrow"].equals(tables[".parquet"])
    if ".parquet" in tables:
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_parquet(str(tmp_path / "out" / "final" / "00000-in.parquet"))
        assert ds["text"] == tables[".parquet"]["text"].to_pylist()
    assert [p.name for p in finalize(tmp_path / "out", "parquet")] == ["00000-in.parquet"]
    with pytest.raises(JobError, match="format 'csv' is not one of arrow, parquet, both"):
        finalize(tmp_path / "out", "csv")


def test_a_device_the_machine_lacks_is_refused_by_validate(tmp_path: Path, monkeypatch) -> None:
    import torch

    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(JobSpecError, match=r"engine\.device='cuda' but this machine has no CUDA "
                                           r"device.*use engine\.device: cpu"):
        validate_job(job(src, tmp_path / "out", engine={"device": "cuda"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(JobSpecError, match=r"engine\.device='cuda:2' but only 2 CUDA device\(s\)"):
        validate_job(job(src, tmp_path / "out", engine={"device": "cuda:2"}))
    assert validate_job(job(src, tmp_path / "out", engine={"device": "cuda:1"})).rows_total == 1
    assert validate_job(job(src, tmp_path / "out", engine={"device": "cpu"})).rows_total == 1


def test_rows_are_named_by_their_line_in_the_file(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, "", "", {"prompt": ""},
                                              {"prompt": "x" * 100}, "{oops"])
    run_job(job(src, tmp_path / "out"), engine=FakeEngine(max_model_len=32))
    errors = committed(tmp_path / "out")["error"].to_pylist()
    assert errors[0] is None
    assert errors[1].startswith(f"line 4 of {src}: empty prompt")
    assert errors[2].startswith(f"line 5 of {src}: prompt too long")
    assert "line 6 of in.jsonl" in errors[3]
    pq.write_table(pa.table({"prompt": ["ok", ""]}), tmp_path / "in.parquet")
    run_job(job(tmp_path / "in.parquet", tmp_path / "pq"), engine=FakeEngine())
    assert committed(tmp_path / "pq")["error"][1].as_py().startswith("row 1 of ")
