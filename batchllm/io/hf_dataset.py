"""input.dataset: a Hugging Face dataset saved on disk (`Dataset.save_to_disk`, read back with
`datasets.load_from_disk`) as one input shard, fingerprinted by the bytes of its Arrow files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from batchllm.io.readers import InputError, Shard

_READ = 1 << 20


def dataset_shard(folder: str) -> Shard:
    """The dataset in `folder` as one shard named by the folder (memory-mapped, not read in)."""
    path = Path(folder)
    where = f"input.dataset {folder!r}"
    if not path.is_dir():
        raise InputError(f"{where}: no such folder (a folder written by Dataset.save_to_disk)")
    if (path / "dataset_dict.json").exists():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits") or []
        except (OSError, ValueError, AttributeError):
            splits = []
        shown = ", ".join(map(str, splits)) or "see the folder"
        first = splits[0] if splits else "train"
        raise InputError(f"{where} holds a DatasetDict (splits: {shown}); name one split's folder, "
                         f"e.g. input.dataset: {path / str(first)}")
    if not (path / "state.json").exists():
        raise InputError(f"{where} is not a folder written by Dataset.save_to_disk (no "
                         "state.json); for Parquet or JSONL files use input.path")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{where}: reading it needs the datasets package: pip install "
                         "datasets") from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to open it is the input's problem
        raise InputError(f"{where}: cannot load it with datasets.load_from_disk: {e}") from None
    if not hasattr(data, "num_rows") or not hasattr(data, "column_names"):
        raise InputError(f"{where} did not load as one Dataset")
    files = sorted(path.glob("*.arrow"))
    h = hashlib.blake2b(digest_size=16)
    size = 0
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_READ):
                h.update(chunk)
                size += len(chunk)
    return Shard(index=0, name=str(path), format="dataset", num_rows=data.num_rows, path=path,
                 size=size, data=data, content_hash=f"dataset-files:{h.hexdigest()}")
