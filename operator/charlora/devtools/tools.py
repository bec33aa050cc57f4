"""Locates the test world's binaries, or builds them once from their Go modules and caches them.

Lookup order for every tool:
  1. ``$CHARLORA_TOOLS_DIR/<tool>`` (any directory of ready binaries);
  2. ``$KUBEBUILDER_ASSETS/<tool>`` (the directory ``setup-envtest use -p path`` prints: etcd, kube-apiserver,
     kubectl);
  3. ``PATH``, for the tools whose version does not matter to the tests (minio, helm);
  4. the build cache, ``$CHARLORA_CACHE_DIR`` or ``~/.cache/charlora``, keyed by module version;
  5. a build with the machine's Go toolchain from the Go module proxy (``GOTOOLCHAIN=local``: no toolchain download).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.19.5"
# MinIO publishes RELEASE.* tags, which are not semver: the module proxy knows its commits as pseudo-versions.
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"

TOOLS_DIR_ENV = "CHARLORA_TOOLS_DIR"
ENVTEST_ENV = "KUBEBUILDER_ASSETS"
CACHE_DIR_ENV = "CHARLORA_CACHE_DIR"


class ToolError(RuntimeError):
    """A tool could not be located or built; the message says what to do about it."""


@dataclass(frozen=True)
class BuildGroup:
    """Binaries built together from one Go module at one version, inside a throwaway wrapper module.

    The wrapper module lets us build modules whose own go.mod carries local ``replace`` directives
    (Kubernetes' staging repositories, etcd's sibling modules), which ``go install module@version`` refuses:
    every local replace of the upstream module becomes a replace to the published sibling module.
    """

    name: str
    module: str
    version: str
    packages: Mapping[str, str]  # binary name -> Go package path
    sibling_version: str | None = None  # version of the modules the upstream go.mod replaces with local paths
    ldflags: tuple[str, ...] = ()

    @property
    def cache_key(self) -> str:
        spec = repr((self.module, self.version, sorted(self.packages.items()), self.sibling_version, self.ldflags))
        return f"{self.name}-{self.version}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def _kubernetes_ldflags(version: str) -> tuple[str, ...]:
    major, minor = version.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    return (
        f"-X {pkg}.gitVersion={version}",
        f"-X {pkg}.gitMajor={major}",
        f"-X {pkg}.gitMinor={minor}",
        f"-X {pkg}.gitTreeState=clean",
    )


def _kubernetes_staging_version(version: str) -> str:
    # k8s.io/kubernetes v1.X.Y publishes its staging modules (k8s.io/api, ...) as v0.X.Y.
    return "v0." + version.lstrip("v").split(".", 1)[1]


BUILD_GROUPS: tuple[BuildGroup, ...] = (
    BuildGroup(
        name="kubernetes",
        module="k8s.io/kubernetes",
        version=KUBERNETES_VERSION,
        packages={
            "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
            "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
            "kubectl": "k8s.io/kubernetes/cmd/kubectl",
        },
        sibling_version=_kubernetes_staging_version(KUBERNETES_VERSION),
        ldflags=_kubernetes_ldflags(KUBERNETES_VERSION),
    ),
    BuildGroup(
        name="etcd",
        module="go.etcd.io/etcd/server/v3",
        version=ETCD_VERSION,
        packages={"etcd": "go.etcd.io/etcd/server/v3"},
        sibling_version=ETCD_VERSION,
    ),
    BuildGroup(
        name="kwok",
        module="sigs.k8s.io/kwok",
        version=KWOK_VERSION,
        packages={"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
    ),
    BuildGroup(
        name="helm",
        module="helm.sh/helm/v3",
        version=HELM_VERSION,
        packages={"helm": "helm.sh/helm/v3/cmd/helm"},
        ldflags=(f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",),
    ),
    BuildGroup(
        name="minio",
        module="github.com/minio/minio",
        version=MINIO_VERSION,
        packages={"minio": "github.com/minio/minio"},
    ),
)

# Tools whose exact version the tests do not depend on may come from PATH.
PATH_TOOLS = frozenset({"minio", "helm"})
ALL_TOOLS: tuple[str, ...] = tuple(binary for group in BUILD_GROUPS for binary in group.packages)


@dataclass
class Located:
    """Where a tool was found and how it got there."""

    name: str
    path: Path
    source: str  # "$CHARLORA_TOOLS_DIR", "$KUBEBUILDER_ASSETS", "PATH", "cache" or "built"
    build_seconds: float | None = None


def default_cache_dir() -> Path:
    if override := os.environ.get(CACHE_DIR_ENV):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "charlora"


@dataclass
class Toolbox:
    """Resolves tool names to binaries, building missing build groups on first use."""

    cache_dir: Path = field(default_factory=default_cache_dir)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    _found: dict[str, Located] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.locate(name).path

    def locate(self, name: str) -> Located:
        if name not in ALL_TOOLS:
            raise ToolError(f"Unknown tool {name!r}; known tools: {', '.join(ALL_TOOLS)}")
        if name not in self._found:
            self._found[name] = self._find_prebuilt(name) or self._build_group_of(name)
        return self._found[name]

    def ensure_all(self) -> list[Located]:
        return [self.locate(name) for name in ALL_TOOLS]

    def _find_prebuilt(self, name: str) -> Located | None:
        for env_name in (TOOLS_DIR_ENV, ENVTEST_ENV):
            directory = self.env.get(env_name)
            if directory and _is_executable(Path(directory) / name):
                return Located(name, Path(directory) / name, f"${env_name}")
        if name in PATH_TOOLS:
            on_path = shutil.which(name, path=self.env.get("PATH"))
            if on_path:
                return Located(name, Path(on_path), "PATH")
        return None

    def _build_group_of(self, name: str) -> Located:
        group = next(g for g in BUILD_GROUPS if name in g.packages)
        bin_dir = self.cache_dir / "tools" / group.cache_key / "bin"
        seconds: float | None = None
        if not (bin_dir / ".complete").exists():
            with _locked(self.cache_dir / "tools" / f"{group.cache_key}.lock"):
                if not (bin_dir / ".complete").exists():  # another process may have built it meanwhile
                    seconds = build_group(group, bin_dir)
        source = "cache" if seconds is None else "built"
        return Located(name, bin_dir / name, source, seconds)


def build_group(group: BuildGroup, bin_dir: Path) -> float:
    """Builds every binary of ``group`` into ``bin_dir``; returns the seconds it took."""
    go = shutil.which("go")
    if go is None:
        raise ToolError(
            f"Cannot build {', '.join(group.packages)}: no Go toolchain on PATH. Install Go, or point "
            f"${TOOLS_DIR_ENV} (or ${ENVTEST_ENV} for etcd/kube-apiserver/kubectl) at ready binaries."
        )
    started = time.monotonic()
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",  # never download a toolchain: only modules come from the proxy
        "GOFLAGS": "-mod=mod",
        "CGO_ENABLED": "0",
        "GOWORK": "off",
    }
    with tempfile.TemporaryDirectory(prefix=f"charlora-build-{group.name}-") as work:
        workdir = Path(work)
        log_path = bin_dir.parent / "build.log"
        with log_path.open("w") as log:
            (workdir / "go.mod").write_text(f"module charlora.local/build/{group.name}\n\ngo 1.24.0\n")
            _run_go([go, "get", f"{group.module}@{group.version}"], workdir, env, log)
            replaces = local_replaces(_download_go_mod(go, group, workdir, env), group)
            if replaces:
                with (workdir / "go.mod").open("a") as gomod:
                    gomod.writelines(f"replace {mod} => {mod} {ver}\n" for mod, ver in replaces)
                _run_go([go, "get", f"{group.module}@{group.version}"], workdir, env, log)
            staging = workdir / "out"
            _run_go(
                [
                    go,
                    "build",
                    "-trimpath",
                    "-ldflags",
                    " ".join(("-s", "-w", *group.ldflags)),
                    "-o",
                    f"{staging}/",
                    *group.packages.values(),
                ],
                workdir,
                env,
                log,
            )
            staging.mkdir(exist_ok=True)
            for binary, package in group.packages.items():
                built = staging / go_binary_name(package)
                if not built.exists():
                    raise ToolError(f"go build of {package} produced no binary; see {log_path}")
                if built.name != binary:
                    built.rename(staging / binary)
            (staging / ".complete").write_text(f"{group.module}@{group.version}\n")
            if bin_dir.exists():
                shutil.rmtree(bin_dir)
            shutil.move(str(staging), bin_dir)
    return time.monotonic() - started


def go_binary_name(package: str) -> str:
    """The file name ``go build -o dir/`` gives a main package: its last path element, skipping a ``/vN``."""
    elements = package.rstrip("/").split("/")
    if len(elements) > 1 and re.fullmatch(r"v\d+", elements[-1]):
        return elements[-2]
    return elements[-1]


def local_replaces(go_mod_text: str, group: BuildGroup) -> list[tuple[str, str]]:
    """The upstream go.mod's replaces that point at local directories, as (module, published version)."""
    if group.sibling_version is None:
        return []
    required = set(re.findall(r"^\s*(?:require\s+)?([\w.\-/]+)\s+v[\w.\-+]+", go_mod_text, flags=re.MULTILINE))
    found = re.findall(r"^\s*(?:replace\s+)?([\w.\-/]+)\s+=>\s+(\.{1,2}/\S*)\s*$", go_mod_text, flags=re.MULTILINE)
    return [(module, group.sibling_version) for module, _ in found if module in required]


def _download_go_mod(go: str, group: BuildGroup, workdir: Path, env: Mapping[str, str]) -> str:
    out = subprocess.run(
        [go, "mod", "download", "-json", f"{group.module}@{group.version}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r'"GoMod":\s*"([^"]+)"', out.stdout)
    if out.returncode != 0 or match is None:
        raise ToolError(f"Could not download {group.module}@{group.version}: {out.stderr.strip() or out.stdout}")
    return Path(match.group(1)).read_text()


def _run_go(cmd: list[str], cwd: Path, env: Mapping[str, str], log: TextIO) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        log.flush()
        tail = Path(log.name).read_text().splitlines()[-25:]
        raise ToolError(
            f"{' '.join(cmd[:3])} failed (exit {result.returncode}); last lines of {log.name}:\n" + "\n".join(tail)
        )


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
