"""Every kind of bad input through the CLI (typer's CliRunner; a subprocess sample is slow-marked):
job-level problems exit 2 naming the key, file or row; row-level ones are error rows in a job that
exits 0. A traceback in the output, or an exception escaping the command, fails the test."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.io.writers import read_arrow
from tests.cli.helpers import cli, env


def invoke(*args: str) -> Any:
    res = CliRunner().invoke(app, list(args))
    escaped = res.exception is not None and not isinstance(res.exception, SystemExit)
    assert not escaped, "".join(traceback.format_exception(*res.exc_info))
    assert "Traceback" not in res.output, res.output
    return res


@pytest.fixture
def base(tmp_path: Path, tiny_model_dir: Path) -> dict:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"hello {i}", "label": i}) + "\n"
                           for i in range(5)))
    return {"model": str(tiny_model_dir), "input": {"path": str(src), "id_column": "id"},
            "output": {"path": str(tmp_path / "out"), "unit_rows": 4, "chunk_rows": 2},
            "sampling": {"max_tokens": 4, "temperature": 0.0},
            "engine": {"device": "cpu", "max_num_seqs": 8}}


def put(section: str | None, **values: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        if section is None:
            d.update(values)
        else:
            d[section] = {**(d.get(section) or {}), **values}
    return edit


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

# (name, edit of the job dict | raw job text | None, --set arguments, words the message holds)
JOB_CASES: list[tuple[str, Any, tuple[str, ...], str]] = [
    ("sampling as a string", put(None, sampling="fast"), (), "`sampling` must be a mapping"),
    ("sampling as a number", put(None, sampling=3), (), "`sampling` must be a mapping"),
    ("output.path as a number", put("output", path=5), (), "output.path=5 is invalid"),
    ("tokenizer as a number", put(None, tokenizer=5), (), "tokenizer=5 is invalid"),
    ("model as a list", put(None, model=["a"]), (), "model=['a'] is invalid"),
    ("input as a number", put(None, input=5), (), "`input` must be a mapping"),
    ("commit interval in words", put("output", commit_interval_s="ten"), (),
     "output.commit_interval_s='ten' is invalid"),
    ("unit_rows true", put("output", unit_rows=True), (), "output.unit_rows=True"),
    ("keep_columns as a string", put("output", keep_columns="label"), (),
     "output.keep_columns='label'"),
    ("format typo", put("input", format="josnl"), (), "Did you mean 'jsonl'"),
    ("limits typo", put("limits", prompt_too_long="truncate"), (), "Did you mean 'truncate_left'"),
    ("unknown key", put(None, sampler={}), (), "Did you mean 'sampling'"),
    ("engine int as text", put("engine", max_num_seqs="many"), (), "engine.max_num_seqs='many'"),
    ("engine NaN", put("engine", gpu_memory_utilization=float("nan")), (),
     "engine.gpu_memory_utilization=nan"),
    ("temperature inf", put("sampling", temperature=float("inf")), (), "sampling.temperature=inf"),
    ("seed past 64 bits", put("sampling", seed=2**64), (), "sampling.seed=18446744073709551616"),
    ("max_tokens true", put("sampling", max_tokens=True), (), "sampling.max_tokens=True"),
    ("stop as a dict", put("sampling", stop={"a": 1}), (), "sampling.stop={'a': 1}"),
    ("duplicate_ids typo", put("input", duplicate_ids="maybe"), (), "input.duplicate_ids='maybe'"),
    ("alias bomb", BOMB, (), "expands to more than"),
    ("oversized file", "# " + "x" * (2 << 20) + "\n", (), "a job file may hold at most"),
    ("duplicate key", None, (), "key 'model' is given twice (lines 1 and "),
    ("not UTF-8", b"model: \xff\n", (), "not UTF-8 text"),
    ("nested too deep", "a: " + "[" * 5000 + "]" * 5000 + "\n", (), "nests"),
    ("YAML syntax", "input: [unclosed\n", (), "not valid YAML"),
    ("python tag", "model: !!python/object/apply:os.getcwd []\n", (), "not valid YAML"),
    ("--set wrong type", put(None), ("--set", "output.unit_rows=abc"), "output.unit_rows='abc'"),
    ("--set bad YAML", put(None), ("--set", "output.unit_rows=[1"), "not valid YAML"),
    ("--set into a value", put(None), ("--set", "input.path.x=1"), "'path' is not a section"),
    ("missing input", put("input", path="/no/such/file.jsonl"), (), "/no/such/file.jsonl"),
    ("missing column", put("input", prompt_column="question"), (), "no column 'question'"),
    ("parquet that is not", put("input", format="parquet"), (), "not a readable Parquet file"),
    ("missing model", put(None, model="/no/such/model"), (), "/no/such/model"),
]


@pytest.mark.parametrize("name, edit, args, words", JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_a_bad_job_file_exits_2_naming_the_key_and_never_shows_a_traceback(
        tmp_path: Path, base: dict, name: str, edit: Any, args: tuple[str, ...],
        words: str) -> None:
    job = tmp_path / "job.yaml"
    if callable(edit):
        d = copy.deepcopy(base)
        edit(d)
        job.write_text(yaml.safe_dump(d, sort_keys=False))
    elif edit is None:  # the base job with one key again at the end
        job.write_text(yaml.safe_dump(base, sort_keys=False) + "model: other\n")
    else:
        job.write_bytes(edit if isinstance(edit, bytes) else edit.encode())
    res = invoke("run", str(job), "-q", *args)
    assert res.exit_code == 2, res.output
    assert words in res.output, res.output
    assert not (tmp_path / "out" / "chunks").exists()  # refused before any work


def test_duplicate_ids_exit_2_naming_the_lines_and_allow_runs_them(tmp_path: Path,
                                                                    base: dict) -> None:
    src = tmp_path / "dup.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": "y"}\n'
                   '{"id": "a", "prompt": "z"}\n')
    base["input"]["path"] = str(src)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(base))
    res = invoke("run", str(job), "-q")
    assert res.exit_code == 2 and "id 'a' is given twice: at row 0 (line 1)" in res.output
    assert "row 2 (line 4)" in res.output and "input.duplicate_ids: allow" in res.output
    ok = invoke("run", str(job), "-q", "--set", "input.duplicate_ids=allow")
    assert ok.exit_code == 0 and "3 rows (0 errors" in ok.output


BAD_ROWS = [  # (the row's JSON, words of its error)
    ('{"id": "sur-prompt", "prompt": "bad \\ud800 text", "label": 2}', "not valid Unicode text"),
    ('{"id": "sur-id-\\udc80", "prompt": "fine", "label": 3}', "the id holds text that is not"),
    ('{"id": "sur-kept", "prompt": "fine", "label": "x\\ud800"}', "kept column 'label'"),
    ('{"id": "seed-big", "prompt": "fine", "seed": 18446744073709551616, "temperature": 0.5}',
     "seed=18446744073709551616 is invalid"),
    ('{"id": "seed-float", "prompt": "fine", "seed": 1.5}', "seed=1.5 is invalid"),
    ('{"id": "temp-nan", "prompt": "fine", "temperature": NaN}', "temperature=nan is invalid"),
    ('{"id": "temp-inf", "prompt": "fine", "temperature": Infinity}', "temperature=inf"),
    ('{"id": "topp-nan", "prompt": "fine", "top_p": NaN}', "top_p=nan"),
    ('{"id": "stop-dict", "prompt": "fine", "stop": {"a": 1}}', "stop={'a': 1}"),
    ('{"id": "stop-bool", "prompt": "fine", "stop": true}', "stop=True"),
    ('{"id": "maxtok-true", "prompt": "fine", "max_tokens": true}', "max_tokens=True"),
    ('{"id": "maxtok-huge", "prompt": "fine", "max_tokens": 100000000000000000000}',
     "max_tokens=100000000000000000000"),
    ('{"id": "prompt-int", "prompt": 5}', "got a number (5)"),
    ('{"id": "prompt-list", "prompt": ["a", "b"]}', "got a list of 2 item(s)"),
    ('{"id": "prompt-struct", "prompt": {"text": "a"}}', "got an object (struct)"),
    ('{"id": "prompt-null", "prompt": null}', "got null"),
    ('{"id": "deep", "prompt": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"id": "broken", "prompt": ', "malformed JSON line"),
]


def test_bad_rows_are_error_rows_through_the_real_engine_and_the_job_exits_0(
        tmp_path: Path, base: dict) -> None:
    rows = ['{"id": "ok1", "prompt": "hello there", "label": 1}', *[r for r, _ in BAD_ROWS],
            '{"id": "ok2", "prompt": "goodbye", "label": 7}']
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(rows) + "\n")
    base["input"]["path"] = str(src)
    base["output"].update(keep_columns=["label"], unit_rows=8, chunk_rows=3)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(base))
    res = invoke("run", str(job), "-q", "--finalize")
    assert res.exit_code == 0, res.output
    assert f"{len(rows)} rows ({len(BAD_ROWS)} errors" in res.output
    (final,) = (tmp_path / "out" / "final").glob("*.arrow")
    t = read_arrow(final)
    errors = t["error"].to_pylist()
    assert errors[0] is None and errors[-1] is None
    assert t["num_output_tokens"].to_pylist()[0] == 4 and t["num_output_tokens"][-1].as_py() == 4
    for (_, words), error in zip(BAD_ROWS, errors[1:-1]):
        assert error is not None and words in error, (words, error)
    assert t["id"][2].as_py() == "sur-id-\\udc80"  # written escaped


@pytest.mark.parametrize("damage, words", [
    ("truncated", "is damaged: it is truncated"), ("header only", "is damaged: it is truncated"),
    ("config", "config.json is not valid JSON"),
])
def test_a_damaged_model_exits_2_naming_the_file(tmp_path: Path, base: dict, tiny_model_dir: Path,
                                                 damage: str, words: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 3])
    elif damage == "header only":
        weights.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    else:
        (model / "config.json").write_text('{"model_type": ')
    base["model"] = str(model)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(base))
    for command in (["validate", str(job)], ["run", str(job), "-q"]):
        res = invoke(*command)
        assert res.exit_code == 2 and words in res.output and str(model) in res.output


def test_finalize_of_an_empty_input_writes_an_empty_file(tmp_path: Path, base: dict) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    base["input"]["path"] = str(empty)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(base))
    res = invoke("run", str(job), "-q", "--finalize")
    assert res.exit_code == 0 and "done: 0 rows" in res.output
    (final,) = (tmp_path / "out" / "final").glob("*.arrow")
    t = read_arrow(final)
    assert t.num_rows == 0 and "text" in t.column_names and "error" in t.column_names


def test_broken_output_folders_are_named_by_inspect_and_finalize(tmp_path: Path,
                                                                 base: dict) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(base))
    assert invoke("run", str(job), "-q").exit_code == 0
    out = Path(base["output"]["path"])
    chunk = sorted((out / "chunks").glob("*.arrow"))[0]
    chunk.write_bytes(b"garbage")
    res = invoke("finalize", str(out))
    assert res.exit_code == 1 and chunk.name in res.output and "rerun the job" in res.output
    res = invoke("inspect", str(out))
    assert res.exit_code == 0 and "unreadable" in res.output
    (out / "summary.json").write_text("[1, 2]")
    (out / "job.json").write_text('{"shards": 3}')
    for command in ("inspect", "finalize"):
        res = invoke(command, str(out))
        assert res.exit_code == 2 and "not a batchllm job record" in res.output
        res = invoke(command, str(job))  # a file, not a folder
        assert res.exit_code == 2 and "not a" in res.output


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sampling as a string", "alias bomb", "duplicate key",
                                  "not UTF-8", "output.path as a number"])
def test_a_real_subprocess_prints_no_traceback_for_a_bad_job_file(tmp_path: Path, base: dict,
                                                                  name: str) -> None:
    _, edit, args, words = next(c for c in JOB_CASES if c[0] == name)
    job = tmp_path / "job.yaml"
    if callable(edit):
        d = copy.deepcopy(base)
        edit(d)
        job.write_text(yaml.safe_dump(d, sort_keys=False))
    elif edit is None:
        job.write_text(yaml.safe_dump(base, sort_keys=False) + "model: other\n")
    else:
        job.write_bytes(edit if isinstance(edit, bytes) else edit.encode())
    res = subprocess.run(cli(job, *args), env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert words in res.stderr and "Traceback" not in res.stderr + res.stdout
