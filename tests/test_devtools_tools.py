"""Unit tests for locating and building the test world's tools (no builds run here)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from charlora.devtools.tools import BUILD_GROUPS, BuildGroup, Toolbox, ToolError, local_replaces

ETCD_STYLE_GO_MOD = """module go.etcd.io/etcd/server/v3

go 1.26.0

require (
\tgo.etcd.io/etcd/api/v3 v3.6.16
\tgo.etcd.io/etcd/client/pkg/v3 v3.6.16
\tgithub.com/google/btree v1.1.3
)

replace (
\tgo.etcd.io/etcd/api/v3 => ../api
\tgo.etcd.io/etcd/client/pkg/v3 => ../client/pkg
)

replace go.etcd.io/etcd => ./FORBIDDEN_DEPENDENCY

replace github.com/some/fork => github.com/other/fork v1.0.0
"""


def _group(sibling: str | None) -> BuildGroup:
    return BuildGroup(
        name="etcd",
        module="go.etcd.io/etcd/server/v3",
        version="v3.6.16",
        packages={"etcd": "go.etcd.io/etcd/server/v3"},
        sibling_version=sibling,
    )


def test_local_replaces_become_published_siblings() -> None:
    assert local_replaces(ETCD_STYLE_GO_MOD, _group("v3.6.16")) == [
        ("go.etcd.io/etcd/api/v3", "v3.6.16"),
        ("go.etcd.io/etcd/client/pkg/v3", "v3.6.16"),
    ]
    assert local_replaces(ETCD_STYLE_GO_MOD, _group(None)) == []


def test_kubernetes_staging_modules_use_v0_versions() -> None:
    kubernetes = next(group for group in BUILD_GROUPS if group.name == "kubernetes")
    assert kubernetes.version.startswith("v1.")
    assert kubernetes.sibling_version == "v0." + kubernetes.version.split(".", 1)[1]
    assert f"-X k8s.io/component-base/version.gitVersion={kubernetes.version}" in kubernetes.ldflags


def test_cache_key_changes_with_version() -> None:
    assert (
        _group("v3.6.16").cache_key
        != BuildGroup(
            name="etcd",
            module="go.etcd.io/etcd/server/v3",
            version="v3.6.17",
            packages={"etcd": "go.etcd.io/etcd/server/v3"},
            sibling_version="v3.6.16",
        ).cache_key
    )


def _fake_binary(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_lookup_order_tools_dir_then_envtest_then_path(tmp_path: Path) -> None:
    tools_dir, envtest, on_path = (
        tmp_path / "tools",
        tmp_path / "envtest" / "k8s" / "1.34.4-linux-amd64",
        tmp_path / "bin",
    )
    _fake_binary(tools_dir, "kube-apiserver")
    _fake_binary(envtest, "kube-apiserver")
    _fake_binary(envtest, "etcd")
    _fake_binary(on_path, "helm")
    _fake_binary(on_path, "etcd")  # PATH is not trusted for version-sensitive tools
    env = {"CHARLORA_TOOLS_DIR": str(tools_dir), "KUBEBUILDER_ASSETS": str(envtest), "PATH": str(on_path)}
    box = Toolbox(cache_dir=tmp_path / "cache", env=env)

    assert box.locate("kube-apiserver").path == tools_dir / "kube-apiserver"
    assert box.locate("kube-apiserver").source == "$CHARLORA_TOOLS_DIR"
    assert box.locate("etcd").path == envtest / "etcd"
    assert box.locate("helm").source == "PATH"


def test_cached_build_is_reused_without_go(tmp_path: Path) -> None:
    group = next(group for group in BUILD_GROUPS if group.name == "kwok")
    bin_dir = tmp_path / "cache" / "tools" / group.cache_key / "bin"
    _fake_binary(bin_dir, "kwok")
    (bin_dir / ".complete").write_text("done\n")
    box = Toolbox(cache_dir=tmp_path / "cache", env={"PATH": ""})
    located = box.locate("kwok")
    assert (located.path, located.source, located.build_seconds) == (bin_dir / "kwok", "cache", None)


def test_missing_go_gives_an_actionable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    box = Toolbox(cache_dir=tmp_path / "cache", env={"PATH": str(tmp_path / "empty")})
    with pytest.raises(ToolError, match=r"no Go toolchain on PATH.*CHARLORA_TOOLS_DIR"):
        box.locate("kwok")
    assert not (tmp_path / "cache" / "tools").exists() or not any(
        p.name == ".complete" for p in (tmp_path / "cache" / "tools").rglob("*")
    )


def test_unknown_tool_is_named() -> None:
    with pytest.raises(ToolError, match="Unknown tool 'kind'"):
        Toolbox(env=dict(os.environ)).locate("kind")
