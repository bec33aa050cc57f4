"""The one module that talks to object storage: S3-compatible stores (boto3) and ``file://`` directories.

Every location is a URI: ``s3://bucket/key`` or ``file:///absolute/path``. Writes are atomic for readers: an S3
object appears only once its upload completed, and a file is written to a temporary name and renamed. S3 calls are
retried by botocore's ``standard`` retry mode.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

S3_MAX_ATTEMPTS = 10


class StorageError(RuntimeError):
    """An object-storage operation failed; the message names the URI."""


class NotFound(StorageError):
    """The object does not exist."""


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3-compatible endpoint. Unset fields fall back to boto3's usual environment lookup."""

    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Settings:
        env = dict(os.environ) if env is None else env
        return cls(
            endpoint=env.get("CHARLORA_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        )


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int


class ObjectStore(Protocol):
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, uri: str, data: bytes, *, content_type: str = "application/octet-stream") -> None: ...
    def upload_file(self, uri: str, path: Path) -> None: ...
    def download_file(self, uri: str, path: Path) -> None: ...
    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]: ...
    def exists(self, uri: str) -> bool: ...
    def delete_prefix(self, prefix_uri: str) -> int: ...


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (``bucket``, ``some/key``)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"Not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def file_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise StorageError(f"Not a file:/// URI: {uri!r}")
    return Path(parsed.path)


def open_store(uri: str, settings: S3Settings | None = None) -> ObjectStore:
    """The store that serves ``uri``'s scheme."""
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        return S3Store(settings or S3Settings.from_env())
    if scheme == "file":
        return FileStore()
    raise StorageError(f"Unsupported storage URI {uri!r}: use s3://bucket/prefix or file:///path")


class S3Store:
    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=settings.endpoint,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            region_name=settings.region,
            config=Config(
                retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
                connect_timeout=10,
                read_timeout=120,
                s3={"addressing_style": "path"},
            ),
        )

    def _call(self, uri: str, action: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in {"404", "NoSuchKey", "NotFound"}:
                raise NotFound(f"{uri} does not exist") from err
            raise StorageError(f"Could not {action} {uri}: {code or err}") from err
        except (BotoCoreError, S3UploadFailedError) as err:
            # upload_file wraps the ClientError of a failed transfer (e.g. NoSuchBucket) in S3UploadFailedError.
            raise StorageError(f"Could not {action} {uri}: {err}") from err

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3_uri(uri)
        reply = self._call(uri, "read", self._client.get_object, Bucket=bucket, Key=key)
        data: bytes = reply["Body"].read()
        return data

    def write_bytes(self, uri: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        bucket, key = split_s3_uri(uri)
        self._call(uri, "write", self._client.put_object, Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def upload_file(self, uri: str, path: Path) -> None:
        bucket, key = split_s3_uri(uri)
        # upload_file switches to multipart for large files; the object appears only when all parts are in.
        self._call(uri, "upload", self._client.upload_file, Filename=str(path), Bucket=bucket, Key=key)

    def download_file(self, uri: str, path: Path) -> None:
        bucket, key = split_s3_uri(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        self._call(uri, "download", self._client.download_file, Bucket=bucket, Key=key, Filename=str(partial))
        partial.replace(path)

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        bucket, prefix = split_s3_uri(prefix_uri)
        pages = self._call(
            prefix_uri,
            "list",
            lambda: list(self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)),
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield ObjectInfo(f"s3://{bucket}/{item['Key']}", int(item["Size"]))

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3_uri(uri)
        try:
            self._call(uri, "check", self._client.head_object, Bucket=bucket, Key=key)
        except NotFound:
            return False
        return True

    def delete_prefix(self, prefix_uri: str) -> int:
        bucket, _ = split_s3_uri(prefix_uri)
        keys = [split_s3_uri(info.uri)[1] for info in self.list(prefix_uri)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            reply = self._call(
                prefix_uri,
                "delete",
                self._client.delete_objects,
                Bucket=bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
            if reply.get("Errors"):
                first = reply["Errors"][0]
                raise StorageError(f"Could not delete {len(reply['Errors'])} objects under {prefix_uri}: {first}")
        return len(keys)


class FileStore:
    """A local directory with the same layout: the embedded default for local runs."""

    def read_bytes(self, uri: str) -> bytes:
        path = file_path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError as err:
            raise NotFound(f"{uri} does not exist") from err

    def write_bytes(self, uri: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        path = file_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp.write(data)
        Path(tmp.name).replace(path)

    def upload_file(self, uri: str, path: Path) -> None:
        target = file_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
            pass
        shutil.copyfile(path, tmp.name)
        Path(tmp.name).replace(target)

    def download_file(self, uri: str, path: Path) -> None:
        source = file_path(uri)
        if not source.is_file():
            raise NotFound(f"{uri} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        # Same semantics as an S3 prefix: "a/b" matches a/b/x and a/bc.
        prefix = file_path(prefix_uri)
        root = prefix if prefix_uri.endswith("/") else prefix.parent
        if not root.is_dir():
            return
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.startswith(".") and str(path).startswith(str(prefix)):
                yield ObjectInfo(path.as_uri(), path.stat().st_size)

    def exists(self, uri: str) -> bool:
        return file_path(uri).is_file()

    def delete_prefix(self, prefix_uri: str) -> int:
        infos = list(self.list(prefix_uri))
        for info in infos:
            file_path(info.uri).unlink(missing_ok=True)
        return len(infos)
