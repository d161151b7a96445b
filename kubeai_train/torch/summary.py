"""Scalar summaries for TensorBoard, with or without the ``tensorboard`` package.

With ``tensorboard`` installed, :class:`ScalarWriter` uses ``torch.utils.tensorboard``. Without
it (torch does not depend on it) the same event files are written here: TFRecord framing
around hand-encoded ``tensorflow.Event`` protos holding ``simple_value`` scalars, the format
TensorBoard reads. Every scalar also goes to ``metrics.jsonl`` in the same directory, which is
what scripts and tests parse.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any

import numpy as np

from kubeai_train._protowire import varint as _varint

__all__ = ["ScalarWriter"]


def _crc32c(data: bytes) -> int:
    try:
        import google_crc32c

        return int(google_crc32c.value(data))
    except ImportError:  # pragma: no cover - fallback
        import crc32c

        return int(crc32c.crc32c(data))


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint((num << 3) | wire) + payload


def _event(
    wall_time: float,
    step: int,
    tag: str | None = None,
    value: float | None = None,
    file_version: str | None = None,
) -> bytes:
    # Event: wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5
    # Summary: value=1 (repeated Value); Value: tag=1 (string), simple_value=2 (float)
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        fv = file_version.encode()
        msg += _field(3, 2, _varint(len(fv)) + fv)
    if tag is not None and value is not None:
        t = tag.encode()
        val = _field(1, 2, _varint(len(t)) + t) + _field(2, 5, struct.pack("<f", value))
        summ = _field(1, 2, _varint(len(val)) + val)
        msg += _field(5, 2, _varint(len(summ)) + summ)
    return msg


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class ScalarWriter:
    """Write scalars as TensorBoard events and JSON lines under ``log_dir`` (rank 0 only)."""

    def __init__(self, log_dir: str) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
        self._tb: Any = None
        self._events: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir)
        except ImportError:
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.kubeai"
            self._events = open(os.path.join(log_dir, name), "ab")  # noqa: SIM115
            self._events.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))

    @property
    def backend(self) -> str:
        return "tensorboard" if self._tb is not None else "builtin"

    def scalar(self, tag: str, value: float, step: int) -> None:
        value = float(value)
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)
        else:
            self._events.write(_record(_event(time.time(), step, tag, value)))
        row = {"step": step, "tag": tag, "value": value if np.isfinite(value) else None, "time": time.time()}
        self._jsonl.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        else:
            self._events.flush()

    def close(self) -> None:
        self.flush()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        else:
            self._events.close()
