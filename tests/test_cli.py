"""The ``charlora`` command dispatches to the operator, the trainer and the server as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _charlora(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "charlora", *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def test_help_lists_the_subcommands() -> None:
    result = _charlora("--help")
    assert result.returncode == 0
    for command in ("operator", "train", "serve"):
        assert command in result.stdout


def test_train_hands_its_arguments_to_the_trainer(tmp_path: Path) -> None:
    missing = tmp_path / "train.json"
    log = tmp_path / "termination-log"  # not the machine's /dev/termination-log
    result = _charlora("train", "--config", str(missing), env={**os.environ, "CHARLORA_TERMINATION_LOG": str(log)})
    assert result.returncode == 3, result.stderr  # bad input, as in a training Job
    assert f"Could not read the training config {missing}" in result.stderr
    assert log.read_text().startswith("Could not read the training config")


def test_serve_hands_its_arguments_to_the_server() -> None:
    result = _charlora("serve", "--help")
    assert result.returncode == 0
    assert "--base" in result.stdout
