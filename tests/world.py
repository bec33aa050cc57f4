"""Helpers shared by the tests that talk to the real test world."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from kubernetes import client as k8s

from charlora.devtools.controlplane import ControlPlane
from charlora.devtools.minio import MinioServer


def wait_for(condition: Callable[[], Any], *, timeout: float = 60, what: str = "condition") -> Any:
    """Polls ``condition`` until it returns something truthy, which it returns; fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def api_client_for(plane: ControlPlane, *, token: str | None = None) -> k8s.ApiClient:
    """An API client as the admin (client certificate) or, with ``token``, as whoever the token names."""
    assert plane.pki is not None
    config = k8s.Configuration()
    config.host = plane.url
    config.ssl_ca_cert = str(plane.pki.ca.cert)
    if token is None:
        config.cert_file = str(plane.pki.admin.cert)
        config.key_file = str(plane.pki.admin.key)
    else:
        config.api_key = {"authorization": f"Bearer {token}"}
    return k8s.ApiClient(config)


def s3_client_for(server: MinioServer, *, secret_key: str | None = None) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=secret_key if secret_key is not None else server.secret_key,
        region_name="us-east-1",
        config=BotoConfig(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=30),
    )
