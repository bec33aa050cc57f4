"""API keys: only hashes on disk, namespaces per key, rotation without a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from charlora_inference.tenants import Tenants, hash_key


def write_keys(path: Path, keys: dict[str, list[str]], *, mtime: int) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"name": f"k{i}", "sha256": hash_key(raw), "namespaces": ns}
                    for i, (raw, ns) in enumerate(keys.items())
                ]
            }
        )
    )
    os.utime(path, (mtime, mtime))


def test_keys_map_to_namespaces_and_rotate_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    write_keys(path, {"alpha": ["team"], "root": ["*"]}, mtime=1_000)
    tenants = Tenants.from_file(path)
    alpha = tenants.authenticate("alpha")
    assert alpha is not None
    assert alpha.reaches("team")
    assert not alpha.reaches("other")
    assert alpha.only_namespace == "team"
    root = tenants.authenticate("root")
    assert root is not None
    assert root.reaches("anything")
    assert root.only_namespace is None
    assert tenants.authenticate("ALPHA") is None
    assert tenants.authenticate("") is None
    assert tenants.authenticate(None) is None

    write_keys(path, {"beta": ["team"]}, mtime=2_000)  # rotation: alpha revoked, beta issued
    assert tenants.authenticate("alpha") is None
    assert tenants.authenticate("beta") is not None

    path.write_text("keys: [{name: broken}]")  # a bad update keeps the last good keys
    os.utime(path, (3_000, 3_000))
    assert tenants.authenticate("beta") is not None


def test_an_invalid_keys_file_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"name": "plain", "key": "not-a-hash", "namespaces": ["a"]}]}))
    with pytest.raises(ValueError, match="Invalid API keys file"):
        Tenants.from_file(path)
