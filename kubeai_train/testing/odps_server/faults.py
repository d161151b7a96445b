"""Fault injection of the local ODPS server: what a fault is, which kinds and scopes exist, and
how the faults a request fired delay or fail it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kubeai_train.testing.odps_server.state import HttpError

__all__ = ["Fault", "apply_faults"]

logger = logging.getLogger("kubeai_train.testing.odps_server")


_FAULT_KINDS = ("reset", "truncate", "status", "bad_crc", "slow")
_FAULT_SCOPES = ("data", "session", "meta", "any")


@dataclass
class Fault:
    """One injected fault rule; each matching request consumes one of ``count``.

    Attributes:
        kind: "reset" (send ``after_bytes`` of the body, then a TCP reset), "truncate" (send
            ``after_bytes`` of the body, then close the connection cleanly), "status" (answer
            ``status`` with an ODPS error body), "bad_crc" (flip a chunk CRC of an Arrow body,
            or the record checksum of a record body), "slow" (sleep ``delay`` s first).
        scope: which requests: "data" (tunnel downloads), "session" (session create/poll),
            "meta" (REST metadata), "any".
        count: how many requests it hits (-1: every one, until cleared).
    """

    kind: str
    scope: str = "data"
    count: int = 1
    after_bytes: int = 65536
    status: int = 503
    delay: float = 0.5
    chunk: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {_FAULT_KINDS}, got {self.kind!r}")
        if self.scope not in _FAULT_SCOPES:
            raise ValueError(f"fault scope must be one of {_FAULT_SCOPES}, got {self.scope!r}")
        if self.count == 0 or self.count < -1:
            raise ValueError(f"fault count must be >= 1 or -1 (always), got {self.count}")
        if self.after_bytes < 0 or self.delay < 0 or self.chunk < 0:
            raise ValueError("fault after_bytes, delay and chunk must be >= 0")
        if not 400 <= self.status <= 599:
            raise ValueError(f"fault status must be an HTTP error status 400..599, got {self.status}")


def apply_faults(faults: list[Fault]) -> list[Fault]:
    """Sleep for the ``slow`` faults among those a request fired, then raise the first ``status``
    fault as its HTTP error; returns the faults for the body (reset, truncate, bad_crc) to apply."""
    for f in faults:
        if f.kind == "slow":
            time.sleep(f.delay)
    for f in faults:
        if f.kind == "status":
            raise HttpError(
                f.status,
                "ServiceUnavailable" if f.status == 503 else "InternalServerError",
                f"injected fault: HTTP {f.status}",
            )
    return faults
