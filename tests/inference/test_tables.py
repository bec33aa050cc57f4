"""The serving table's two live sources: a watched YAML file and a ConfigMap watch against the real apiserver."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from kubernetes import client as k8s

from charlora.api.serving import (
    TABLE_ENTRY_KEY,
    ServingEntry,
    build_table_configmap,
    table_configmap_name,
    table_labels,
)
from charlora_inference.tables import FileTableSource, KubernetesTableSource, ServingTable, start_kubernetes_sources
from tests.world import wait_for

SHA_A = "a" * 64
SHA_B = "b" * 64


def entry(
    namespace: str, character: str, *, version: str = "v1", sha256: str = SHA_A, pinned: bool = False
) -> ServingEntry:
    return ServingEntry(
        namespace=namespace,
        character=character,
        version=version,
        artifact_uri=f"s3://bucket/loras/{namespace}/{character}/{version}/",
        sha256=sha256,
        pinned=pinned,
        base_model_family="sd15",
        base_model_version="tiny-sd15",
    )


def write_table(path: Path, entries: list[ServingEntry]) -> None:
    """Replaces the file atomically, as a ConfigMap volume or a careful editor does."""
    partial = path.with_suffix(".partial")
    partial.write_text(yaml.safe_dump({"entries": [item.to_wire() for item in entries]}))
    partial.replace(path)


def test_entry_paths_follow_the_artifact_layout() -> None:
    final = entry("team", "anna", version="v3")
    assert final.lora_uri == "s3://bucket/loras/team/anna/v3/lora.diffusers.safetensors"
    assert final.manifest_uri == "s3://bucket/loras/team/anna/v3/manifest.json"
    assert final.model_copy(update={"epoch": 7}).lora_path == "epochs/e007.safetensors"
    name = table_configmap_name(server="srv", namespace="team", character="anna" * 30)
    assert len(name) <= 63
    assert name == table_configmap_name(server="srv", namespace="team", character="anna" * 30)
    assert build_table_configmap(final, server="srv", server_namespace="serving") == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": table_configmap_name(server="srv", namespace="team", character="anna"),
            "namespace": "team",
            "labels": {"charlora.dev/serving-server": "srv", "charlora.dev/serving-server-namespace": "serving"},
        },
        "data": {"entry.json": json.dumps(final.to_wire(), sort_keys=True)},
    }


def test_file_source_applies_changes_and_keeps_the_last_good_table(tmp_path: Path) -> None:
    path = tmp_path / "table.yaml"
    write_table(path, [entry("team", "anna"), entry("other", "bob")])
    table = ServingTable(allowed_namespaces=["team"])
    changes: list[dict[str, ServingEntry | None]] = []
    table.add_listener(changes.append)
    source = FileTableSource(path, table, interval=0.05).start()
    try:
        assert [item.key for item in table.entries()] == ["team/anna"]  # "other" is not served here
        assert table.synced.is_set()

        started = time.monotonic()
        write_table(path, [entry("team", "anna", version="v2", sha256=SHA_B)])
        wait_for(lambda: (got := table.get("team/anna")) is not None and got.version == "v2", timeout=5, what="v2")
        assert time.monotonic() - started < 1.0
        assert changes[-1] == {"team/anna": entry("team", "anna", version="v2", sha256=SHA_B)}

        path.write_text("")  # a write in progress: keeps serving v2
        wait_for(lambda: source.last_error is not None, timeout=5, what="the empty file")
        assert table.get("team/anna") == entry("team", "anna", version="v2", sha256=SHA_B)
        path.write_text("entries: [{namespace: team}]")  # invalid: keeps serving v2
        wait_for(lambda: "character" in (source.last_error or ""), timeout=5, what="the parse error naming the field")
        assert table.get("team/anna") == entry("team", "anna", version="v2", sha256=SHA_B)

        write_table(path, [])
        wait_for(lambda: table.get("team/anna") is None, timeout=5, what="removal")
        assert changes[-1] == {"team/anna": None}
    finally:
        source.stop()


def configmap(namespace: str, item: ServingEntry) -> k8s.V1ConfigMap:
    """The table ConfigMap of ``item`` for server ``srv`` in namespace ``serving``, as the operator builds it."""
    body = build_table_configmap(item, server="srv", server_namespace="serving")
    assert body["metadata"]["namespace"] == namespace
    return k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name=body["metadata"]["name"], labels=body["metadata"]["labels"]),
        data=body["data"],
    )


def test_kubernetes_source_applies_each_change_within_a_second(kube: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(kube)
    anna = entry(namespace, "anna", pinned=True)
    core.create_namespaced_config_map(namespace, configmap(namespace, anna))
    # A ConfigMap for another server and a malformed one: neither enters the table.
    other = configmap(namespace, entry(namespace, "zed"))
    other.metadata.labels = table_labels(server="another", server_namespace="serving")
    core.create_namespaced_config_map(namespace, other)
    broken = configmap(namespace, entry(namespace, "broken"))
    broken.data = {TABLE_ENTRY_KEY: "{not json"}
    core.create_namespaced_config_map(namespace, broken)

    table = ServingTable()
    source = KubernetesTableSource(kube, table, server="srv", server_namespace="serving").start()
    try:
        assert table.synced.wait(10)
        assert table.get(anna.key) == anna
        assert [item.key for item in table.entries() if item.namespace == namespace] == [anna.key]
        assert any(key.endswith(broken.metadata.name) for key in source.skipped)

        # Promotion: one small write to one object.
        started = time.monotonic()
        bob = entry(namespace, "bob", version="v1")
        core.create_namespaced_config_map(namespace, configmap(namespace, bob))
        promoted = anna.model_copy(update={"version": "v2", "sha256": SHA_B})
        core.replace_namespaced_config_map(
            configmap(namespace, anna).metadata.name, namespace, configmap(namespace, promoted)
        )
        wait_for(lambda: table.get(anna.key) == promoted and table.get(bob.key) == bob, timeout=5, what="the watch")
        assert time.monotonic() - started < 1.0

        # Rollback, then removal.
        started = time.monotonic()
        core.replace_namespaced_config_map(
            configmap(namespace, anna).metadata.name, namespace, configmap(namespace, anna)
        )
        core.delete_namespaced_config_map(configmap(namespace, bob).metadata.name, namespace)
        wait_for(lambda: table.get(anna.key) == anna and table.get(bob.key) is None, timeout=5, what="rollback")
        assert time.monotonic() - started < 1.0
    finally:
        source.stop()


def test_kubernetes_source_with_many_characters(kube: k8s.ApiClient, namespace: str) -> None:
    # One small object per character: 500 here (10,000 in production) and a change to one still arrives at once.
    core = k8s.CoreV1Api(kube)
    entries = [entry(namespace, f"c{index:04d}") for index in range(500)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: core.create_namespaced_config_map(namespace, configmap(namespace, item)), entries))
    table = ServingTable(allowed_namespaces=[namespace])
    started = time.monotonic()
    source = KubernetesTableSource(kube, table, server="srv", server_namespace="serving").start()
    try:
        assert table.synced.wait(30)
        assert len(table.entries()) == 500
        listed_in = time.monotonic() - started
        assert listed_in < 10, listed_in

        started = time.monotonic()
        changed = entries[321].model_copy(update={"version": "v2", "sha256": SHA_B})
        core.replace_namespaced_config_map(
            configmap(namespace, changed).metadata.name, namespace, configmap(namespace, changed)
        )
        wait_for(lambda: table.get(changed.key) == changed, timeout=5, what="the change")
        assert time.monotonic() - started < 1.0
        assert len(table.entries()) == 500
    finally:
        source.stop()


def test_one_watch_per_served_namespace(kube: k8s.ApiClient, namespace: str) -> None:
    # A server limited to some namespaces watches only those (least-privilege RBAC), one watch each.
    core = k8s.CoreV1Api(kube)
    second = f"{namespace}-b"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=second)))
    try:
        anna, bob = entry(namespace, "anna"), entry(second, "bob")
        core.create_namespaced_config_map(namespace, configmap(namespace, anna))
        core.create_namespaced_config_map(second, configmap(second, bob))
        table = ServingTable(allowed_namespaces=[namespace, second])
        sources = start_kubernetes_sources(
            kube, table, server="srv", server_namespace="serving", namespaces=[namespace, second]
        )
        try:
            assert table.synced.wait(10)
            assert {item.key for item in table.entries()} == {anna.key, bob.key}
            promoted = bob.model_copy(update={"version": "v2", "sha256": SHA_B})
            core.replace_namespaced_config_map(
                configmap(second, bob).metadata.name, second, configmap(second, promoted)
            )
            wait_for(lambda: table.get(bob.key) == promoted, timeout=5, what="the change")
            assert table.get(anna.key) == anna  # the other namespace's rows are untouched
        finally:
            for source in sources:
                source.stop()
    finally:
        core.delete_namespace(second)


def test_namespaced_replace_keeps_other_namespaces() -> None:
    table = ServingTable()
    table.replace([entry("a", "x"), entry("b", "y")])
    table.replace([entry("a", "z")], namespace="a")
    assert [item.key for item in table.entries()] == ["a/z", "b/y"]
    assert table.pinned_shas() == frozenset()
    table.put(entry("b", "y", sha256=SHA_B, pinned=True))
    assert table.pinned_shas() == {SHA_B}
    table.remove("b/y")
    assert table.pinned_shas() == frozenset()


def test_entries_from_a_newer_operator_are_still_read() -> None:
    wire = entry("team", "anna").to_wire() | {"someFutureField": {"x": 1}}
    assert ServingEntry.model_validate(wire) == entry("team", "anna")
