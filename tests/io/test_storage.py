"""Output storage: a local folder and an S3 prefix (a real S3-protocol server on localhost, reached
through pyarrow's S3FileSystem) behave alike; leases keep a second run out."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pytest

from batchllm.io import leases
from batchllm.io.filesystems import RemoteFile, find_remote_files, open_binary
from batchllm.io.storage import LocalStorage, ObjectStorage, Storage, StorageBusy, StorageError, \
    open_storage
from batchllm.io.writers import WriteFailed
from tests.s3_server import S3Server, moto_server

pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    yield from moto_server()


@pytest.fixture
def aws_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(leases, "SETTLE_S", 0.05)
    return s3


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(tmp_path / "out")
    s3 = request.getfixturevalue("aws_env")
    bucket = s3.bucket(f"b-{tmp_path.name.lower().replace('_', '-')[:40]}")
    return open_storage(f"s3://{bucket}/jobs/out")


def test_every_operation_behaves_the_same_on_a_folder_and_on_s3(storage: Storage) -> None:
    assert storage.list("chunks") == [] and not storage.exists("job.json")
    storage.make_dir("chunks")
    table = pa.table({"input_row": [3, 1], "text": ["c", "a"]})
    storage.write_arrow("chunks/unit-000000-chunk-00000.arrow", table)
    storage.write_arrow("chunks/unit-000000-chunk-00001-last.arrow", table.slice(0, 1))
    storage.write_text("job.json", '{"a": 1}')
    assert storage.list("chunks") == ["unit-000000-chunk-00000.arrow",
                                      "unit-000000-chunk-00001-last.arrow"]
    assert json.loads(storage.read("job.json")) == {"a": 1}
    assert storage.read_arrow("chunks/unit-000000-chunk-00000.arrow").equals(table)
    assert storage.read_arrow("chunks/unit-000000-chunk-00000.arrow",
                              ["input_row"]).to_pydict() == {"input_row": [3, 1]}
    storage.move("chunks/unit-000000-chunk-00000.arrow", "chunks/x.arrow.corrupt-1")
    assert storage.list("chunks") == ["unit-000000-chunk-00001-last.arrow", "x.arrow.corrupt-1"]
    with pytest.raises(FileNotFoundError):
        storage.read("summary.json")
    storage.delete("job.json")
    storage.delete("job.json")  # missing is fine
    assert not storage.exists("job.json")
    storage.delete_tree("chunks")
    assert storage.list("chunks") == []


def test_an_s3_write_that_fails_leaves_no_object_and_says_why(aws_env: S3Server) -> None:
    store = open_storage("s3://no-such-bucket/out")
    with pytest.raises(WriteFailed, match=r"s3://no-such-bucket/out/job.json.*bucket does not exist"):
        store.write_text("job.json", "{}")
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist"):
        store.check()


def test_bad_credentials_are_named_as_such(aws_env: S3Server, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    bucket = aws_env.bucket("creds")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match=r"access denied.*AWS_ACCESS_KEY_ID"):
        open_storage(f"s3://{bucket}/out").check()
    open_storage(f"s3://{bucket}/out", {"secret_key": aws_env.secret_key}).check()  # options win


def test_storage_options_are_checked_and_take_the_endpoint(aws_env: S3Server,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StorageError, match=r"output.storage_options: .*endpoint_url"):
        open_storage("s3://b/out", {"no_such_option": 1})
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    bucket = aws_env.bucket("options")
    store = open_storage(f"s3://{bucket}/out", {"endpoint_url": aws_env.endpoint})
    store.write_text("x.txt", "hi")
    assert store.read("x.txt") == b"hi"


def test_remote_inputs_are_found_by_object_prefix_or_glob_and_read_like_files(
        aws_env: S3Server) -> None:
    fs = aws_env.filesystem()
    bucket = aws_env.bucket("inputs")
    for key in ("data/a.jsonl", "data/b.jsonl", "data/notes.txt", "data/sub/c.jsonl"):
        with fs.open_output_stream(f"{bucket}/{key}") as f:
            f.write(b'{"prompt": "x"}\n\n{"prompt": "y"}\n')
    names = lambda files: [f.uri for f in files]  # noqa: E731
    assert names(find_remote_files(f"s3://{bucket}/data", None, (".jsonl",))) == [
        f"s3://{bucket}/data/a.jsonl", f"s3://{bucket}/data/b.jsonl"]
    assert names(find_remote_files(f"s3://{bucket}/data/*.jsonl", None, (".jsonl",))) == [
        f"s3://{bucket}/data/a.jsonl", f"s3://{bucket}/data/b.jsonl"]
    assert names(find_remote_files(f"s3://{bucket}/data/**/c.jsonl", None, ())) == [
        f"s3://{bucket}/data/sub/c.jsonl"]
    (one,) = find_remote_files(f"s3://{bucket}/data/a.jsonl", None, ())
    assert isinstance(one, RemoteFile) and one.name == "a.jsonl" and one.suffix == ".jsonl"
    with open_binary(one) as f:
        assert list(f) == [b'{"prompt": "x"}\n', b"\n", b'{"prompt": "y"}\n']
        f.seek(17)
        assert f.readline() == b'{"prompt": "y"}\n'
    assert one.identity()[0] == 33
    with pytest.raises(StorageError, match="no such object or prefix"):
        find_remote_files(f"s3://{bucket}/nothing", None, (".jsonl",))
    with pytest.raises(StorageError, match="matches no object"):
        find_remote_files(f"s3://{bucket}/data/*.parquet", None, (".jsonl",))
    with pytest.raises(StorageError, match="bucket 'absent' does not exist"):
        find_remote_files("s3://absent/data", None, (".jsonl",))


def test_a_second_run_is_refused_while_the_first_holds_the_location(storage: Storage) -> None:
    with storage.lease():
        with pytest.raises(StorageBusy, match="in use by another batchllm run"):
            open_storage(storage.uri).lease().__enter__()
    with open_storage(storage.uri).lease() as again:  # released: the next run gets it
        assert again.stale is None


def _plant_lease(store: ObjectStorage, host: str, pid: int, age_s: float) -> None:
    store.write(leases.LEASE, json.dumps({"token": "other", "host": host, "pid": pid,
                                          "heartbeat": time.time() - age_s}).encode())


def test_an_s3_lease_is_taken_over_when_stale_or_asked_and_its_old_holder_stops_writing(
        aws_env: S3Server) -> None:
    uri = f"s3://{aws_env.bucket('leases')}/out"
    store = open_storage(uri)
    assert isinstance(store, ObjectStorage)
    dead = 2**22 + 12345  # beyond pid_max's default: no such process on this host
    _plant_lease(store, socket.gethostname(), dead, age_s=1)
    with store.lease() as lease:  # its holder ran here and is gone: stale at once
        assert f"pid {dead}" in lease.stale and "gone" in lease.stale
    _plant_lease(store, "elsewhere", 1, age_s=leases.LEASE_EXPIRY_S + 1)
    with store.lease() as lease:  # expired
        assert "host elsewhere" in lease.stale
    _plant_lease(store, "elsewhere", 1, age_s=5)
    with pytest.raises(StorageBusy, match=r"host elsewhere, pid 1, last heartbeat 5 s ago.*"
                                          r"--take-over"):
        store.lease().__enter__()
    store.delete(leases.LEASE)
    first = open_storage(uri)
    with first.lease():
        first.write_text("chunks/a.arrow", "x")
        with open_storage(uri).lease(take_over=True) as taker:
            assert "taken over by --take-over" in taker.stale
            with pytest.raises(WriteFailed, match="lease on .* was taken over"):
                first.write_text("chunks/b.arrow", "x")  # the old holder is fenced off
        assert not first.exists("chunks/b.arrow")


def test_local_leases_are_flocks_that_die_with_their_process(tmp_path: Path) -> None:
    store = open_storage(tmp_path / "out")
    assert isinstance(store, LocalStorage)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".lock").write_text("999999")
    (tmp_path / "out" / ".tmp-x.arrow.1").write_text("half")
    with store.lease() as lease:
        assert lease.stale == "a stale lock left by pid 999999 (that run is gone)"
        assert [p.name for p in lease.removed] == [".tmp-x.arrow.1"]
        assert (tmp_path / "out" / ".lock").read_text() == str(os.getpid())
