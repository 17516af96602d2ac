"""input.dataset: a Dataset.save_to_disk folder as one shard, named by its folder, fingerprinted by
the bytes of its Arrow files; folders that are not one Dataset are named with what to do."""
from __future__ import annotations

from pathlib import Path

import pytest

from batchllm.io.hf_dataset import dataset_shard
from batchllm.io.readers import InputError, input_columns, iter_rows

datasets = pytest.importorskip("datasets")


def test_a_saved_dataset_is_one_shard_read_from_any_row(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(5)], "n": list(range(5))})
    ds.save_to_disk(str(tmp_path / "ds"))
    shard = dataset_shard(str(tmp_path / "ds"))
    assert shard.num_rows == 5 and shard.name == str(tmp_path / "ds") and shard.path is not None
    assert input_columns(shard) == {"prompt", "n"}
    assert [r.data["n"] for r in iter_rows(shard, start=3)] == [3, 4]
    again = dataset_shard(str(tmp_path / "ds"))
    assert again.content_hash == shard.content_hash
    datasets.Dataset.from_dict({"prompt": ["x"] * 5, "n": list(range(5))}).save_to_disk(
        str(tmp_path / "other"))
    assert dataset_shard(str(tmp_path / "other")).content_hash != shard.content_hash


def test_folders_that_are_not_one_saved_dataset_are_named(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a"]}),
                               "test": datasets.Dataset.from_dict({"prompt": ["b"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"holds a DatasetDict \(splits: train, test\); name one "
                                         r"split's folder, e\.g\. input\.dataset: .*dd/train"):
        dataset_shard(str(tmp_path / "dd"))
    assert dataset_shard(str(tmp_path / "dd" / "train")).num_rows == 1
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a folder written by Dataset.save_to_disk"):
        dataset_shard(str(tmp_path / "plain"))
    with pytest.raises(InputError, match="no such folder"):
        dataset_shard(str(tmp_path / "missing"))
