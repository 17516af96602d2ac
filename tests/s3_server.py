"""A real S3-protocol server for tests: moto in server mode on the loopback address, with request
authentication on (a credential it does not know is refused). Only the setup talks to it through
boto3 (an IAM user and its key); the code under test uses pyarrow's S3FileSystem, as a user would.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

SETUP_REQUESTS = 3  # unauthenticated requests the setup needs: user, access key, policy


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str

    def env(self, **extra: str) -> dict[str, str]:
        """The standard AWS variables a user would set for this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", **extra}

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key,
                                 endpoint_override=self.endpoint.split("://")[1], scheme="http",
                                 region="us-east-1", allow_bucket_creation=True,
                                 allow_delayed_open=True)

    def bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def chunks(self, out: str) -> list[str]:
        """The committed chunk objects under `out` (bucket/prefix), sorted."""
        infos = self.filesystem().get_file_info(pafs.FileSelector(f"{out}/chunks",
                                                                  allow_not_found=True))
        return sorted(i.path for i in infos if i.path.endswith(".arrow"))

    def rows(self, out: str) -> pa.Table:
        """Every committed row under `out`, read back with pyarrow, sorted by input row."""
        fs = self.filesystem()
        tables = []
        for key in self.chunks(out):
            with fs.open_input_file(key) as f:
                tables.append(pa.ipc.open_file(f).read_all())
        return pa.concat_tables(tables).sort_by([("input_row", "ascending")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server() -> Iterator[S3Server]:
    """Start the server, make a user whose key may do anything, yield, stop the server."""
    import boto3

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="batchllm-test")
        key = iam.create_access_key(UserName="batchllm-test")["AccessKey"]
        iam.put_user_policy(UserName="batchllm-test", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
