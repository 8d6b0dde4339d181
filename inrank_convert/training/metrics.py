"""A run's metrics (docs/design.md §9): one record per logged step in ``metrics.jsonl`` (written by
process 0) and for the ``on_step`` callback, with the throughput since the last record."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from inrank_convert.training.options import learning_rate
from inrank_convert.weights.run_folder import open_metrics

if TYPE_CHECKING:
    from inrank_convert.training.loop import Session


class MetricsLog:
    """metrics.jsonl (written by process 0) and the on_step callback; tracks the throughput since
    the last record."""

    def __init__(self, session: Session, on_step: Callable[[dict], None] | None):
        self.is_main = session.world.is_main
        self.file = open_metrics(session.run) if self.is_main else None
        self.on_step = on_step
        self.tokens_per_step = session.options.batch_size * session.block_size
        self.started, self.steps = time.perf_counter(), 0

    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return round(self.tokens_per_step * self.steps / max(elapsed, 1e-9), 1)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.on_step is not None and self.is_main:
            self.on_step(record)
        self.started, self.steps = time.perf_counter(), 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def metrics_record(session: Session, loss: float, val_loss: float | None, tokens_per_second: float) -> dict:
    """One metrics record; ``val_loss`` only on steps that evaluated."""
    record = {"step": session.step, "loss": loss, "lr": learning_rate(session.options, session.step),
              "tokens_per_second": tokens_per_second}
    if val_loss is not None:
        record["val_loss"] = val_loss
    if session.controller is not None:
        record["ranks"] = dict(session.controller.ranks)
        record["total_rank"] = session.controller.total_rank
    elif session.options.mode == "inrank":
        record["dense_warmup"] = True  # full rank until the switch: compare-runs counts it so
    return record
