"""progress.json: rewritten at most every few seconds while the trainer works (and at every phase change)."""

from __future__ import annotations

import datetime
import time
from typing import Literal

from charlora.artifacts import ProgressReport
from charlora.storing import ObjectStore, StorageError

Phase = Literal["preparing", "training", "sampling", "uploading", "done"]


class ProgressWriter:
    def __init__(self, store: ObjectStore, uri: str, every_seconds: float) -> None:
        self.store = store
        self.uri = uri
        self.every_seconds = every_seconds
        self.last_written = -float("inf")
        self.last: ProgressReport | None = None
        self.writes = 0
        self.enabled = True

    @staticmethod
    def now() -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)

    def write(
        self,
        *,
        step: int,
        total_steps: int,
        epoch: int,
        total_epochs: int = 0,
        loss: float | None = None,
        it_per_second: float | None = None,
        eta_seconds: float | None = None,
        phase: Phase = "training",
        force: bool = False,
    ) -> None:
        """Writes progress.json when ``every_seconds`` passed since the last write, or when ``force``d."""
        moment = time.monotonic()
        if not self.enabled:
            return
        if not force and moment - self.last_written < self.every_seconds:
            return
        self.last = ProgressReport(
            step=step,
            total_steps=total_steps,
            epoch=epoch,
            total_epochs=total_epochs,
            loss=loss,
            it_per_second=it_per_second,
            eta_seconds=eta_seconds,
            phase=phase,
            updated_at=self.now(),
        )
        try:
            self.store.write_bytes(
                self.uri, self.last.model_dump_json(by_alias=True).encode(), content_type="application/json"
            )
        except StorageError:
            return  # progress is advisory: a failed write is retried at the next interval, training goes on
        self.last_written = moment
        self.writes += 1
