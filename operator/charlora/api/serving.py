"""The serving table: which version (and epoch) of each character a CharacterServer serves, one entry per character.

The operator writes one small ConfigMap per (server, character) in the character's namespace, labelled with the
server's name and namespace; inference pods list + watch those ConfigMaps by label. One object per character keeps
every object tiny (a single ConfigMap is capped at 1 MiB, which 10,000 characters would overflow) and a promotion
or rollback is a single small write that reaches every replica through the watch. Locally the same entries come
from a YAML file (``entries: [...]``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field

from charlora.api.base import ApiModel, StatusModel, VersionName
from charlora.artifacts import LORA_DIFFUSERS, epoch_file

TABLE_SERVER_LABEL = "charlora.dev/serving-server"
TABLE_SERVER_NAMESPACE_LABEL = "charlora.dev/serving-server-namespace"
TABLE_ENTRY_KEY = "entry.json"
"""The ConfigMap data key holding one ``ServingEntry`` as JSON."""

Sha256 = str


class ServingEntry(StatusModel):
    """One row of the serving table: what to serve for one character.

    Written by the operator and read by servers that may be older: unknown fields are ignored, not an error, so
    an operator upgrade never empties a running server's table.
    """

    namespace: str = Field(min_length=1, max_length=63, description="Namespace of the CharacterLoRA.")
    character: str = Field(min_length=1, max_length=253, description="Name of the CharacterLoRA.")
    version: VersionName = Field(description="The version served (v1, v2, ...).")
    epoch: int | None = Field(default=None, ge=1, description="Serve this epoch's checkpoint instead of the final.")
    artifact_uri: str = Field(
        min_length=1, max_length=2048, description="Prefix holding the version (s3://... or file:///.../vN/)."
    )
    sha256: Sha256 = Field(
        min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the LoRA file served."
    )
    pinned: bool = Field(default=False, description="Loaded before the server is ready and never evicted.")
    base_model_family: Literal["sd15", "sdxl"] = Field(description="Family of the base model the LoRA belongs to.")
    base_model_version: str = Field(min_length=1, max_length=253, description="Version of that base model.")

    @property
    def key(self) -> str:
        """``namespace/character``: how requests and the table name a character."""
        return f"{self.namespace}/{self.character}"

    @property
    def lora_path(self) -> str:
        """The LoRA file inside the version: the diffusers-keyed final LoRA, or the chosen epoch's checkpoint."""
        return LORA_DIFFUSERS if self.epoch is None else epoch_file(self.epoch)

    @property
    def lora_uri(self) -> str:
        return f"{self.artifact_uri.rstrip('/')}/{self.lora_path}"

    @property
    def manifest_uri(self) -> str:
        return f"{self.artifact_uri.rstrip('/')}/manifest.json"


class ServingTableFile(ApiModel):
    """The local table file (``--table table.yaml``): the same entries the ConfigMaps carry."""

    entries: list[ServingEntry] = Field(default_factory=list, max_length=100_000)


def table_configmap_name(*, server: str, namespace: str, character: str) -> str:
    """A deterministic, DNS-safe name for the ConfigMap holding one entry (at most 63 + hash characters)."""
    digest = hashlib.sha256(f"{server}\0{namespace}\0{character}".encode()).hexdigest()[:10]
    return f"serving-{character[:40]}-{digest}".lower()


def table_labels(*, server: str, server_namespace: str) -> dict[str, str]:
    """The labels that put a ConfigMap into a server's table (what the server's watch selects)."""
    return {TABLE_SERVER_LABEL: server, TABLE_SERVER_NAMESPACE_LABEL: server_namespace}


def build_table_configmap(entry: ServingEntry, *, server: str, server_namespace: str) -> dict[str, Any]:
    """The ConfigMap (a plain dict, for the operator to apply) that puts ``entry`` into a server's table.

    It lives in the character's namespace, so the operator can owner-reference it to the CharacterLoRA.
    """
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": table_configmap_name(server=server, namespace=entry.namespace, character=entry.character),
            "namespace": entry.namespace,
            "labels": table_labels(server=server, server_namespace=server_namespace),
        },
        "data": {TABLE_ENTRY_KEY: json.dumps(entry.to_wire(), sort_keys=True)},
    }


def table_label_selector(*, server: str, server_namespace: str) -> str:
    return ",".join(
        f"{key}={value}" for key, value in table_labels(server=server, server_namespace=server_namespace).items()
    )
