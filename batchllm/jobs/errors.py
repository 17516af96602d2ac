"""Job-level errors: each names the file, key or column at fault and carries the CLI exit code."""
from __future__ import annotations


class JobError(Exception):
    """A job could not run or finish; `exit_code` is what `batchllm run` exits with.

    `committed` is (rows committed, rows in the job) when the failure came after work began.
    """

    exit_code = 1
    committed: tuple[int, int] | None = None


class JobSpecError(JobError):
    """job.yaml (or the dict / overrides given to run_job) is invalid: bad key, type or value."""

    exit_code = 2


class JobInputError(JobError):
    """An input file is missing or unreadable, or lacks a column the job names."""

    exit_code = 2


class JobModelError(JobError):
    """The model named in the job cannot be found."""

    exit_code = 2


class OutputFolderError(JobError):
    """The output folder holds a different job, is locked by another run, or cannot be written."""

    exit_code = 2


class OutputWriteError(JobError):
    """A chunk could not be written (disk full, permissions, read-only); committed chunks are intact."""

    exit_code = 1


class EngineFailed(JobError):
    """The engine raised from step(); finished rows were committed, the rest is redone on rerun."""

    exit_code = 1


class JobInterrupted(JobError):
    """SIGINT / SIGTERM stopped the job after committing finished rows; rerun to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
