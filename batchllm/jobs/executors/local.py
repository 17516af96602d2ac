"""LocalExecutor: the whole job in this process, through one engine (data_parallel_size 1)."""
from __future__ import annotations

from typing import Callable

from batchllm.jobs.checkpoint import Committed
from batchllm.jobs.engine_api import EngineLike, build_engine
from batchllm.jobs.executor import JobExecutor
from batchllm.jobs.executors.base import Executor, RunContext, RunReport
from batchllm.jobs.prepare import JobPlan
from batchllm.jobs.preprocess import Preprocessor
from batchllm.jobs.progress import event_hook, progress_callback
from batchllm.jobs.spec import JobSpec


class LocalExecutor(Executor):
    """Runs the units in plan order with `engine`, or one built (once work remains) by
    `engine_factory(spec)` (default: build_engine)."""

    def __init__(self, engine: EngineLike | None = None,
                 engine_factory: Callable[[JobSpec], EngineLike] | None = None) -> None:
        self.engine, self.engine_factory = engine, engine_factory
        self._loop: JobExecutor | None = None

    def run(self, plan: JobPlan, committed: Committed, ctx: RunContext) -> RunReport:
        spec = plan.spec
        built = self.engine is None
        if built:
            self.engine = (self.engine_factory(spec) if self.engine_factory is not None else
                           build_engine(spec, on_phase=event_hook(ctx.progress)))  # loading lines
        engine = self.engine
        prep = Preprocessor.for_job(spec, plan.shards, engine.tokenizer, engine.max_model_len)
        self._loop = JobExecutor(
            shards=plan.shards, units=plan.units, committed=committed, engine=engine, prep=prep,
            schema=plan.schema, folder=ctx.folder, chunk_rows=spec.output.chunk_rows,
            commit_interval_s=spec.output.commit_interval_s, max_num_seqs=spec.max_num_seqs,
            stop=ctx.stop, on_progress=progress_callback(ctx.progress, ctx.rows_before,
                                                         plan.rows_total, engine.stats))
        try:
            with ctx.progress:
                self._loop.run()
        finally:
            if built and hasattr(engine, "shutdown"):
                engine.shutdown()  # tensor-parallel ranks stop with the job
        return self.report()

    def report(self) -> RunReport:
        return RunReport(self._loop.figures) if self._loop is not None else RunReport()
