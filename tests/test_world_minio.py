"""The object store is a real MinIO: objects round-trip, signatures are checked, a stopped server is gone."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from charlora.devtools.minio import MinioServer
from charlora.devtools.tools import Toolbox
from tests.world import s3_client_for


def test_put_get_list_delete(s3: Any, bucket: str) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, not text: bytes must survive unchanged
    s3.put_object(Bucket=bucket, Key="ns/anna/v1/lora.safetensors", Body=payload)
    s3.put_object(Bucket=bucket, Key="ns/anna/v1/manifest.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="ns/bob/v1/manifest.json", Body=b"{}")

    got = s3.get_object(Bucket=bucket, Key="ns/anna/v1/lora.safetensors")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="ns/anna/")
    assert sorted(item["Key"] for item in listed["Contents"]) == [
        "ns/anna/v1/lora.safetensors",
        "ns/anna/v1/manifest.json",
    ]
    assert {item["Key"]: item["Size"] for item in listed["Contents"]}["ns/anna/v1/lora.safetensors"] == len(payload)

    s3.delete_object(Bucket=bucket, Key="ns/anna/v1/manifest.json")
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket=bucket, Key="ns/anna/v1/manifest.json")
    assert missing.value.response["Error"]["Code"] in {"404", "NoSuchKey"}
    assert s3.list_objects_v2(Bucket=bucket, Prefix="ns/anna/")["KeyCount"] == 1


def test_wrong_secret_key_is_refused(minio: MinioServer, bucket: str) -> None:
    intruder = s3_client_for(minio, secret_key=minio.secret_key + "x")
    with pytest.raises(ClientError) as refused:
        intruder.list_objects_v2(Bucket=bucket)
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_stopped_server_refuses_connections_and_leaves_nothing(toolbox: Toolbox) -> None:
    server = MinioServer(toolbox).start()
    client = s3_client_for(server)
    client.create_bucket(Bucket="short-lived")
    client.put_object(Bucket="short-lived", Key="k", Body=b"v")
    assert client.get_object(Bucket="short-lived", Key="k")["Body"].read() == b"v"
    server.stop()
    with pytest.raises(EndpointConnectionError):
        client.get_object(Bucket="short-lived", Key="k")
    assert server.process is not None
    assert not server.process.running()
    assert not server.workdir.exists()
