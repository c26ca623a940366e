"""Waiting for actors to start, with a log line every so often naming what is still pending."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import ray

log = logging.getLogger("research.setup")


class SetupTimeout(TimeoutError):
    """Actors did not finish starting within their configured setup timeout."""


def wait_logged(refs: Sequence[Any], what: str, timeout_s: float, log_every_s: float = 30.0,
                config_key: str | None = None, fetch: bool = True) -> list[Any]:
    """ray.get(refs) within timeout_s (with `fetch=False` only wait, and return the refs); every log_every_s logs
    how many of `what` are ready; raises SetupTimeout naming `what`, the timeout and the config key that sets it."""
    refs = list(refs)
    started = time.monotonic()
    deadline = started + timeout_s
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            key = f" (raise {config_key})" if config_key else ""
            raise SetupTimeout(f"{len(pending)} of {len(refs)} {what} not ready after {timeout_s:.0f} s{key}")
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(log_every_s, left))
        if pending:
            log.info("waiting for %s: %d of %d ready after %.0f s (timeout %.0f s)", what, len(refs) - len(pending),
                     len(refs), time.monotonic() - started, timeout_s)
    return ray.get(refs) if fetch else refs  # every ref is done: ray.get re-raises the first actor error
