"""Tensor parallelism on CPU (gloo ranks, real processes): the same float32 greedy outputs and
log-probs as one rank, through LLM and through jobs, and what a user sees when a size cannot split
the model or a rank dies."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pytest

from batchllm import LLM, SamplingParams
from batchllm.config import ConfigError
from batchllm.jobs import run_job
from tests.cli.helpers import chunk_rows, cli, env, wait_for_chunks, write_job
from tests.e2e.test_generate import VOCAB, make_prompts

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)


def run(model_dir: Path, prompts, tp: int = 1, **kw) -> list:
    llm = LLM(str(model_dir), dtype="float32", device="cpu", tensor_parallel_size=tp, **kw)
    try:
        return llm.generate(prompts, PARAMS)
    finally:
        llm.shutdown()


def assert_same(one: list, other: list) -> None:
    for a, b in zip(one, other, strict=True):
        a, b = a.outputs[0], b.outputs[0]
        assert b.token_ids == a.token_ids
        assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-4)
        for ta, tb in zip(a.logprobs, b.logprobs, strict=True):
            assert sorted(tb) == sorted(ta)
            assert [tb[k].logprob for k in sorted(ta)] == \
                pytest.approx([ta[k].logprob for k in sorted(ta)], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma3"])
def test_two_ranks_give_the_outputs_and_logprobs_of_one(tiny_model_factory, family):
    model = tiny_model_factory(family)
    prompts = make_prompts(VOCAB, [5, 17, 9, 30], seed=41)
    assert_same(run(model, prompts), run(model, prompts, tp=2))


@pytest.mark.slow
def test_rounds_async_steps_and_preemption_under_two_ranks(tiny_model_dir):
    """Decode rounds and plans made ahead feed sampled tokens to every rank; a cache too small
    for all requests preempts (recompute and swap) on every rank alike."""
    prompts = make_prompts(VOCAB, [5, 17, 9, 30, 12, 21], seed=42)
    kw = dict(num_decode_steps=4, async_scheduling=True, num_gpu_blocks_override=12, block_size=4,
              preemption_mode="auto", swap_threshold_tokens=20)
    want = run(tiny_model_dir, prompts)
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompts, PARAMS)
        stats = llm.stats()
    finally:
        llm.shutdown()
    assert_same(want, got)
    assert stats["num_preemptions"] > 0 and stats["num_multi_step_rounds"] > 0
    assert stats["num_chained_steps"] + stats["num_chained_rounds"] > 0


@pytest.mark.slow
def test_four_ranks_replicate_the_two_kv_heads(tiny_model_dir):
    prompts = make_prompts(VOCAB, [7, 19], seed=43)
    assert_same(run(tiny_model_dir, prompts), run(tiny_model_dir, prompts, tp=4))


def test_a_size_that_does_not_divide_the_heads_is_refused_before_loading(tiny_model_dir):
    with pytest.raises(ConfigError) as info:
        LLM(str(tiny_model_dir), device="cpu", tensor_parallel_size=3)
    message = str(info.value)
    assert "tensor_parallel_size=3" in message and "4 attention heads" in message
    assert "e.g. 1, 2, 4" in message


@pytest.mark.slow
def test_default_model_runs_a_job_on_three_ranks_and_refuses_two(tmp_path, smollm2_dir):
    """SmolLM2-135M has 9 attention heads and 3 KV heads: 3 ranks split it, 2 cannot."""
    one = tmp_path / "one"
    one.mkdir()
    run_job(write_job(one, smollm2_dir, rows=4, max_tokens=6))
    three = tmp_path / "three"
    three.mkdir()
    result = run_job(write_job(three, smollm2_dir, rows=4, max_tokens=6),
                     **{"engine.tensor_parallel_size": 3})
    assert result.summary["rows"] == 5 and result.summary["errors"] == 1  # the malformed line
    assert chunk_rows(three / "out").equals(chunk_rows(one / "out"))
    two = tmp_path / "two"
    two.mkdir()
    refused = subprocess.run(cli(write_job(two, smollm2_dir, rows=4), "--set",
                                 "engine.tensor_parallel_size=2"), env=env(), capture_output=True,
                             text=True)
    assert refused.returncode == 2, refused.stderr
    assert "9 attention heads" in refused.stderr and "not divisible by 2" in refused.stderr
    assert "Traceback" not in refused.stderr


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, depth) of every live process below `pid`."""
    out, frontier = [], [(pid, 0)]
    while frontier:
        parent, depth = frontier.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            for child in (task / "children").read_text().split():
                out.append((int(child), depth + 1))
                frontier.append((int(child), depth + 1))
    return out


def spawned(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
def test_two_replicas_of_two_ranks_equal_one_engine_even_when_a_rank_is_killed(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """DP 2 × TP 2: the rows of one single-engine run, each once; a killed rank > 0 takes its
    replica down, whose unit the other replica redoes from its committed chunks."""
    job_args = dict(rows=47, max_tokens=8, unit_rows=6, max_num_seqs=2)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    run_job(write_job(ref_dir, tiny_model_dir, **job_args))
    reference: pa.Table = chunk_rows(ref_dir / "out")
    work = tmp_path / "dp-tp"
    work.mkdir()
    job, out = write_job(work, tiny_model_dir, **job_args), work / "out"
    p = subprocess.Popen(cli(job, "--set", "engine.data_parallel_size=2", "--set",
                             "engine.tensor_parallel_size=2"),
                         env=env(BATCHLLM_DIST_TIMEOUT_S="60"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for_chunks(out, 2, p, timeout=240)
    ranks = [pid for pid, depth in descendants(p.pid) if depth == 2 and spawned(pid)]
    assert len(ranks) == 2, descendants(p.pid)  # one rank > 0 per replica
    os.kill(ranks[0], signal.SIGKILL)
    stdout, stderr = p.communicate(timeout=400)
    assert p.returncode == 0, stderr
    assert "go back to the queue" in stderr
    got = chunk_rows(out)
    assert got["id"].to_pylist() == reference["id"].to_pylist()  # none lost, none twice
    assert got.equals(reference)
    time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{pid}") and spawned(pid) for pid in ranks)
