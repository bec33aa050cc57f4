"""Static checks of the inference image definition: pinned base and packages, a non-root user, the entry point."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "inference-image"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_inference_dependency_is_pinned() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["inference"]
    pins = {}
    for line in (IMAGE / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert re.fullmatch(r"\d+(\.\d+)+", version), line
            pins[name.lower()] = version
    missing = {_name(requirement) for requirement in extra} - pins.keys()
    assert not missing, f"unpinned in inference-image/constraints.txt: {sorted(missing)}"


def test_dockerfile_pins_a_cuda_base_and_runs_as_non_root() -> None:
    dockerfile = (IMAGE / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", base.group(1))
    assert "--constraint inference-image/constraints.txt" in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users, "no USER line"
    assert users[-1] == "10001:10001"
    assert 'ENTRYPOINT ["python", "-m", "charlora_inference"]' in dockerfile
