"""A CPU stand-in for the model runner that really keeps K/V blocks, so sharing bugs show up.

Each GPU/CPU block slot stores the token written at that position. A sampled token is a
deterministic function of the context *read back through the block table* (and the sample's
seed), so a block that was overwritten, copied wrongly or swapped back wrongly changes the output.
"""
from __future__ import annotations

from batchllm.core.outputs import RunnerOutput, SchedulerOutput


def next_token(context: list[int], seed: int | None, vocab: int) -> int:
    """The 'model': next token of a context (stable within a process)."""
    return hash((tuple(context), seed)) % vocab


def reference_output(prompt: list[int], seed: int | None, vocab: int, max_tokens: int,
                     eos: int | None = None, min_tokens: int = 0, max_len: int = 10**9) -> list[int]:
    """What an unpressured engine must produce: greedy decoding of `next_token`."""
    out: list[int] = []
    while len(out) < max_tokens and len(prompt) + len(out) < max_len:
        tok = next_token(prompt + out, seed, vocab)
        out.append(tok)
        if tok == eos and len(out) >= min_tokens:
            break
    return out


class FakeRunner:
    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int,
                 vocab: int = 1000) -> None:
        self.bs = block_size
        self.vocab = vocab
        self.gpu: list[list[int | None]] = [[None] * block_size for _ in range(num_gpu_blocks)]
        self.cpu: list[list[int | None]] = [[None] * block_size for _ in range(num_cpu_blocks)]
        self.seeds: dict[str, int | None] = {}
        self.num_steps = 0

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        self.num_steps += 1
        for rid in plan.finished_req_ids:
            self.seeds.pop(rid, None)
        for new in plan.new_requests:
            assert new.req_id not in self.seeds, f"NewRequestData sent twice for {new.req_id}"
            self.seeds[new.req_id] = new.seed
        # A batched copy must not read a block that another copy of the same step writes.
        assert not {s for s, _ in plan.copy_blocks} & {d for _, d in plan.copy_blocks}
        assert not {c for _, c in plan.swap_out} & {c for c, _ in plan.swap_in}
        assert len({d for _, d in plan.copy_blocks}) == len(plan.copy_blocks)
        for g, c in plan.swap_out:
            self.cpu[c] = list(self.gpu[g])
        for c, g in plan.swap_in:
            self.gpu[g] = list(self.cpu[c])
        for s, d in plan.copy_blocks:
            self.gpu[d] = list(self.gpu[s])
        ids = [c.req_id for c in plan.chunks]
        assert len(ids) == len(set(ids)), "a request appears twice in one step"
        if plan.num_steps > 1:
            return self._multi_step(plan)
        for c in plan.chunks:  # write K/V of every chunk (as a layer does before attention)
            assert c.req_id in self.seeds, f"{c.req_id} scheduled before its NewRequestData"
            end = c.num_computed_tokens + len(c.token_ids)
            assert len(c.block_table) >= -(-end // self.bs), "block table too short for the chunk"
            for i, tok in enumerate(c.token_ids):
                p = c.num_computed_tokens + i
                self.gpu[c.block_table[p // self.bs]][p % self.bs] = tok
        out = RunnerOutput()
        for c in plan.chunks:
            if not c.sample:
                continue
            end = c.num_computed_tokens + len(c.token_ids)
            ctx = [self.gpu[c.block_table[p // self.bs]][p % self.bs] for p in range(end)]
            out.req_ids.append(c.req_id)
            out.token_ids.append([next_token(ctx, self.seeds[c.req_id], self.vocab)])
        return out

    def launch(self, plan: SchedulerOutput, prev: tuple | None = None) -> tuple:
        """Async scheduling's launch: runs the plan now (the device would run it before any plan
        queued later) and keeps each sampled row's last token for the plan after it."""
        if plan.prev_rows is not None:
            assert prev is not None, "a plan with placeholder inputs needs the plan before it"
            assert len(plan.prev_rows) == len(plan.chunks)
            last = prev[1]
            for c, row in zip(plan.chunks, plan.prev_rows):
                if row < 0:
                    assert -1 not in c.token_ids, "an unfed chunk carries its tokens"
                    continue
                assert c.token_ids[-1] == -1 and -1 not in c.token_ids[:-1], \
                    "only a chunk's last input comes from the device"
                c.token_ids = c.token_ids[:-1] + [last[row]]
        else:
            assert all(-1 not in c.token_ids for c in plan.chunks)
        out = self.execute(plan)
        sampled = [c for c in plan.chunks if c.sample]
        assert len(sampled) == len(out.token_ids)
        return out, [toks[c.num_steps - 1] for toks, c in zip(out.token_ids, sampled)]

    def collect(self, handle: tuple) -> RunnerOutput:
        return handle[0]

    def _multi_step(self, plan: SchedulerOutput) -> RunnerOutput:
        """Several decode steps: each sub-step writes the token fed in and samples from the
        context read back through the block table; a request stops after its num_steps."""
        out = RunnerOutput()
        for c in plan.chunks:
            assert len(c.token_ids) == 1 and c.sample and 1 <= c.num_steps <= plan.num_steps
            end = c.num_computed_tokens + c.num_steps
            assert len(c.block_table) >= -(-end // self.bs), "block table too short for the round"
            tok, tokens = c.token_ids[0], []
            for i in range(c.num_steps):
                p = c.num_computed_tokens + i
                self.gpu[c.block_table[p // self.bs]][p % self.bs] = tok
                ctx = [self.gpu[c.block_table[q // self.bs]][q % self.bs] for q in range(p + 1)]
                tok = next_token(ctx, self.seeds[c.req_id], self.vocab)
                tokens.append(tok)
            out.req_ids.append(c.req_id)
            out.token_ids.append(tokens)
        return out
