"""report.html: a job's figures and plots in one self-contained page (inline SVG drawn by
matplotlib's Agg/SVG backend), from summary.json, metrics.jsonl and the committed chunks.

Written at the end of every run and by `batchllm report OUT`. matplotlib is the `report` extra: a
job runs without it, and the run says how to install it instead of writing the report.
"""
from __future__ import annotations

import html
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchllm.io.writers import read_arrow, write_text_atomic
from batchllm.jobs.checkpoint import CHUNKS
from batchllm.jobs.monitor import METRICS
from batchllm.jobs.summary import read_summary

REPORT = "report.html"
INSTALL = "pip install \"batchllm[report]\" (or: pip install matplotlib)"
MAX_POINTS = 2000  # time series are thinned to about this many points


class ReportUnavailable(RuntimeError):
    """The plotting library is missing; the message says how to install it."""


@dataclass(slots=True)
class ReportData:
    summary: dict[str, Any] | None
    samples: list[dict[str, Any]]  # metrics.jsonl, every run
    # length -> rows of that length (a count per distinct length: memory stays flat however
    # many rows the job has)
    prompt_lengths: Counter = field(default_factory=Counter)  # per input row
    output_lengths: Counter = field(default_factory=Counter)  # per output row (sample)
    finish_reasons: Counter = field(default_factory=Counter)
    errors: dict[str, list[Any]] = field(default_factory=dict)  # pattern -> [count, example]


def write_report(folder: Path) -> Path:
    """Write `folder/report.html`; raises ReportUnavailable without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportUnavailable(f"report.html not written: it needs matplotlib, which is not "
                                f"installed; {INSTALL}, then `batchllm report {folder}`. The "
                                "job's results are unaffected.") from None
    path = folder / REPORT
    write_text_atomic(path, render(gather(folder), title=str(folder)))
    return path


# -- data ---------------------------------------------------------------------------------------

def read_samples(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's samples; a torn last line (a killed run) is skipped."""
    try:
        lines = (folder / METRICS).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            s = json.loads(line)
        except ValueError:
            continue
        if isinstance(s, dict) and isinstance(s.get("elapsed_s"), (int, float)):
            out.append(s)
    return out


def gather(folder: Path) -> ReportData:
    data = ReportData(read_summary(folder), read_samples(folder))
    cols = ["num_prompt_tokens", "num_output_tokens", "finish_reason", "error"]
    for path in sorted((folder / CHUNKS).glob("*.arrow")):
        try:
            t = read_arrow(path)
        except (pa.ArrowInvalid, OSError):
            continue  # set aside and redone by the next run
        samples = "sample_index" in t.column_names
        t = t.select(cols + (["sample_index"] if samples else []))  # (text, token ids: unread)
        first = t.filter(pc.equal(t["sample_index"], 0)) if samples else t
        _count(data.prompt_lengths, first["num_prompt_tokens"])
        _count(data.output_lengths, t["num_output_tokens"])
        for item in pc.value_counts(t["finish_reason"]).to_pylist():
            data.finish_reasons[item["values"] or "none"] += item["counts"]
        _count_errors(data.errors, first["error"].drop_null())
    return data


def _timeline(samples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Samples split by run, each with `x`: seconds of job time (earlier runs' time added)."""
    runs: list[list[dict[str, Any]]] = []
    offset = 0.0
    for s in samples:
        last = runs[-1][-1] if runs else None
        if last is None or s.get("run") != last.get("run") or s["elapsed_s"] < last["_e"]:
            if runs:
                offset += runs[-1][-1]["_e"]
            runs.append([])
        runs[-1].append({**s, "_e": s["elapsed_s"], "x": offset + s["elapsed_s"]})
    step = max(1, sum(map(len, runs)) // MAX_POINTS)
    return [r[::step] + ([r[-1]] if (len(r) - 1) % step else []) for r in runs]


# -- plots --------------------------------------------------------------------------------------

def _figure(height: float = 2.8, rows: int = 1) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, height), layout="constrained")
    return fig, [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]


def _svg(fig: Any, key: str) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": key}):
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg[svg.index("<svg"):], flags=re.S)
    # several SVGs share one document: keep their internal ids (clip paths) apart
    return (svg.replace('id="', f'id="{key}-').replace("url(#", f"url(#{key}-")
            .replace('href="#', f'href="#{key}-'))


def _unit(runs: list[list[dict[str, Any]]]) -> tuple[float, str]:
    span = runs[-1][-1]["x"]
    return (1.0, "seconds") if span < 180 else (60.0, "minutes") if span < 3 * 3600 else \
        (3600.0, "hours")


def _series(ax: Any, runs: list[list[dict[str, Any]]], key: str, scale: float = 1.0) -> None:
    div, unit = _unit(runs)
    for i, r in enumerate(runs):
        ax.plot([s["x"] / div for s in r], [float(s.get(key) or 0) * scale for s in r],
                color="C0", lw=1.2, marker="." if len(r) < 30 else None)
        if i:
            ax.axvline(r[0]["x"] / div, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"{unit} of job time" + (" (dotted: a resumed run starts)" if len(runs) > 1
                                            else ""))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _time_plots(runs: list[list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    fig, (ax,) = _figure()
    _series(ax, runs, "tokens_per_s")
    ax.set_title("Throughput: output tokens per second")
    ax.set_ylabel("tokens/s")
    out = [("throughput", "Throughput over time", _svg(fig, "throughput"))]
    fig, (kv, batch) = _figure(4.6, rows=2)
    _series(kv, runs, "kv_cache_usage", 100.0)
    kv.set_title("KV-cache use")
    kv.set_ylabel("% of blocks")
    kv.set_ylim(0, 105)
    _series(batch, runs, "num_running")
    batch.set_title("Batch size: requests running")
    batch.set_ylabel("requests")
    out.append(("kv-batch", "KV-cache use and batch size over time", _svg(fig, "kv-batch")))
    fig, (pre, hits) = _figure(4.6, rows=2)
    _series(pre, runs, "preemptions")
    pre.set_title("Preemptions (cumulative, per run)")
    pre.set_ylabel("preemptions")
    _series(hits, runs, "prefix_hit_rate", 100.0)
    hits.set_title("Prefix-cache hit rate (cumulative, per run)")
    hits.set_ylabel("% of prompt tokens")
    hits.set_ylim(0, 105)
    out.append(("preemptions-prefix", "Preemptions and prefix-cache hits over time",
                _svg(fig, "preemptions-prefix")))
    return out


def _count_errors(errors: dict[str, list[Any]], messages: pa.ChunkedArray) -> None:
    """Add messages to pattern -> [rows, an example] (in Arrow: a job of error rows stays flat)."""
    if not len(messages):
        return
    patterns = pc.replace_substring_regex(messages, pattern="[0-9]+", replacement="#")
    for item in pc.value_counts(patterns).to_pylist():
        entry = errors.get(item["values"])
        if entry is None:
            example = messages[pc.index(patterns, item["values"]).as_py()].as_py()
            entry = errors[item["values"]] = [0, example]
        entry[0] += item["counts"]


def _count(counter: Counter, column: pa.ChunkedArray) -> None:
    """Add a column's non-null values to a value -> count Counter."""
    for item in pc.value_counts(column.drop_null()).to_pylist():
        counter[item["values"]] += item["counts"]


def _histogram(values: Counter, key: str, title: str) -> tuple[str, str, str]:
    fig, (ax,) = _figure()
    lengths = sorted(values)
    ax.hist(lengths, weights=[values[n] for n in lengths], bins=min(50, max(1, len(lengths))),
            color="C0")
    ax.set_title(title)
    ax.set_xlabel("tokens")
    ax.set_ylabel("rows")
    ax.grid(alpha=0.3)
    return key, title, _svg(fig, key)


def _bars(counts: list[tuple[str, int]], key: str, title: str) -> tuple[str, str, str]:
    fig, (ax,) = _figure(max(1.6, 0.45 * len(counts) + 1.0))
    labels = [c if len(c) <= 60 else c[:57] + "..." for c, _ in counts][::-1]
    ax.barh(labels, [n for _, n in counts][::-1], color="C1")
    ax.set_title(title)
    ax.set_xlabel("rows")
    return key, title, _svg(fig, key)


def plots(data: ReportData) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(key, caption, svg) of each plot, and a line for each one without data."""
    out, missing = [], []
    runs = _timeline(data.samples)
    if runs:
        out += _time_plots(runs)
    else:
        missing.append(f"No engine samples ({METRICS} is empty or missing): the time series "
                       "appear once a run has sampled its engine.")
    if data.prompt_lengths:
        out.append(_histogram(data.prompt_lengths, "prompt-lengths", "Prompt length (tokens)"))
        out.append(_histogram(data.output_lengths, "output-lengths", "Output length (tokens)"))
        out.append(_bars(data.finish_reasons.most_common(), "finish-reasons", "Finish reasons"))
    else:
        missing.append("No committed rows yet: no length histograms or finish reasons.")
    if data.errors:
        top = sorted(data.errors.items(), key=lambda kv: -kv[1][0])[:15]
        out.append(_bars([(p, n) for p, (n, _) in top], "errors", "Error rows by message"))
    return out, missing


# -- the page -----------------------------------------------------------------------------------

_FIGURES = [("status", "status"), ("rows", "rows"), ("rows_total", "rows in the input"),
            ("errors", "error rows"), ("skipped", "skipped rows"),
            ("output_tokens", "output tokens"), ("prompt_tokens", "prompt tokens"),
            ("cached_tokens", "prompt tokens from the prefix cache"),
            ("prefix_cache_hit_rate", "prefix-cache hit rate"), ("preemptions", "preemptions"),
            ("elapsed_s", "elapsed (last run that did work), s"),
            ("elapsed_s_all_runs", "elapsed, all runs, s"), ("runs", "runs")]

_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;
text-align:left}td.n{text-align:right}figure{margin:1.5rem 0}figcaption{font-weight:600}
svg{max-width:100%;height:auto}"""

# Proof of rendering for a headless browser: counts the plots laid out with a size.
_CHECK = """<script>(function(){var f=document.querySelectorAll("figure.plot"),ok=0;
f.forEach(function(x){var s=x.querySelector("svg");if(s){var r=s.getBoundingClientRect();
if(r.width>0&&r.height>0)ok++;}});document.body.setAttribute("data-plots-rendered",ok+"/"+f.length);
})();</script>"""


def _figures_table(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "<p>No summary.json yet (the job has not finished a run).</p>"
    rows = [(label, summary[k]) for k, label in _FIGURES if k in summary]
    tp = summary.get("throughput") or {}
    rows += [(f"throughput: {k.replace('_', ' ')}", v) for k, v in tp.items()]
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td class=n>{html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f'<table id="figures">{body}</table>'


def _errors_table(errors: dict[str, list[Any]]) -> str:
    if not errors:
        return '<p id="no-errors">No error rows.</p>'
    body = "".join(f"<tr><td class=n>{n}</td><td>{html.escape(example)}</td></tr>"
                   for _, (n, example) in sorted(errors.items(), key=lambda kv: -kv[1][0]))
    return (f'<table id="error-table"><tr><th>rows</th><th>message (one example; rows differing '
            f"only in numbers are grouped)</th></tr>{body}</table>")


def render(data: ReportData, title: str) -> str:
    figs, missing = plots(data)
    notices = "".join(f"<li>{html.escape(n)}</li>" for n in (data.summary or {}).get("notices", []))
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>batchllm report: "
             f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>batchllm job report</h1><p>{html.escape(title)}</p>",
             "<h2>Figures</h2>", _figures_table(data.summary)]
    if notices:
        parts.append(f"<h2>Notices</h2><ul>{notices}</ul>")
    parts.append("<h2>Plots</h2>")
    parts += [f"<p class=missing>{html.escape(m)}</p>" for m in missing]
    parts += [f'<figure class="plot" id="plot-{k}"><figcaption>{html.escape(c)}</figcaption>{svg}'
              "</figure>" for k, c, svg in figs]
    parts += ["<h2>Error rows by message</h2>", _errors_table(data.errors), _CHECK,
              "</body></html>"]
    return "\n".join(parts)
