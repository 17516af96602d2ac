"""Pre-flight: everything that can fail a job is checked here, before any model work.

Model present and its files whole, the engine's device present, input shards readable and
digested, the named columns present, ids unique (unless input.duplicate_ids: allow; an OpenAI
batch's custom_ids always), output schema decided.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from batchllm.io.digests import InputChanged
from batchllm.io.hf_dataset import dataset_shard
from batchllm.io.readers import InputError, Shard, find_input_files, input_columns, memory_shard, \
    open_shards
from batchllm.io.schema import kept_fields, output_schema
from batchllm.jobs.errors import JobInputError, JobSpecError
from batchllm.jobs.input_scan import scan_inputs
from batchllm.jobs.model_check import check_architecture, check_model
from batchllm.jobs.plan import WorkUnit, plan_units
from batchllm.jobs.spec import JobSpec


@dataclass(slots=True)
class JobPlan:
    spec: JobSpec
    shards: list[Shard]
    units: list[WorkUnit]
    schema: pa.Schema

    @property
    def rows_total(self) -> int:
        return sum(s.num_rows for s in self.shards)


def plan_job(spec: JobSpec) -> JobPlan:
    where = spec.source or "job"
    check_device(spec)
    check_model(spec.model, where)
    check_architecture(spec.model, where, spec.engine.get("model_impl", "auto"),
                       bool(spec.engine.get("trust_remote_code", False)),
                       int(spec.engine.get("tensor_parallel_size", 1)))
    if spec.tokenizer is not None:
        check_model(spec.tokenizer, where)
    try:
        if spec.input.data is not None:
            shards = [memory_shard(spec.input.data)]
        elif spec.input.dataset is not None:
            shards = [dataset_shard(spec.input.dataset)]
        else:
            shards = open_shards(find_input_files(str(spec.input.path),
                                                  spec.input.storage_options), spec.input.format)
        _check_columns(spec, shards, where)
        _finish_openai_defaults(spec, shards)
        openai = any(s.format == "openai-batch" for s in shards)
        id_column = spec.input.id_column or ("custom_id" if openai else None)
        # OpenAI batch output lines are matched to requests by custom_id: always unique
        unique = spec.input.duplicate_ids == "refuse" or (openai and not spec.input.id_column)
        scan = scan_inputs(shards, id_column if unique else None, spec.output.keep_columns)
    except (InputError, InputChanged) as e:
        raise JobInputError(f"{where}: {e}") from None
    except (OSError, pa.ArrowInvalid) as e:
        raise JobInputError(f"{where}: cannot read the input: {e}") from None
    if scan.duplicate is not None:
        allow = ("OpenAI batch requests need unique custom_ids (input.duplicate_ids: allow does "
                 "not apply)" if spec.input.duplicate_ids == "allow" else
                 "or set input.duplicate_ids: allow to accept them")
        raise JobInputError(
            f"{where}: input.id_column {id_column!r}: {scan.duplicate.describe()}. Output rows are "
            f"matched to inputs by id, so ids must be unique: fix the input, {allow}.")
    params = spec.sampling_params()
    schema = output_schema(kept_fields(scan.kept_types, spec.output.keep_columns),
                           top_logprobs=bool(params.logprobs), samples=params.n > 1,
                           openai=openai and not (spec.input.prompt_column or
                                                  spec.input.messages_column or
                                                  spec.input.token_ids_column))
    units = plan_units([s.num_rows for s in shards], spec.output.unit_rows)
    return JobPlan(spec, shards, units, schema)


def check_device(spec: JobSpec) -> None:
    """engine.device names a device this machine has (a Ray job's replicas find theirs on the
    cluster, so it is not checked here)."""
    device = str(spec.engine.get("device", "auto"))
    if spec.executor == "ray" or not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":", 1)[1]) if ":" in device and device.split(":", 1)[1].isdigit() \
        else 0
    if count == 0:
        raise JobSpecError(f"{spec.source or 'job'}: engine.device={device!r} but this machine has "
                           "no CUDA device (torch.cuda.is_available() is false"
                           f"{'' if torch.version.cuda else '; this torch is a CPU build'}); "
                           "use engine.device: cpu, or auto")
    if index >= count:
        raise JobSpecError(f"{spec.source or 'job'}: engine.device={device!r} but only {count} "
                           f"CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")


def _finish_openai_defaults(spec: JobSpec, shards: list[Shard]) -> None:
    """OpenAI batch input + output: keep `url` so the output lines say chat or completion."""
    if spec.output.format == "openai-batch" and any(s.format == "openai-batch" for s in shards):
        if "url" not in spec.output.keep_columns:
            spec.output.keep_columns = [*spec.output.keep_columns, "url"]


def _check_columns(spec: JobSpec, shards: list[Shard], where: str) -> None:
    inp = spec.input
    for shard in shards:
        try:
            cols = input_columns(shard)
        except (OSError, pa.ArrowInvalid) as e:
            raise JobInputError(f"{where}: {shard.name}: cannot read: {e}") from None
        if not cols:
            continue  # empty, or every sampled line malformed: each becomes an error row
        if shard.format == "openai-batch" and not (inp.prompt_column or inp.messages_column
                                                   or inp.token_ids_column):
            needed = [("input.id_column", inp.id_column)] if inp.id_column else []
            if not ({"prompt", "messages"} & cols):
                raise JobInputError(f"{where}: {shard.name}: OpenAI batch lines need body.messages "
                                    "or body.prompt")
        else:
            prompt_key = ("input.messages_column" if inp.messages_column else
                          "input.token_ids_column" if inp.token_ids_column else "input.prompt_column")
            prompt_col = inp.messages_column or inp.token_ids_column or inp.prompt_column or "prompt"
            needed = [(prompt_key, prompt_col)]
            if inp.id_column:
                needed.append(("input.id_column", inp.id_column))
        if inp.structured_output_column:
            needed.append(("input.structured_output_column", inp.structured_output_column))
        needed += [("output.keep_columns", c) for c in spec.output.keep_columns
                   if not (c == "url" and shard.format == "openai-batch")]
        for key, col in needed:
            if col not in cols:
                raise JobInputError(f"{where}: {shard.name} has no column {col!r} (named by {key}); "
                                    f"its columns: {', '.join(sorted(cols))}")
