"""Tables of the local ODPS server, served from Parquet files under a root directory.

Layout (one directory per project, one per table; partitioned tables nest ``key=value``
directories, one level per partition key, in key order)::

    ROOT/<project>/<table>/*.parquet                       non-partitioned table
    ROOT/<project>/<table>/ds=20260101/*.parquet           partitioned by ds
    ROOT/<project>/<table>/ds=20260101/hh=01/*.parquet     partitioned by ds, hh

Rows of a table (or of one partition) are the rows of its files in file-name order. The column
schema comes from the first file's Parquet schema, mapped to ODPS types (int64 -> bigint,
float64 -> double, string -> string, ...); partition keys are ODPS strings.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Catalog", "CatalogError", "PartitionData", "TableInfo", "arrow_to_odps_type"]

_ARROW_TO_ODPS: list[tuple[pa.DataType, str]] = [
    (pa.int64(), "bigint"),
    (pa.int32(), "int"),
    (pa.int16(), "smallint"),
    (pa.int8(), "tinyint"),
    (pa.float64(), "double"),
    (pa.float32(), "float"),
    (pa.bool_(), "boolean"),
    (pa.string(), "string"),
    (pa.large_string(), "string"),
    (pa.binary(), "binary"),
    (pa.large_binary(), "binary"),
    (pa.date32(), "date"),
]
_ODPS_TO_ARROW = {
    "bigint": pa.int64(),
    "int": pa.int32(),
    "smallint": pa.int16(),
    "tinyint": pa.int8(),
    "double": pa.float64(),
    "float": pa.float32(),
    "boolean": pa.bool_(),
    "string": pa.string(),
    "binary": pa.binary(),
    "date": pa.date32(),
    "datetime": pa.timestamp("ms"),
}


class CatalogError(ValueError):
    """A table directory cannot be served (unsupported column type, inconsistent layout)."""


def arrow_to_odps_type(arrow_type: pa.DataType, where: str) -> str:
    """The ODPS type name serving an Arrow column type (as pyodps maps them back)."""
    for at, name in _ARROW_TO_ODPS:
        if arrow_type == at:
            return name
    if pa.types.is_timestamp(arrow_type):
        return "datetime"
    if pa.types.is_dictionary(arrow_type):
        return arrow_to_odps_type(arrow_type.value_type, where)
    raise CatalogError(
        f"{where}: Arrow type {arrow_type} has no ODPS counterpart served here; "
        "use int8..int64, float32/64, bool, string, binary, date32 or timestamp"
    )


@dataclass(frozen=True)
class TableInfo:
    """A table's metadata: columns (name, ODPS type), partition keys, partition values."""

    project: str
    name: str
    path: Path
    columns: tuple[tuple[str, str], ...]
    partition_keys: tuple[str, ...]
    partitions: tuple[tuple[tuple[str, str], ...], ...] = field(default=())

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(n, _ODPS_TO_ARROW[t]) for n, t in self.columns])

    def partition_dir(self, spec: tuple[tuple[str, str], ...]) -> Path:
        return self.path.joinpath(*(f"{k}={v}" for k, v in spec))


@dataclass
class PartitionData:
    """A snapshot of one table / partition's rows (what a download session reads)."""

    table: TableInfo
    spec: tuple[tuple[str, str], ...]
    data: pa.Table
    version: str

    @property
    def num_rows(self) -> int:
        return self.data.num_rows


def _parquet_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix == ".parquet")


class Catalog:
    """Reads the root directory on demand (so tables written after start-up are seen)."""

    def __init__(self, root: str | os.PathLike[str], cache_bytes: int = 1 << 30) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CatalogError(
                f"ODPS server root {self.root} is not a directory; create it or pass --root DIR"
            )
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, PartitionData] = OrderedDict()
        self._cache_bytes = cache_bytes

    def project_exists(self, project: str) -> bool:
        return _safe_name(project) and (self.root / project).is_dir()

    def tables(self, project: str) -> list[str]:
        if not self.project_exists(project):
            return []
        return sorted(p.name for p in (self.root / project).iterdir() if p.is_dir())

    def table(self, project: str, name: str) -> TableInfo | None:
        """The table's metadata, or None if it does not exist."""
        if not (_safe_name(project) and _safe_name(name)):
            return None
        path = self.root / project / name
        if not path.is_dir():
            return None
        keys: list[str] = []
        partitions: list[tuple[tuple[str, str], ...]] = []
        first_file: Path | None = None

        def walk(directory: Path, depth: int, spec: tuple[tuple[str, str], ...]) -> None:
            nonlocal first_file
            subdirs = sorted(p for p in directory.iterdir() if p.is_dir() and "=" in p.name)
            files = _parquet_files(directory)
            if subdirs and files:
                raise CatalogError(f"{directory}: holds both Parquet files and partition directories")
            if not subdirs:
                if depth == 0 or files:
                    partitions.append(spec)
                    if files and first_file is None:
                        first_file = files[0]
                return
            for sub in subdirs:
                key, _, value = sub.name.partition("=")
                if depth == len(keys):
                    keys.append(key)
                elif keys[depth] != key:
                    raise CatalogError(
                        f"{sub}: partition key {key!r} where {keys[depth]!r} was expected; "
                        "every partition must use the same keys in the same order"
                    )
                walk(sub, depth + 1, (*spec, (key, value)))

        walk(path, 0, ())
        if first_file is None:
            raise CatalogError(f"{path}: no Parquet file; a table needs at least one to define its schema")
        schema = pq.read_schema(first_file)
        columns = tuple(
            (f.name, arrow_to_odps_type(f.type, f"{first_file} column {f.name!r}")) for f in schema
        )
        if not keys:
            partitions = []
        return TableInfo(project, name, path, columns, tuple(keys), tuple(partitions))

    def _files(self, table: TableInfo, spec: tuple[tuple[str, str], ...] | None) -> list[Path]:
        specs = [spec] if spec is not None else (list(table.partitions) or [()])
        return [f for s in specs for f in _parquet_files(table.partition_dir(s))]

    def row_count(self, table: TableInfo, spec: tuple[tuple[str, str], ...] | None = None) -> int:
        """Rows of one partition, or of the whole table (``spec=None``), from Parquet footers."""
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self._files(table, spec))

    def byte_size(self, table: TableInfo, spec: tuple[tuple[str, str], ...] | None = None) -> int:
        return sum(f.stat().st_size for f in self._files(table, spec))

    def read(self, table: TableInfo, spec: tuple[tuple[str, str], ...]) -> PartitionData:
        """Load (or reuse) the rows of one partition (``spec=()`` for a non-partitioned table)."""
        directory = table.partition_dir(spec)
        files = _parquet_files(directory)
        stamp = hashlib.sha1()
        for f in files:
            st = f.stat()
            stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        version = stamp.hexdigest()[:16]
        key = (table.project, table.name, spec, version)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        schema = table.arrow_schema
        tables = [pq.read_table(f).select(schema.names) for f in files]
        data = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
        data = data.combine_chunks()
        part = PartitionData(table, spec, data, version)
        with self._lock:
            self._cache[key] = part
            while (
                sum(p.data.nbytes for p in self._cache.values()) > self._cache_bytes and len(self._cache) > 1
            ):
                self._cache.popitem(last=False)
        return part


def _safe_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and not name.startswith(".")
