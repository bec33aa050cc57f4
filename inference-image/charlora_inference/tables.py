"""The live serving table and its two sources: a watched local YAML file and a Kubernetes ConfigMap watch.

Both sources replace or patch one in-memory ``ServingTable``; requests take a snapshot of their entry when they are
admitted, so a change (promotion, rollback) applies to the next request while in-flight ones finish on the version
they started with.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from charlora.api.serving import TABLE_ENTRY_KEY, ServingEntry, ServingTableFile, table_label_selector

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, ServingEntry | None]], None]
"""Called with every change: key -> new entry, or None where the entry was removed."""


class ServingTable:
    """Thread-safe map ``namespace/character`` -> ``ServingEntry``, filtered to the namespaces the server may serve."""

    def __init__(self, *, allowed_namespaces: Iterable[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, ServingEntry] = {}
        self._allowed = None if allowed_namespaces is None else frozenset(allowed_namespaces)
        self._listeners: list[Listener] = []
        self.synced = threading.Event()
        """Set once every source has delivered its first full list."""
        self.revision = 0
        self._sources_expected = 1
        self._sources_synced: set[str] = set()
        self._pinned_shas: frozenset[str] = frozenset()

    def expect_sources(self, count: int) -> None:
        """The table is synced once ``count`` sources (e.g. one watch per namespace) have each listed once."""
        self._sources_expected = count

    def mark_synced(self, source: str) -> None:
        with self._lock:
            self._sources_synced.add(source)
            done = len(self._sources_synced) >= self._sources_expected
        if done:
            self.synced.set()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def allows(self, namespace: str) -> bool:
        return self._allowed is None or namespace in self._allowed

    def get(self, key: str) -> ServingEntry | None:
        with self._lock:
            return self._entries.get(key)

    def entries(self) -> list[ServingEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda entry: entry.key)

    def pinned_shas(self) -> frozenset[str]:
        """The files of every pinned row (kept up to date on each change: eviction asks for every adapter)."""
        return self._pinned_shas

    def pinned(self) -> list[ServingEntry]:
        return [entry for entry in self.entries() if entry.pinned]

    def replace(self, entries: Iterable[ServingEntry], *, namespace: str | None = None) -> None:
        """Makes the table exactly ``entries`` (a full list from a file or a relist); with ``namespace``, only that
        namespace's rows are replaced (one watch per namespace)."""
        wanted = {
            entry.key: entry
            for entry in entries
            if self.allows(entry.namespace) and (namespace is None or entry.namespace == namespace)
        }
        with self._lock:
            current = {
                key: entry for key, entry in self._entries.items() if namespace is None or entry.namespace == namespace
            }
            changes: dict[str, ServingEntry | None] = {key: None for key in current.keys() - wanted.keys()}
            changes.update({key: entry for key, entry in wanted.items() if current.get(key) != entry})
            if namespace is None:
                self._entries = wanted
            else:
                self._entries = {key: entry for key, entry in self._entries.items() if key not in current} | wanted
            self.revision += 1
            self._recount_pinned()
        self._notify(changes)

    def _recount_pinned(self) -> None:
        # Only on changes that touch a pinned row: the pinned rows are few, the table may hold 10,000.
        self._pinned_shas = frozenset(entry.sha256 for entry in self._entries.values() if entry.pinned)

    def put(self, entry: ServingEntry) -> None:
        if not self.allows(entry.namespace):
            return
        with self._lock:
            previous = self._entries.get(entry.key)
            if previous == entry:
                return
            self._entries[entry.key] = entry
            self.revision += 1
            if entry.pinned or (previous is not None and previous.pinned):
                self._recount_pinned()
        self._notify({entry.key: entry})

    def remove(self, key: str) -> None:
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is None:
                return
            self.revision += 1
            if previous.pinned:
                self._recount_pinned()
        self._notify({key: None})

    def _notify(self, changes: dict[str, ServingEntry | None]) -> None:
        if not changes:
            return
        for listener in self._listeners:
            try:
                listener(changes)
            except Exception:  # a listener's bug must not stop the table from updating
                log.exception("Serving-table listener failed")


def read_table_file(path: Path) -> list[ServingEntry]:
    """Parses a table file; raises ValueError naming the problem."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return ServingTableFile.model_validate(raw).entries
    except (OSError, yaml.YAMLError, ValidationError) as err:
        raise ValueError(f"Invalid serving table {path}: {err}") from err


class FileTableSource:
    """Polls a YAML file for changes (mtime, size and content) and replaces the table when it changed.

    Polling a single stat every ``interval`` seconds is cheaper than a notify dependency, works on ConfigMap
    volumes (which swap a symlink rather than writing the file) and bounds the delay to ``interval``.
    A file that does not parse keeps the last good table and logs why.
    """

    def __init__(self, path: Path, table: ServingTable, *, interval: float = 0.2) -> None:
        self.path = path
        self.table = table
        self.interval = interval
        self.last_error: str | None = None
        self._seen: tuple[float, int, bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> bool:
        """Reads the file if it changed; True when the table was replaced."""
        try:
            stat = self.path.stat()
            content = self.path.read_bytes()
        except OSError as err:
            self.last_error = f"Could not read {self.path}: {err}"
            return False
        signature = (stat.st_mtime, stat.st_size, content)
        if signature == self._seen:
            return False
        self._seen = signature
        if not content.strip():
            # An empty file is a write in progress far more often than an intended empty table (`entries: []`).
            self.last_error = f"{self.path} is empty; kept the previous table"
            return False
        try:
            entries = read_table_file(self.path)
        except ValueError as err:
            self.last_error = str(err)
            log.error("Kept the previous serving table: %s", err)
            return False
        self.last_error = None
        self.table.replace(entries)
        self.table.mark_synced("file")
        return True

    def start(self) -> FileTableSource:
        self.poll()
        self._thread = threading.Thread(target=self._run, name="table-file", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def entry_from_configmap(configmap: Any) -> ServingEntry:
    """The entry a table ConfigMap carries; raises ValueError when it is malformed."""
    data = (configmap.data or {}) if not isinstance(configmap, dict) else (configmap.get("data") or {})
    raw = data.get(TABLE_ENTRY_KEY)
    if raw is None:
        raise ValueError(f"no {TABLE_ENTRY_KEY} key")
    try:
        return ServingEntry.model_validate(json.loads(raw))
    except (json.JSONDecodeError, ValidationError) as err:
        raise ValueError(str(err)) from err


class KubernetesTableSource:
    """List + watch the ConfigMaps labelled for this server, in one namespace or across all, and patch the table.

    A server limited to some namespaces runs one source per namespace (``start_kubernetes_sources``), so its
    ServiceAccount needs list/watch on ConfigMaps only there; an unrestricted one watches cluster-wide.

    Each ConfigMap holds one entry, so an event touches one row: 10,000 characters are 10,000 small objects, and
    a change reaches the pod in the watch's latency (well under a second). On a watch expiry (410 Gone) or error it
    relists and replaces the table; a malformed ConfigMap is skipped (and its old row removed) with a log line.
    """

    def __init__(
        self,
        api_client: Any,
        table: ServingTable,
        *,
        server: str,
        server_namespace: str,
        namespace: str | None = None,
        watch_timeout: int = 300,
    ) -> None:
        self.core = k8s.CoreV1Api(api_client)
        self.namespace = namespace
        self.table = table
        self.selector = table_label_selector(server=server, server_namespace=server_namespace)
        self.watch_timeout = watch_timeout
        self.skipped: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None

    @staticmethod
    def _object_key(configmap: Any) -> str:
        return f"{configmap.metadata.namespace}/{configmap.metadata.name}"

    def _lister(self) -> tuple[Any, tuple[str, ...]]:
        # The client's own list functions, not a wrapper: Watch reads their docstring to deserialize events.
        if self.namespace is None:
            return self.core.list_config_map_for_all_namespaces, ()
        return self.core.list_namespaced_config_map, (self.namespace,)

    def _relist(self) -> str:
        lister, args = self._lister()
        reply = lister(*args, label_selector=self.selector)
        entries = []
        self._rows: dict[str, str] = {}
        for item in reply.items:
            entry = self._parse(item)
            if entry is not None:
                entries.append(entry)
                self._rows[self._object_key(item)] = entry.key
        self.table.replace(entries, namespace=self.namespace)
        self.table.mark_synced(f"kubernetes:{self.namespace or '*'}")
        resource_version = str(reply.metadata.resource_version)
        return resource_version

    def _parse(self, configmap: Any) -> ServingEntry | None:
        try:
            entry = entry_from_configmap(configmap)
        except ValueError as err:
            self.skipped[self._object_key(configmap)] = str(err)
            log.error("Skipped serving-table ConfigMap %s: %s", self._object_key(configmap), err)
            return None
        self.skipped.pop(self._object_key(configmap), None)
        return entry

    def _apply(self, kind: str, configmap: Any) -> None:
        object_key = self._object_key(configmap)
        old_row = self._rows.pop(object_key, None)
        entry = None if kind == "DELETED" else self._parse(configmap)
        if old_row is not None and (entry is None or entry.key != old_row):
            self.table.remove(old_row)
        if entry is not None:
            self._rows[object_key] = entry.key
            self.table.put(entry)

    def _run(self) -> None:
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                self._watch = watch.Watch()  # type: ignore[no-untyped-call]
                lister, args = self._lister()
                for event in self._watch.stream(
                    lister,
                    *args,
                    label_selector=self.selector,
                    resource_version=resource_version,
                    timeout_seconds=self.watch_timeout,
                    allow_watch_bookmarks=True,
                ):
                    if self._stop.is_set():
                        return
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        resource_version = None  # 410 Gone and friends: start over from a fresh list
                        break
                    resource_version = obj.metadata.resource_version
                    if kind != "BOOKMARK":
                        self._apply(kind, obj)
            except ApiException as err:
                if err.status == 410:
                    resource_version = None
                    continue
                log.error("Serving-table watch failed (%s); retrying", err.status)
                self._stop.wait(1.0)
                resource_version = None
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
                # Connection resets and cut streams: the next relist brings the table back in line.
                if self._stop.is_set():
                    return
                log.error("Serving-table watch failed: %s; retrying", err)
                self._stop.wait(1.0)
                resource_version = None

    def start(self) -> KubernetesTableSource:
        self._rows = {}
        self._thread = threading.Thread(target=self._run, name="table-kubernetes", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=2)


def start_kubernetes_sources(
    api_client: Any,
    table: ServingTable,
    *,
    server: str,
    server_namespace: str,
    namespaces: list[str] | None,
) -> list[KubernetesTableSource]:
    """One cluster-wide watch, or one watch per namespace when the server may serve only some."""
    scopes: list[str | None] = list(namespaces) if namespaces else [None]
    table.expect_sources(len(scopes))
    return [
        KubernetesTableSource(
            api_client, table, server=server, server_namespace=server_namespace, namespace=scope
        ).start()
        for scope in scopes
    ]
