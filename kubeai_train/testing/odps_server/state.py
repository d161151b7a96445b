"""What the local ODPS server keeps between requests: tunnel download sessions, Storage API
read sessions, byte / request counters, and the partition-spec helpers both sides share."""

from __future__ import annotations

import email.utils
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from kubeai_train.testing.odps_server.catalog import PartitionData, TableInfo

__all__ = [
    "HttpError",
    "ReadSession",
    "Session",
    "Stats",
    "ROWRANGE",
    "STORAGE_PREFIX",
    "lookup_partition",
    "parse_spec",
    "record_rows",
    "rfc822",
    "spec_str",
]

logger = logging.getLogger("kubeai_train.testing.odps_server")


STORAGE_PREFIX = "/api/storage/v1"
ROWRANGE = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


@dataclass
class Session:
    id: str
    part: PartitionData
    created: float
    expired: bool = False


@dataclass
class ReadSession:
    """A Storage API batch-read session: rows of its partitions, concatenated in order."""

    id: str
    table: TableInfo
    parts: list[PartitionData]
    columns: list[str]
    partition_columns: list[str]
    split_rows: int  # 0: RowOffset mode (no splits, rows addressed by offset)
    created: float
    expired: bool = False

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.parts)

    def rows(self, start: int, count: int) -> pa.Table:
        pieces = []
        base = 0
        for part in self.parts:
            lo, hi = max(start, base), min(start + count, base + part.num_rows)
            if lo < hi:
                t = part.data.slice(lo - base, hi - lo).select(self.columns)
                for key in self.partition_columns:
                    value = dict(part.spec).get(key)
                    t = t.append_column(key, pa.repeat(pa.scalar(value, pa.string()), t.num_rows))
                pieces.append(t)
            base += part.num_rows
        if not pieces:
            schema = self.table.arrow_schema
            fields = [schema.field(c) for c in self.columns] + [
                pa.field(k, pa.string()) for k in self.partition_columns
            ]
            return pa.schema(fields).empty_table()
        return pa.concat_tables(pieces)


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    data_requests: int = 0
    body_bytes: int = 0
    data_bytes: int = 0
    sessions_created: int = 0
    auth_failures: int = 0
    faults_fired: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "data_requests": self.data_requests,
                "body_bytes": self.body_bytes,
                "data_bytes": self.data_bytes,
                "sessions_created": self.sessions_created,
                "auth_failures": self.auth_failures,
                "faults_fired": dict(self.faults_fired),
            }


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status, self.code, self.message = status, code, message


def parse_spec(text: str | None) -> tuple[tuple[str, str], ...]:
    """'ds=1,hh=02' or "ds='1'/hh='02'" -> (("ds", "1"), ("hh", "02"))."""
    if not text:
        return ()
    out = []
    for part in re.split(r"[,/]", text):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise HttpError(
                400, "InvalidPartitionSpec", f"partition spec {text!r} is not key=value[,key=value]"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out.append((key.strip(), value))
    return tuple(out)


def spec_str(spec: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in spec)


def lookup_partition(table: TableInfo, spec: tuple[tuple[str, str], ...]) -> tuple:
    """``spec`` when it names an existing partition of ``table`` (``()`` for an unpartitioned
    table), else the HTTP error ODPS answers with."""
    if not table.partition_keys:
        if spec:
            raise HttpError(
                400,
                "InvalidPartitionSpec",
                f"table {table.project}.{table.name} is not partitioned; got {spec_str(spec)}",
            )
        return ()
    if [k for k, _ in spec] != list(table.partition_keys):
        raise HttpError(
            400,
            "InvalidPartitionSpec",
            f"table {table.project}.{table.name} is partitioned by {','.join(table.partition_keys)}; "
            f"a full partition spec is needed, got {spec_str(spec) or 'none'!r}",
        )
    if spec not in table.partitions:
        raise HttpError(
            404,
            "NoSuchPartition",
            f"partition {spec_str(spec)} of table {table.project}.{table.name} does not exist",
        )
    return spec


def rfc822(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def record_rows(data: pa.Table, cols: list[tuple[str, str]]):
    arrays = []
    for name, odps_type in cols:
        col = data.column(name)
        if odps_type == "datetime":
            col = col.cast(pa.int64())
        elif odps_type == "date":
            col = col.cast(pa.int32())
        arrays.append(col.to_pylist())
    return zip(*arrays, strict=True)
