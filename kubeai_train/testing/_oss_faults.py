"""Fault injection and byte accounting for the local OSS server."""

from __future__ import annotations

import fnmatch
import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

FAULT_KINDS = ("error", "reset", "truncate", "delay", "throttle")


@dataclass
class Fault:
    """One fault rule; the first rule matching a request (with ``times`` left) is applied to it.

    Attributes:
        kind: ``"error"`` answers with ``status``/``code`` (a 503 ServiceUnavailable by default);
            ``"reset"`` sends ``after_bytes`` bytes of the body and then resets the connection (TCP
            RST; before any response for requests that have no object body); ``"truncate"`` closes
            the connection cleanly after ``after_bytes`` bytes although Content-Length promised more;
            ``"delay"`` waits ``seconds`` before answering; ``"throttle"`` sends the body at ``rate``
            bytes per second.
        op: only requests of this OSS operation (``"GetObject"``, ``"HeadObject"``,
            ``"ListObjects"``, ``"PutObject"``, ``"AppendObject"``, ``"UploadPart"``, ...); None for all.
        key: only objects whose ``"<bucket>/<key>"`` matches this glob; None for all.
        times: how many matching requests get the fault; None for every one until cleared.
    """

    kind: str = "error"
    op: str | None = None
    key: str | None = None
    times: int | None = 1
    status: int = 503
    code: str = "ServiceUnavailable"
    after_bytes: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    fired: int = field(default=0)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {', '.join(FAULT_KINDS)}")
        if self.times is not None and self.times < 1:
            raise ValueError(f"fault times must be >= 1 or None, got {self.times}")
        if self.kind == "error" and not 400 <= self.status <= 599:
            raise ValueError(f"fault status must be an HTTP error status 400..599, got {self.status}")
        if self.after_bytes < 0 or self.seconds < 0 or self.rate < 0:
            raise ValueError("fault after_bytes, seconds and rate must be >= 0")
        if self.kind == "throttle" and self.rate <= 0:
            raise ValueError("a throttle fault needs rate > 0 (bytes per second)")

    def matches(self, op: str, ident: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.op is not None and self.op != op:
            return False
        return self.key is None or fnmatch.fnmatchcase(ident, self.key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaultBook:
    """The active fault rules, shared by the server's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, op: str, ident: str, kinds: tuple[str, ...]) -> Fault | None:
        """The first matching rule of one of ``kinds``, counted as fired."""
        with self._lock:
            for fault in self._faults:
                if fault.kind in kinds and fault.matches(op, ident):
                    fault.fired += 1
                    return fault
        return None

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.to_dict() for f in self._faults]


class ByteCounter:
    """Response body bytes the server wrote: in total, per object (GetObject bodies) and per operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.total = 0
            self.by_object: Counter[str] = Counter()
            self.requests: Counter[str] = Counter()
            # (object, first byte, last byte + 1) of recent GetObject bodies, for tests and benchmarks
            self.get_ranges: deque[tuple[str, int, int]] = deque(maxlen=100_000)

    def request(self, op: str) -> None:
        with self._lock:
            self.requests[op] += 1

    def body(self, n: int, ident: str | None = None) -> None:
        with self._lock:
            self.total += n
            if ident is not None:
                self.by_object[ident] += n

    def get_range(self, ident: str, start: int, end: int) -> None:
        with self._lock:
            self.get_ranges.append((ident, start, end))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "bytes_total": self.total,
                "bytes_by_object": dict(self.by_object),
                "requests": dict(self.requests),
                "get_ranges": list(self.get_ranges),
            }
