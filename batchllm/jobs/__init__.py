"""Jobs: job.yaml -> work units -> engine -> committed Arrow chunks, with exactly-once resume."""
from __future__ import annotations

from batchllm.jobs.api import JobResult, run_job, validate_job
from batchllm.jobs.errors import JobError
from batchllm.jobs.finalize import finalize
from batchllm.jobs.spec import JobSpec, load_spec

__all__ = ["run_job", "validate_job", "JobSpec", "JobResult", "JobError", "finalize", "load_spec"]
