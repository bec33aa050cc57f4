"""How the trainer fails on bad input: one clear, non-retryable exit with a termination message, no stack trace."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from charlora.api.trainingjob import BAD_INPUT_EXIT_CODE

TERMINATION_LOG = Path("/dev/termination-log")
TERMINATION_LOG_ENV = "CHARLORA_TERMINATION_LOG"
# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4000
FILES_NAMED = 20
FAILURE_EXIT_CODE = 1
"""Any other failure: the Job retries it and the retry resumes from the last saved state."""


class BadInput(Exception):
    """The dataset, the base model or the configuration cannot be trained on; retrying will not help."""


def name_files(files: list[str], *, limit: int = FILES_NAMED) -> str:
    """``a, b, c`` or ``a, b, ... and 7 more``: a file list short enough for a termination message."""
    shown = ", ".join(files[:limit])
    return shown if len(files) <= limit else f"{shown} and {len(files) - limit} more"


def termination_log_path() -> Path:
    return Path(os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG)


def report_bad_input(message: str) -> int:
    """Writes ``message`` to stderr and the termination log (when writable); returns the bad-input exit code."""
    text = _write_termination_message(message)
    print(f"Bad input: {text}", file=sys.stderr, flush=True)
    return BAD_INPUT_EXIT_CODE


def report_failure(message: str) -> int:
    """Like :func:`report_bad_input` for a retryable failure; returns :data:`FAILURE_EXIT_CODE`."""
    print(_write_termination_message(message), file=sys.stderr, flush=True)
    return FAILURE_EXIT_CODE


def _write_termination_message(message: str) -> str:
    text = message.strip()
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        text = text.encode()[: TERMINATION_MESSAGE_LIMIT - 4].decode(errors="ignore") + " ..."
    log = termination_log_path()
    try:
        with log.open("w") as out:
            out.write(text + "\n")
    except OSError:
        pass  # outside Kubernetes there is no termination log; stderr carries the message
    return text
