"""Helm is the real binary and installs into the real control plane."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from charlora.devtools.controlplane import ControlPlane
from charlora.devtools.tools import HELM_VERSION


def test_helm_version(helm: Callable[..., Any], toolbox: Any) -> None:
    out = helm("version", "--short").stdout.strip()
    if toolbox.locate("helm").source in {"built", "cache"}:
        assert out.startswith(HELM_VERSION), out
    else:
        assert out.startswith("v3."), out


def test_helm_installs_a_chart_into_the_control_plane(
    helm: Callable[..., Any], control_plane: ControlPlane, kube: k8s.ApiClient, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "smoke"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: smoke\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("character: anna\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\n"
        "data:\n  character: {{ .Values.character | quote }}\n"
    )
    result = helm(
        "install",
        "smoke",
        str(chart),
        "--namespace",
        namespace,
        "--set",
        "character=bob",
        "--wait",
        "--timeout",
        "60s",
        kubeconfig=control_plane.kubeconfig,
    )
    assert "STATUS: deployed" in result.stdout
    assert k8s.CoreV1Api(kube).read_namespaced_config_map("smoke", namespace).data == {"character": "bob"}

    listed = helm("list", "--namespace", namespace, "--short", kubeconfig=control_plane.kubeconfig)
    assert listed.stdout.split() == ["smoke"]
    failed = helm(
        "install",
        "smoke",
        str(chart),
        "--namespace",
        namespace,
        check=False,
        kubeconfig=control_plane.kubeconfig,
    )
    assert failed.returncode != 0
    assert "cannot re-use a name that is still in use" in failed.stderr
