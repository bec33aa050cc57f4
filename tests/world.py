"""Helpers shared by the tests that talk to the real test world."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from charlora.devtools.controlplane import api_client_for
from charlora.devtools.minio import MinioServer
from charlora.devtools.processes import wait_for

__all__ = ["api_client_for", "s3_client_for", "wait_for"]


def s3_client_for(server: MinioServer, *, secret_key: str | None = None) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=secret_key if secret_key is not None else server.secret_key,
        region_name="us-east-1",
        config=BotoConfig(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=30),
    )
