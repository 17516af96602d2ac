"""Object-store filesystems: a URI (s3://, gs://, abfs://, hdfs://, or any fsspec protocol) to a
pyarrow FileSystem and the path inside it, and the input files found there.

Credentials and endpoints come from each store's own environment (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL[_S3], ~/.aws) or from a
job's `storage_options` (the keyword arguments of pyarrow's S3FileSystem / GcsFileSystem /
AzureFileSystem, or of the fsspec filesystem; for S3 also `endpoint_url`). pyarrow's own
filesystems are used wherever it has one; fsspec only for other protocols.
"""
from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import re
from dataclasses import dataclass
from typing import IO, Any, Mapping
from urllib.parse import urlsplit

import pyarrow.fs as pafs

URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
S3_ALIASES = {"key": "access_key", "secret": "secret_key", "token": "session_token",
              "aws_access_key_id": "access_key", "aws_secret_access_key": "secret_key",
              "aws_session_token": "session_token", "region_name": "region"}
READ_BUFFER = 1 << 20


class StorageError(OSError):
    """A store cannot be reached or used; the message names the location and what to do."""


def is_uri(path: str) -> bool:
    """An object-store URI (s3://...), not a local path (file:// counts as local)."""
    m = URI_RE.match(path)
    return m is not None and m.group(1).lower() != "file"


def filesystem_for(uri: str, options: Mapping[str, Any] | None,
                   section: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for `uri`; `section` (input | output) names the job keys
    (<section>.path, <section>.storage_options) in messages."""
    scheme, rest = uri.split("://", 1)
    scheme, opts = scheme.lower(), dict(options or {})
    try:
        if scheme in ("s3", "s3a"):
            return s3_filesystem(opts), rest.strip("/")
        if scheme in ("gs", "gcs"):
            return pafs.GcsFileSystem(**opts), rest.strip("/")
        if scheme in ("abfs", "abfss", "az"):
            return _azure(uri, rest, opts)
        if scheme in ("hdfs", "viewfs") and not opts:
            return pafs.FileSystem.from_uri(uri)
        return _fsspec(scheme, uri, opts)
    except TypeError as e:
        raise StorageError(f"{section}.storage_options: {e}; give the keyword arguments of the "
                           f"{scheme}:// filesystem (for s3: access_key, secret_key, "
                           "session_token, region, endpoint_url, ...)") from None
    except (OSError, ValueError) as e:
        raise StorageError(f"{section}.path {uri!r}: cannot open its filesystem: {first_line(e)}") from None


def s3_filesystem(opts: dict[str, Any]) -> pafs.S3FileSystem:
    """pyarrow's S3FileSystem; the endpoint from `endpoint_url` or AWS_ENDPOINT_URL[_S3]."""
    opts = {S3_ALIASES.get(k, k): v for k, v in opts.items()}
    endpoint = opts.pop("endpoint_url", None) or next(
        (os.environ[k] for k in S3_ENDPOINT_ENV if os.environ.get(k)), None)
    if endpoint and "endpoint_override" not in opts:
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        if parts.scheme:
            opts.setdefault("scheme", parts.scheme)
        opts["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
    for given, other, env in (("access_key", "secret_key", "AWS_SECRET_ACCESS_KEY"),
                              ("secret_key", "access_key", "AWS_ACCESS_KEY_ID")):
        if given in opts and other not in opts and os.environ.get(env):
            opts[other] = os.environ[env]  # pyarrow takes both or neither
    env_keys = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if all(env_keys) and not {"access_key", "secret_key", "anonymous", "role_arn"} & set(opts):
        # Keys from this process's environment travel with the filesystem (pickled to replica
        # processes and Ray actors, whose environment may lack them); ~/.aws and instance roles
        # are looked up where the filesystem is used.
        opts["access_key"], opts["secret_key"] = env_keys
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts.setdefault("region", region)
    opts.setdefault("allow_delayed_open", True)  # an object smaller than a part is one PUT
    return pafs.S3FileSystem(**opts)


def _azure(uri: str, rest: str, opts: dict[str, Any]) -> tuple[pafs.FileSystem, str]:
    """abfs://container@account.dfs.core.windows.net/path or abfs://container/path."""
    if not opts:
        return pafs.FileSystem.from_uri(uri)
    head, _, path = rest.partition("/")
    container, at, host = head.partition("@")
    if at and "account_name" not in opts:
        opts["account_name"] = host.split(".")[0]
    return pafs.AzureFileSystem(**opts), posixpath.join(container, path).strip("/")


def _fsspec(scheme: str, uri: str, opts: dict[str, Any]) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{uri}: pyarrow has no filesystem for {scheme}:// and fsspec is not "
                           "installed (pip install fsspec, plus the package of that protocol)"
                           ) from None
    fs = fsspec.filesystem(scheme, **opts)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(uri)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def explain(e: BaseException, where: str) -> str:
    """A store's error in words, with what to do about credentials or a missing bucket."""
    text = first_line(e)
    upper = text.upper()
    if "ACCESS_DENIED" in upper or "INVALID_ACCESS_KEY" in upper or "SIGNATURE" in upper \
            or "FORBIDDEN" in upper or "403" in text:
        return (f"{where}: access denied ({text}). Check the credentials (for S3: "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or storage_options) and that they may "
                "read and write there")
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        return f"{where}: the bucket does not exist ({text}); create it or fix the path"
    return f"{where}: {text}"


@dataclass(frozen=True, slots=True, eq=False)
class RemoteFile:
    """An input file on an object store (what a local input's Path is elsewhere)."""

    fs: pafs.FileSystem
    path: str  # inside fs: bucket/key
    uri: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    def __str__(self) -> str:
        return self.uri

    def open(self) -> IO[bytes]:
        """Buffered random access (seek, read, readline) over ranged reads."""
        return io.BufferedReader(self.fs.open_input_file(self.path), READ_BUFFER)

    def identity(self) -> tuple[int, int, int, int]:
        """(size, mtime_ns, 0, 0): what changes when the object is rewritten."""
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.uri}: no such object")
        return info.size or 0, info.mtime_ns or 0, 0, 0


def open_binary(path: "os.PathLike[str] | RemoteFile") -> IO[bytes]:
    """An input file opened for binary reading, local or remote."""
    return path.open() if isinstance(path, RemoteFile) else open(path, "rb")


def find_remote_files(uri: str, options: Mapping[str, Any] | None,
                      suffixes: tuple[str, ...]) -> list[RemoteFile]:
    """An object, a glob (`*` within a path segment, `**` across) or a prefix holding files with
    one of `suffixes` -> files in sorted order. Raises StorageError naming what is missing."""
    fs, path = filesystem_for(uri, options, "input")
    base_uri = uri[:len(uri) - len(uri.split("://", 1)[1])]
    check_bucket(fs, path, f"input.path {uri!r}")
    try:
        if any(ch in path for ch in "*?["):
            root = path[:min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            pattern = _glob_regex(path)
            found = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True,
                                                                        allow_not_found=True))
                     if i.type == pafs.FileType.File and pattern.match(i.path)]
            if not found:
                raise StorageError(f"input.path {uri!r}: the pattern matches no object")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                found = [path]
            elif info.type == pafs.FileType.Directory:
                found = [i.path for i in fs.get_file_info(pafs.FileSelector(path))
                         if i.type == pafs.FileType.File and posixpath.splitext(i.path)[1] in suffixes]
                if not found:
                    raise StorageError(f"input.path {uri!r}: the prefix holds no "
                                       f"{' / '.join(suffixes)} object")
            else:
                raise StorageError(f"input.path {uri!r}: no such object or prefix")
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(explain(e, f"input.path {uri!r}")) from None
    return [RemoteFile(fs, p, base_uri + p) for p in sorted(found)]


def check_bucket(fs: pafs.FileSystem, path: str, where: str) -> None:
    """The bucket (first path segment) exists and the credentials may list it."""
    bucket = path.split("/", 1)[0]
    try:
        if isinstance(fs, pafs.S3FileSystem) or isinstance(fs, getattr(pafs, "GcsFileSystem", ())):
            fs.get_file_info(pafs.FileSelector(bucket, allow_not_found=True))  # lists: auth errors
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{where}: the bucket {bucket!r} does not exist (or these "
                                   "credentials cannot see it); create it or fix the path")
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(explain(e, where)) from None


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over '/'-separated keys: `**` spans segments, `*` and `?` stay inside one."""
    parts = re.split(r"(\*\*/?|\*|\?)", pattern)
    out = []
    for p in parts:
        if p in ("**", "**/"):
            out.append(".*")
        elif p == "*":
            out.append("[^/]*")
        elif p == "?":
            out.append("[^/]")
        else:
            out.append(fnmatch.translate(p)[4:-3] if "[" in p else re.escape(p))
    return re.compile("^" + "".join(out) + "$")


def parquet_source(path: "os.PathLike[str] | RemoteFile") -> Any:
    """What pyarrow.parquet.ParquetFile reads: a local path, or a remote file's random access."""
    return path.fs.open_input_file(path.path) if isinstance(path, RemoteFile) else path


def file_identity(path: "os.PathLike[str] | RemoteFile") -> tuple[int, int, int, int]:
    """What changes whenever a file's bytes do: (size, mtime, ctime, inode) for a local file (ctime
    cannot be set back by anyone), (size, mtime, 0, 0) for an object."""
    if isinstance(path, RemoteFile):
        return path.identity()
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
