"""A live progress line per step on stderr: reward, format, searches, seconds per step and the ETA of the run."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def total_steps(trainer: Any, num_questions: int) -> int:
    """Steps a job will run: trainer.max_steps, else each epoch's questions in batches (the last one partial, or
    dropped with trainer.drop_last)."""
    batches = num_questions // trainer.batch_size if trainer.drop_last else -(-num_questions // trainer.batch_size)
    return trainer.max_steps or trainer.epochs * batches


class ProgressLine:
    """Prints one line per finished step when enabled (None = when the stream is a terminal)."""

    def __init__(self, total_steps: int | None, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total_steps
        self.started = time.perf_counter()
        self.first_step: int | None = None

    def step(self, step: int, scalars: dict[str, float]) -> str:
        """Format (and, when enabled, print) the line of `step`; returns it."""
        now = time.perf_counter()
        if self.first_step is None:
            # Resumed runs start counting here: the ETA comes from the steps this process has timed.
            self.first_step, self.started = step - 1, now - scalars.get("time/step", 0.0)
        done = step - self.first_step
        per_step = (now - self.started) / max(done, 1)
        total = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total:
            eta = f" | ETA {_duration(per_step * max(self.total - step, 0))}"
        line = (f"[step {step}{total}] reward {scalars.get('reward/mean', float('nan')):.3f}"
                f" | format {scalars.get('reward/format_valid', float('nan')):.2f}"
                f" | searches {scalars.get('rollout/searches', float('nan')):.2f}"
                f" | step {scalars.get('time/step', per_step):.0f} s{eta}")
        if self.enabled:
            print(line, file=self.stream, flush=True)
        return line


def _duration(seconds: float) -> str:
    """Seconds as '42 s', '12 min' or '1 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds / 60))
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
