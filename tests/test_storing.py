"""The object-store client against a real MinIO and against a file:// directory, with the same assertions."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from charlora.devtools.minio import MinioServer
from charlora.storing import NotFound, ObjectStore, S3Settings, StorageError, open_store


@pytest.fixture(params=["s3", "file"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ObjectStore, str]]:
    if request.param == "s3":
        minio: MinioServer = request.getfixturevalue("minio")
        bucket: str = request.getfixturevalue("bucket")
        settings = S3Settings(endpoint=minio.endpoint, access_key=minio.access_key, secret_key=minio.secret_key)
        yield open_store(f"s3://{bucket}", settings), f"s3://{bucket}/charlora"
    else:
        yield open_store("file:///"), (tmp_path / "store").as_uri()


def test_write_read_list_delete(store_root: tuple[ObjectStore, str], tmp_path: Path) -> None:
    store, root = store_root
    store.write_bytes(f"{root}/ns/anna/v1/manifest.json", b'{"a": 1}', content_type="application/json")
    payload = bytes(range(256)) * 40_000  # ~10 MB: large enough for a multipart upload to S3
    local = tmp_path / "lora.safetensors"
    local.write_bytes(payload)
    store.upload_file(f"{root}/ns/anna/v1/lora.safetensors", local)
    store.write_bytes(f"{root}/ns/anna/v10/manifest.json", b"{}")
    store.write_bytes(f"{root}/ns/annabel/v1/manifest.json", b"{}")

    assert store.read_bytes(f"{root}/ns/anna/v1/manifest.json") == b'{"a": 1}'
    listed = {info.uri.removeprefix(root): info.size for info in store.list(f"{root}/ns/anna/v1/")}
    assert listed == {"/ns/anna/v1/manifest.json": 8, "/ns/anna/v1/lora.safetensors": len(payload)}
    assert len(list(store.list(f"{root}/ns/anna/"))) == 3  # v1 (2 files) and v10, not annabel

    fetched = tmp_path / "fetched" / "lora.safetensors"
    store.download_file(f"{root}/ns/anna/v1/lora.safetensors", fetched)
    assert hashlib.sha256(fetched.read_bytes()).digest() == hashlib.sha256(payload).digest()

    assert store.exists(f"{root}/ns/anna/v1/manifest.json")
    assert store.delete_prefix(f"{root}/ns/anna/v1/") == 2
    assert not store.exists(f"{root}/ns/anna/v1/manifest.json")
    assert store.read_bytes(f"{root}/ns/anna/v10/manifest.json") == b"{}"  # a sibling prefix survives
    with pytest.raises(NotFound, match=r"ns/anna/v1/manifest\.json does not exist"):
        store.read_bytes(f"{root}/ns/anna/v1/manifest.json")


def test_wrong_credentials_name_the_uri(minio: MinioServer, bucket: str) -> None:
    store = open_store("s3://x", S3Settings(endpoint=minio.endpoint, access_key=minio.access_key, secret_key="nope"))
    with pytest.raises(StorageError, match=rf"Could not read s3://{bucket}/k: SignatureDoesNotMatch"):
        store.read_bytes(f"s3://{bucket}/k")


def test_upload_to_a_missing_bucket_is_a_storage_error(minio: MinioServer, tmp_path: Path) -> None:
    settings = S3Settings(endpoint=minio.endpoint, access_key=minio.access_key, secret_key=minio.secret_key)
    local = tmp_path / "lint.json"
    local.write_text("{}")
    with pytest.raises(StorageError, match=r"Could not upload s3://no-such-bucket-x/v1/lint\.json: .*NoSuchBucket"):
        open_store("s3://no-such-bucket-x", settings).upload_file("s3://no-such-bucket-x/v1/lint.json", local)


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(StorageError, match=r"Unsupported storage URI 'gs://b/p'"):
        open_store("gs://b/p")
