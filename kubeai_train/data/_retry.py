"""Retry with exponential backoff for transient read failures (network resets, throttling).

Which errors are transient is the source's call (``Source.is_transient``), never a match on
message text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kubeai_train.data.types import ReadFailedError

T = TypeVar("T")
log = logging.getLogger("kubeai_train.data")


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` further attempts after the first, sleeping ``backoff * 2**i`` (capped)."""

    retries: int = 3
    backoff: float = 0.2
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"backoff must be >= 0, got {self.backoff!r}")

    def delay(self, attempt: int) -> float:
        return float(min(self.max_backoff, self.backoff * (2**attempt)))


def call_with_retry(
    fn: Callable[[], T], is_transient: Callable[[BaseException], bool], policy: RetryPolicy, what: str
) -> T:
    """``fn()``, retried on transient errors; then :class:`ReadFailedError` naming ``what``."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt >= policy.retries:
                raise ReadFailedError(
                    f"reading {what} failed {attempt + 1} times, last with {type(e).__name__}: {e}; "
                    "check the storage service / network and resume from the dataset's state_dict()"
                ) from e
            log.warning(
                "transient error reading %s (%s: %s); retry %d/%d",
                what,
                type(e).__name__,
                e,
                attempt + 1,
                policy.retries,
            )
            time.sleep(policy.delay(attempt))
            attempt += 1
