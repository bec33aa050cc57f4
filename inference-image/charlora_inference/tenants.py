"""API keys, stored only as SHA-256 hashes, each mapped to the namespaces whose characters it may use.

The keys file (a mounted Secret) holds ``keys: [{name, sha256, namespaces}]``; ``"*"`` stands for every namespace.
Clients send ``Authorization: Bearer <key>``. The file is re-read when it changes, so rotating a key needs no restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ALL_NAMESPACES = "*"


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=253, description="Who holds the key (logged instead of the key).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex.")
    namespaces: list[str] = Field(min_length=1, description='Namespaces it reaches; "*" for all.')

    def reaches(self, namespace: str) -> bool:
        return ALL_NAMESPACES in self.namespaces or namespace in self.namespaces

    @property
    def only_namespace(self) -> str | None:
        """The namespace of a single-namespace key, which lets requests name a character without its namespace."""
        if len(self.namespaces) == 1 and self.namespaces[0] != ALL_NAMESPACES:
            return self.namespaces[0]
        return None


class ApiKeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class Tenants:
    """Looks up a presented key by its hash; the raw keys are never stored."""

    def __init__(self, keys: list[ApiKey], *, path: Path | None = None) -> None:
        self._by_hash = {key.sha256: key for key in keys}
        self._path = path
        self._signature: tuple[float, int] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path) -> Tenants:
        tenants = cls([], path=path)
        tenants._reload_if_changed()
        return tenants

    def _reload_if_changed(self) -> None:
        if self._path is None:
            return
        stat = self._path.stat()
        signature = (stat.st_mtime, stat.st_size)
        with self._lock:
            if signature == self._signature:
                return
            try:
                keys = ApiKeysFile.model_validate(yaml.safe_load(self._path.read_text()) or {}).keys
            except (yaml.YAMLError, ValidationError) as err:
                if self._signature is None:
                    raise ValueError(f"Invalid API keys file {self._path}: {err}") from err
                return  # keep the last good keys
            self._by_hash = {key.sha256: key for key in keys}
            self._signature = signature

    def authenticate(self, raw: str | None) -> ApiKey | None:
        if not raw:
            return None
        with contextlib.suppress(OSError):  # a Secret volume mid-swap: keep the keys we have
            self._reload_if_changed()
        # Only the hash is compared, and a dict lookup by hash reveals nothing about how close a wrong key was.
        return self._by_hash.get(hash_key(raw))
