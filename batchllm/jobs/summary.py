"""summary.json: totals over the committed chunks (the truth) plus the speed figures of the last
run that did work (a rerun with nothing left to do keeps them)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchllm.io.storage import Storage, open_storage
from batchllm.jobs.checkpoint import CHUNKS, SUMMARY
from batchllm.jobs.executor import RunFigures

_COLUMNS = ["error", "finish_reason", "num_prompt_tokens", "num_output_tokens", "num_cached_tokens",
            "sample_index", "structured_output_valid"]  # what the totals read (the last two: if any)


def committed_totals(folder: "Storage | Path") -> dict[str, int]:
    """Rows, errors and tokens over every committed chunk (one input row may have n sample rows)."""
    store = open_storage(folder)
    t = {"rows": 0, "output_rows": 0, "errors": 0, "skipped": 0, "prompt_tokens": 0,
         "output_tokens": 0, "cached_tokens": 0, "ended_at_first_token": 0}
    for name in (n for n in store.list(CHUNKS) if n.endswith(".arrow")):
        table = store.read_arrow(f"{CHUNKS}/{name}", _COLUMNS, missing_ok=True)
        first = (pc.equal(table["sample_index"], 0) if "sample_index" in table.column_names
                 else None)
        per_row = table.filter(first) if first is not None else table
        t["rows"] += per_row.num_rows
        t["output_rows"] += table.num_rows
        t["errors"] += per_row.num_rows - per_row["error"].null_count
        t["skipped"] += pc.sum(pc.equal(per_row["finish_reason"], "skipped")).as_py() or 0
        t["prompt_tokens"] += pc.sum(per_row["num_prompt_tokens"]).as_py() or 0
        t["output_tokens"] += pc.sum(table["num_output_tokens"]).as_py() or 0
        t["cached_tokens"] += pc.sum(per_row["num_cached_tokens"]).as_py() or 0
        t["ended_at_first_token"] += _ended_at_first_token(per_row)
    return t


def _ended_at_first_token(rows: pa.Table) -> int:
    """Rows whose answer stopped at its first token (end-of-sequence or a stop at once), not
    counting constrained rows (a one-token choice is a whole answer)."""
    first = pc.and_(pc.equal(rows["finish_reason"], "stop"),
                    pc.less_equal(rows["num_output_tokens"], 1))
    if "structured_output_valid" in rows.column_names:
        first = pc.and_(first, pc.is_null(rows["structured_output_valid"]))
    return pc.sum(first).as_py() or 0


def summary_warnings(summary: dict[str, Any]) -> list[str]:
    """What a user should hear about the job's results: most rows ending at their first token
    (empty answers) usually means an instruct model got prompts without its chat template."""
    ran = summary.get("rows", 0) - summary.get("errors", 0) - summary.get("skipped", 0)
    empty = summary.get("ended_at_first_token", 0)
    if ran <= 0 or empty * 2 <= ran:
        return []
    return [f"{empty} of {ran} rows ended at their first token (empty answers). An instruct model "
            "given a prompt outside its chat template often answers with end-of-sequence at "
            "once: set input.chat_template: true (or auto, the default, with a model whose "
            "tokenizer has a template), give input.system_prompt, or use a messages column"]


def combine_figures(parts: list[RunFigures], elapsed_s: float) -> RunFigures:
    """Figures of several engine replicas as one run: counts and engine counters summed, KV-cache
    usage averaged, `elapsed_s` the wall time they shared (so throughput is over wall time)."""
    total = RunFigures(elapsed_s=elapsed_s)
    stats: dict[str, Any] = {}
    for f in parts:
        total.rows += f.rows
        total.errors += f.errors
        total.prompt_tokens += f.prompt_tokens
        total.output_tokens += f.output_tokens
        for k, v in f.engine_stats.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                stats[k] = stats.get(k, 0) + v
    if "kv_cache_usage" in stats:
        stats["kv_cache_usage"] /= max(1, sum("kv_cache_usage" in f.engine_stats for f in parts))
    total.engine_stats = stats
    return total


def build_summary(folder: "Storage | Path", rows_total: int, run: RunFigures, previous: dict[str, Any] | None,
                  status: str, workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`workers`: one record per data-parallel replica (added as `data_parallel`), if any. A run
    that finished no row (a rerun of a finished job, a stop before the first row) keeps the
    previous summary's speed figures: they describe the last run that did work."""
    totals = committed_totals(folder)
    prev_elapsed = float((previous or {}).get("elapsed_s_all_runs", 0.0))
    runs = int((previous or {}).get("runs", 0))
    kept = ("elapsed_s", "this_run", "throughput", "prefix_cache_hit_rate", "preemptions",
            "data_parallel")
    if run.rows == 0 and previous is not None and "throughput" in previous:
        return {"status": status, "rows_total": rows_total, **totals,
                "elapsed_s_all_runs": round(prev_elapsed + run.elapsed_s, 3), "runs": runs,
                **{k: previous[k] for k in kept if k in previous},
                "figures_from_run": previous.get("figures_from_run", runs)}
    stats = run.engine_stats
    queries = stats.get("prefix_cache_queries") or 0
    elapsed = max(run.elapsed_s, 1e-9)
    return {
        "status": status,  # complete | interrupted | failed
        "rows_total": rows_total,
        **totals,
        "elapsed_s": round(run.elapsed_s, 3),
        "elapsed_s_all_runs": round(prev_elapsed + run.elapsed_s, 3),
        "runs": runs + 1,
        "figures_from_run": runs + 1,  # the run elapsed_s, this_run and throughput describe
        "this_run": {"rows": run.rows, "errors": run.errors, "prompt_tokens": run.prompt_tokens,
                     "output_tokens": run.output_tokens},
        "throughput": {"rows_per_s": round(run.rows / elapsed, 3),
                       "output_tokens_per_s": round(run.output_tokens / elapsed, 3),
                       "total_tokens_per_s": round((run.prompt_tokens + run.output_tokens) / elapsed,
                                                   3)},
        "prefix_cache_hit_rate": round((stats.get("prefix_cache_hits") or 0) / queries, 4)
        if queries else 0.0,
        "preemptions": int(stats.get("num_preemptions") or 0),
        **({"data_parallel": {"size": len(workers), "workers": workers}} if workers else {}),
    }


def read_summary(folder: "Storage | Path") -> dict[str, Any] | None:
    try:
        return json.loads(open_storage(folder).read(SUMMARY))
    except (OSError, ValueError):
        return None


def write_summary(folder: "Storage | Path", summary: dict[str, Any]) -> None:
    open_storage(folder).write_text(SUMMARY, json.dumps(summary, indent=2))
