"""The files source: Parquet, ORC and CSV on any fsspec filesystem, as splits.

``FileSource(url, **options)`` reads a local path, directory or glob, or any fsspec URL
(``file://``, ``memory://``, ``s3://``, ``oss://``, ``hdfs://``). Directories are searched
recursively; files whose names start with ``_`` or ``.`` (``_SUCCESS``, ``.crc``) are skipped.
Hive-style directories (``ds=20260101/hour=03/``) become string partition columns appended
to the schema, and ``partition_filter`` prunes files before anything is opened.

Splits:

* Parquet: one split per row group (``split_rows`` cuts big row groups into row ranges).
  Only the selected column chunks are fetched.
* ORC: one split per stripe. pyarrow does not expose stripe row counts, so opening an ORC
  dataset reads the cheapest column of every stripe once to count rows.
* CSV: one split per file (CSV cannot be cut without parsing). Opening a CSV dataset parses
  every file once (first column only) to count its rows; a row range inside a file is read by
  parsing from the start of the file. Prefer Parquet for anything large.

Storage options for fsspec are the caller's ``storage_options`` over the defaults a scheme's
provider supplies (``kubeai_train.data.registry.register_storage_options``, e.g. OSS endpoint
and credentials from the environment). ``cache_dir`` copies each remote file to local disk on
first read (keyed by URL, size and modification stamp) so later epochs read locally.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator
import os
import posixpath
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from kubeai_train import cluster
from kubeai_train.data import plan as _plan
from kubeai_train.data._retry import RetryPolicy, call_with_retry
from kubeai_train.data.registry import storage_options_for
from kubeai_train.data.types import (
    ColumnNotFoundError,
    CorruptFileError,
    DataError,
    DatasetNotFoundError,
    SchemaMismatchError,
    Source,
    Split,
)

__all__ = ["FORMATS", "FileSource"]

log = logging.getLogger("kubeai_train.data")

FORMATS = ("parquet", "orc", "csv")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".parq": "parquet",
    ".pq": "parquet",
    ".orc": "orc",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".csv.bz2": "csv",
    ".csv.zst": "csv",
    ".tsv": "csv",
}
_GLOB_CHARS = ("*", "?", "[")
_STREAM_BUFFER = 1 << 20
_FOOTERS_KEPT = 16
_THREADED_DECODE_BYTES = 32 << 20
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}

PartitionFilter = (
    Callable[[Mapping[str, str]], bool] | Mapping[str, Any] | Sequence[tuple[str, str, Any]] | None
)


def _format_of(path: str) -> str | None:
    name = posixpath.basename(path).lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def _hidden(path: str, root: str) -> bool:
    rel = path[len(root) :] if path.startswith(root) else posixpath.basename(path)
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _partitions(path: str, root: str) -> dict[str, str]:
    rel = path[len(root) :] if path.startswith(root) else ""
    parts: dict[str, str] = {}
    for seg in rel.split("/")[:-1]:
        k, eq, v = seg.partition("=")
        if eq and k:
            parts[k] = v
    return parts


def _compile_filter(flt: PartitionFilter) -> Callable[[Mapping[str, str]], bool] | None:
    """Partition filter as a predicate on ``{key: value}`` (values are strings)."""
    if flt is None:
        return None
    if callable(flt):
        return flt  # type: ignore[return-value]
    if isinstance(flt, Mapping):
        items = list(flt.items())
        triples = [(k, "in" if isinstance(v, (list, tuple, set, frozenset)) else "==", v) for k, v in items]
    else:
        triples = []
        for t in flt:
            if not (isinstance(t, (tuple, list)) and len(t) == 3 and t[1] in _OPS):
                raise ValueError(
                    f"partition_filter entries must be (key, op, value) with op in {list(_OPS)}, got {t!r}"
                )
            triples.append((t[0], t[1], t[2]))

    def pred(parts: Mapping[str, str]) -> bool:
        for key, op, want in triples:
            if key not in parts:
                raise ValueError(
                    f"partition_filter key {key!r} is not a partition of this dataset; partitions: {sorted(parts)}"
                )
            have: Any = parts[key]
            sample = next(iter(want), None) if op in ("in", "not in") else want
            if isinstance(sample, (int, float)) and not isinstance(sample, bool):
                try:
                    have = type(sample)(have)
                except ValueError:
                    return False
            if op in ("in", "not in"):
                want = set(want)
            if not _OPS[op](have, want):
                return False
        return True

    return pred


@dataclass
class _File:
    """What the source knows about one file after opening it once (pickled to workers)."""

    path: str
    format: str
    partitions: dict[str, str]
    stamp: str
    bounds: list[int] = field(default_factory=list)  # row group / stripe starts, plus the end
    schema: pa.Schema | None = None

    @property
    def num_rows(self) -> int:
        return self.bounds[-1] if self.bounds else 0


class FileSource(Source):
    """Parquet / ORC / CSV files on any fsspec filesystem.

    Args:
        url: a path, directory, glob or fsspec URL (or a list of them, read in that order).
        format: ``"parquet"``, ``"orc"`` or ``"csv"`` for files whose extension does not say.
        storage_options: fsspec options for the filesystem (explicit ones win over the
            scheme provider's defaults).
        partition_filter: keep only files whose hive partitions match: a callable on
            ``{key: value}``, a mapping ``{"ds": "20260101"}`` / ``{"ds": ["a", "b"]}``, or
            ``[("ds", ">=", "20260101"), ...]`` (ANDed; int/float values compare numerically).
        partition_columns: append the hive partition values as string columns (default True).
        split_rows: cut row groups / stripes larger than this into row ranges.
        batch_rows: rows per record batch handed to the pipeline: the unit of decoded Arrow
            data held (a constant in peak memory: the pipeline holds ``read_ahead + 2`` of
            them; 8192 keeps it small without slowing reads much).
        use_threads: decode the columns of a Parquet batch on Arrow's thread pool: up to ~12%
            faster for 40 columns on 2 cores, but it holds a whole decoded row group in memory
            (92 MiB instead of 29 MiB for one 2M-row row group of 9 columns) and makes RSS
            noisy (allocator caches per thread: 18-37 MiB growth for the same read). ``None``:
            only for row groups whose selected columns decode to at most 32 MiB. Default
            ``False``: the pipeline's read-ahead thread already overlaps decoding with conversion,
            and peak memory stays bounded whatever the row group size.
        cache_dir: copy remote files to this local directory on first read.
        csv_options: ``delimiter``, ``column_names`` (no header line), ``column_types``.
        retries / backoff: transient errors while opening files (reads are retried by the
            pipeline).
        plan_dir: a directory (local path or fsspec URL) the job's processes share, where
            the split plan is made once per job: the planner reads the footers and writes
            them with the bounds; the others list the files, load the plan and read no footer
            (:mod:`kubeai_train.data.plan`). Default ``KUBEAI_TRAIN_PLAN_DIR`` (the local
            launcher sets it per job); None / "" plans in this process as before.
        planner: True: this process plans (reading the footers) unless a matching plan is
            there; False: it waits for another's. Default: in a local or mounted directory
            the first process to take the plan's lock file plans while the others wait (so a
            dataset only some ranks read is planned by one of them); in an object store
            (``oss://...``, no atomic create) rank 0 plans and the others wait.
        plan_timeout: how long a process waits for another's plan before it plans by itself
            (with a warning): a slow planner costs time, never a wrong or hung read.
        plan_storage_options: fsspec options for ``plan_dir`` (default: ``storage_options``
            when ``plan_dir`` is on the same scheme as the data, else none).

    Raises:
        DatasetNotFoundError: nothing matched ``url`` (after filtering).
        SchemaMismatchError: two files disagree on a column (names both and the column).
        CorruptFileError: a file's footer / header cannot be decoded (names the file).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        format: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        partition_filter: PartitionFilter = None,
        partition_columns: bool = True,
        split_rows: int | None = None,
        batch_rows: int = 8192,
        use_threads: bool | None = False,
        cache_dir: str | os.PathLike[str] | None = None,
        csv_options: Mapping[str, Any] | None = None,
        retries: int = 3,
        backoff: float = 0.2,
        plan_dir: str | os.PathLike[str] | None = None,
        planner: bool | None = None,
        plan_timeout: float = 60.0,
        plan_storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        urls = [url] if isinstance(url, (str, os.PathLike)) else list(url)
        if not urls or not all(isinstance(u, (str, os.PathLike)) and str(u) for u in urls):
            raise ValueError(f"url must be a non-empty path / URL or a list of them, got {url!r}")
        self.urls = [os.fspath(u) for u in urls]
        self.url = self.urls[0] if len(self.urls) == 1 else ",".join(self.urls)
        if format is not None and format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        if split_rows is not None and (not isinstance(split_rows, int) or split_rows < 1):
            raise ValueError(f"split_rows must be an integer >= 1, got {split_rows!r}")
        if not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
        self.format = format
        self.storage_options = dict(storage_options or {})
        self.partition_filter = partition_filter
        self.partition_columns = partition_columns
        self.split_rows = split_rows
        self.batch_rows = batch_rows
        self.use_threads = None if use_threads is None else bool(use_threads)
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.csv_options = dict(csv_options or {})
        unknown = set(self.csv_options) - {"delimiter", "column_names", "column_types"}
        if unknown:
            raise ValueError(
                f"csv_options {sorted(unknown)} not understood; use delimiter, column_names, column_types"
            )
        self.retry = RetryPolicy(retries=retries, backoff=backoff)
        if plan_dir is None:
            plan_dir = os.environ.get(_plan.PLAN_DIR_ENV) or None
        if isinstance(plan_timeout, bool) or not isinstance(plan_timeout, (int, float)) or plan_timeout < 0:
            raise ValueError(f"plan_timeout must be a number of seconds >= 0, got {plan_timeout!r}")
        self.plan_dir = os.fspath(plan_dir) if plan_dir else None
        self.planner = planner
        self.plan_timeout = float(plan_timeout)
        self.plan_storage_options = plan_storage_options
        self.plan_source = "none"  # how the splits were planned: none | wrote | loaded | own
        self._raw_footers: dict[str, bytes] = {}
        self._fs: fsspec.AbstractFileSystem | None = None
        self._fs_pid = 0
        # parsed Parquet footers of the files read last, this process only: bounded, since a
        # footer can be large (row groups x columns) and a dataset can have many files
        self._meta: OrderedDict[str, pq.FileMetaData] = OrderedDict()
        self._files: list[_File] | None = None
        self._schema: pa.Schema | None = None
        self._splits: list[Split] | None = None
        self._by_path: dict[str, _File] = {}
        self._pred = _compile_filter(partition_filter)
        self._discover()

    # -- pickling: keep what was learned, drop live handles ------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_fs"] = None
        d["_meta"] = OrderedDict()
        d["_pred"] = None  # only needed for discovery, and may be an unpicklable lambda
        d["partition_filter"] = None if self.partition_filter is None else repr(self.partition_filter)
        return d

    def __repr__(self) -> str:
        return f"FileSource({self.url!r}, files={len(self._files or [])})"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # a forked DataLoader worker must not share the parent's connections
        if self._fs is None or self._fs_pid != os.getpid():
            opts = storage_options_for(self.urls[0], self.storage_options)
            self._fs, _ = fsspec.core.url_to_fs(self.urls[0], **opts)
            self._fs_pid = os.getpid()
        return self._fs

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protos = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "file" in protos or "local" in protos

    def describe(self) -> dict[str, Any]:
        files = self._files or []
        return {
            "type": "files",
            "url": self.url,  # URLs carry no credentials; storage options (which may) are not logged
            "files": len(files),
            "formats": sorted({f.format for f in files}),
            "rows": sum(f.num_rows for f in files),
            "splits": len(self.splits()),
            "partition_filter": None if self.partition_filter is None else repr(self.partition_filter)[:200],
            "cache_dir": self.cache_dir,
        }

    # -- discovery -----------------------------------------------------------------------------
    def _list(self, url: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(path, root, info) of every data file under ``url``."""
        fs = self.fs
        _, path = fsspec.core.url_to_fs(url, **storage_options_for(url, self.storage_options))
        path = path.rstrip("/") or "/"
        if any(c in path for c in _GLOB_CHARS):
            cut = min(path.find(c) for c in _GLOB_CHARS if c in path)
            root = path[: path.rfind("/", 0, cut) + 1]
            found = fs.glob(path, detail=True)
            entries = [(p, root, i) for p, i in found.items() if i.get("type") != "directory"]
        elif fs.isdir(path):
            root = path.rstrip("/") + "/"
            found = fs.find(path, detail=True)
            entries = [(p, root, i) for p, i in found.items() if i.get("type") != "directory"]
        elif fs.exists(path):
            entries = [(path, posixpath.dirname(path) + "/", fs.info(path))]
        else:
            raise DatasetNotFoundError(f"no file or directory at {url!r}; check the path", path=url)
        out = []
        for p, root, info in entries:
            if _hidden(p, root):
                continue
            if self.format is None and _format_of(p) is None:
                continue
            out.append((p, root, info))
        return out

    def _discover(self) -> None:
        files: list[_File] = []
        seen = set()
        for url in self.urls:
            listed = call_with_retry(
                functools.partial(self._list, url), self.is_transient, self.retry, f"listing {url}"
            )
            if not listed:
                raise DatasetNotFoundError(
                    f"no Parquet / ORC / CSV files under {url!r} (extensions {', '.join(sorted(_EXTENSIONS))}); "
                    "pass format= for other names",
                    path=url,
                )
            for p, root, info in sorted(listed, key=lambda e: e[0]):
                if p in seen:
                    continue
                seen.add(p)
                parts = _partitions(p, root)
                if self._pred is not None and not self._pred(parts):
                    continue
                fmt = self.format or _format_of(p) or "parquet"
                stamp = str(
                    info.get("mtime")
                    or info.get("LastModified")
                    or info.get("ETag")
                    or info.get("etag")
                    or ""
                )
                files.append(_File(p, fmt, parts, f"{info.get('size')}:{stamp}"))
        if not files:
            raise DatasetNotFoundError(
                f"no files under {self.url!r} match partition_filter={self.partition_filter!r}",
                path=self.url,
            )
        fp = self._plan_file()
        applied, locked = (False, False) if fp is None else self._from_plan(fp, files)
        try:
            if not applied:
                for f in files:
                    call_with_retry(
                        functools.partial(self._inspect, f),
                        self.is_transient,
                        self.retry,
                        f"opening {f.path}",
                    )
                if fp is not None:
                    self._write_plan(fp, files)
        finally:
            if locked and fp is not None:
                fp.release()
        self._files = files
        self._by_path = {f.path: f for f in files}
        self._schema = self._unify(files)

    # -- the job's shared plan -----------------------------------------------------------------
    def _plan_file(self) -> _plan.FilePlan | None:
        if not self.plan_dir:
            return None
        flt = self.partition_filter
        if flt is not None and not isinstance(flt, (Mapping, list, tuple)):
            # a callable's identity differs between processes: no key they would all agree on
            log.info("a callable partition_filter: each process plans %s by itself", self.url)
            return None
        key = _plan.plan_key(
            {
                "urls": self.urls,
                "format": self.format,
                "partition_filter": flt,
                "partition_columns": self.partition_columns,
                "split_rows": self.split_rows,
                "csv": self.csv_options,
            }
        )
        opts = self.plan_storage_options
        if opts is None:
            same = fsspec.core.split_protocol(self.plan_dir)[0] == fsspec.core.split_protocol(self.urls[0])[0]
            opts = storage_options_for(self.plan_dir, self.storage_options if same else None)
        return _plan.FilePlan(self.plan_dir, key, opts)

    def _planner(self) -> bool:
        if self.planner is not None:
            return bool(self.planner)
        try:
            return cluster.current().rank == 0
        except cluster.ClusterError:  # a malformed cluster env is reported by whoever uses it
            return True

    def _from_plan(self, fp: _plan.FilePlan, files: list[_File]) -> tuple[bool, bool]:
        """Fill ``files`` from the job's plan if one matches their listing.

        Returns (applied, locked): whether the plan was applied, and whether this process holds
        the plan's lock (it plans and writes; the caller releases it).
        """
        listing = [(f.path, f.stamp) for f in files]
        plan = fp.load()
        if plan is None or not fp.matches(plan, listing):
            if self.planner is None and fp.local:
                # a local (or mounted) directory: whoever comes first plans, under a lock; the
                # others wait while the lock is held, so a dataset only some ranks read plans too
                plan, locked = fp.plan_or_lock(listing, self.plan_timeout)
                if locked:
                    return False, True
            elif self._planner():
                return False, False
            else:
                log.info(
                    "waiting up to %.0fs for the split plan of %s in %s", self.plan_timeout, self.url, fp
                )
                plan = fp.wait(listing, self.plan_timeout)
            if plan is None:
                log.warning(
                    "no split plan of %s from the planner in %s within %.0fs; reading the footers here",
                    self.url,
                    fp,
                    self.plan_timeout,
                )
                self.plan_source = "own"
                return False, False
        for f, entry in zip(files, fp.files_of(plan), strict=True):
            f.bounds = [int(x) for x in entry["bounds"]]
            footer = entry.get("footer")
            if footer is not None:
                self._raw_footers[f.path] = footer
                f.schema = _plan.parse_footer(footer).schema.to_arrow_schema()
            elif entry.get("schema") is not None:
                f.schema = _plan.parse_schema(entry["schema"])
        self.plan_source = "loaded"
        return True, False

    def _write_plan(self, fp: _plan.FilePlan, files: list[_File]) -> None:
        entries = []
        for f in files:
            entries.append(
                {
                    "path": f.path,
                    "format": f.format,
                    "partitions": f.partitions,
                    "stamp": f.stamp,
                    "bounds": f.bounds,
                    "schema": _plan.schema_bytes(f.schema) if f.schema is not None else None,
                    "footer": self._raw_footers.get(f.path),
                }
            )
        try:
            fp.write(entries)
            if self.plan_source != "own":
                self.plan_source = "wrote"
        except OSError as e:
            log.warning("could not write the split plan to %s (%s); the others plan by themselves", fp, e)

    def _inspect(self, f: _File) -> None:
        """Read the footer / header of ``f``: its schema and row group / stripe boundaries."""
        try:
            with self._open(f) as fh:
                if f.format == "parquet":
                    pf = pq.ParquetFile(fh)
                    md = pf.metadata
                    self._remember(f.path, md)
                    if self.plan_dir:  # every footer goes into the plan (the parsed cache is bounded)
                        self._raw_footers[f.path] = _plan.footer_bytes(md)
                    f.schema = pf.schema_arrow
                    f.bounds = [0]
                    for i in range(md.num_row_groups):
                        f.bounds.append(f.bounds[-1] + md.row_group(i).num_rows)
                elif f.format == "orc":
                    of = paorc.ORCFile(fh)
                    f.schema = of.schema
                    cheap = _cheapest_column(of.schema)
                    f.bounds = [0]
                    for i in range(of.nstripes):
                        n = of.read_stripe(i, columns=[cheap]).num_rows if cheap else 0
                        f.bounds.append(f.bounds[-1] + n)
                else:
                    reader = pacsv.open_csv(fh, **self._csv_kwargs(None, None))
                    f.schema = reader.schema
                    first = f.schema.names[0] if f.schema.names else None
                    rows = 0
                    if first is not None:
                        with self._open(f) as fh2:
                            counter = pacsv.open_csv(fh2, **self._csv_kwargs([first], f.schema))
                            for b in counter:
                                rows += b.num_rows
                    f.bounds = [0, rows] if rows else [0]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, EOFError) as e:
            raise CorruptFileError(
                f"{f.path}: cannot read the {f.format} footer/header ({_oneline(e)}); the file is corrupt or truncated: "
                "rewrite it or move it out of the dataset",
                path=f.path,
            ) from e
        except OSError as e:
            if self.is_local or isinstance(e, (FileNotFoundError, PermissionError)):
                raise CorruptFileError(
                    f"{f.path}: cannot read the {f.format} footer/header ({_oneline(e)}); the file is corrupt or truncated",
                    path=f.path,
                ) from e
            raise

    def _remember(self, path: str, md: pq.FileMetaData) -> None:
        self._meta[path] = md
        self._meta.move_to_end(path)
        while len(self._meta) > _FOOTERS_KEPT:
            self._meta.popitem(last=False)

    def _footer(self, path: str) -> pq.FileMetaData | None:
        md = self._meta.get(path)
        if md is not None:
            self._meta.move_to_end(path)
            return md
        raw = self._raw_footers.get(path)
        if raw is not None:  # the job's plan carried it: no footer read
            md = _plan.parse_footer(raw)
            self._remember(path, md)
        return md

    def _unify(self, files: Sequence[_File]) -> pa.Schema:
        first = files[0]
        base = first.schema
        if base is None:  # pragma: no cover - _inspect always sets it
            raise DataError(f"{first.path}: no schema")
        if first.format == "csv" and any(f.format == "csv" for f in files[1:]):
            # CSV types are inferred per file: widen them to one schema, then read every file with it
            try:
                base = pa.unify_schemas(
                    [f.schema for f in files if f.format == "csv" and f.schema is not None],
                    promote_options="permissive",
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass
        for f in files[1:]:
            other = f.schema
            if other is None:  # pragma: no cover
                continue
            for fld in base:
                idx = other.get_field_index(fld.name)
                if idx < 0:
                    raise SchemaMismatchError(
                        f"column {fld.name!r} is in {first.path} but not in {f.path}; "
                        "all files of a dataset need the same columns",
                        column=fld.name,
                        paths=(first.path, f.path),
                    )
                ofld = other.field(idx)
                if not ofld.type.equals(fld.type) and not (f.format == "csv" and first.format == "csv"):
                    raise SchemaMismatchError(
                        f"column {fld.name!r} is {fld.type} in {first.path} but {ofld.type} in {f.path}; "
                        "rewrite one of them with the other's type",
                        column=fld.name,
                        paths=(first.path, f.path),
                    )
            for name in other.names:
                if base.get_field_index(name) < 0:
                    raise SchemaMismatchError(
                        f"column {name!r} is in {f.path} but not in {first.path}; "
                        "all files of a dataset need the same columns",
                        column=name,
                        paths=(first.path, f.path),
                    )
        if self.partition_columns:
            keys: list[str] = []
            for f in files:
                for k in f.partitions:
                    if k not in keys:
                        keys.append(k)
            for k in keys:
                if base.get_field_index(k) < 0:
                    base = base.append(pa.field(k, pa.string()))
        return base

    # -- Source API --------------------------------------------------------------------------
    def schema(self) -> pa.Schema:
        if self._schema is None:  # pragma: no cover - set in __init__
            raise DataError("source not opened")
        return self._schema

    def files(self) -> list[str]:
        """The data files read, in order (after partition filtering)."""
        return [f.path for f in self._files or []]

    def splits(self) -> Sequence[Split]:
        if self._splits is None:
            out: list[Split] = []
            for f in self._files or []:
                b = f.bounds
                for i in range(len(b) - 1):
                    start, stop = b[i], b[i + 1]
                    step = self.split_rows or max(stop - start, 1)
                    for a in range(start, stop, step):
                        out.append(
                            Split(
                                f.path,
                                a,
                                min(stop, a + step),
                                {"path": f.path, "format": f.format, "unit": i},
                            )
                        )
            self._splits = out
        return self._splits

    def read(
        self, split: Split, columns: Sequence[str] | None = None, offset: int = 0
    ) -> Iterator[pa.RecordBatch]:
        f = self._by_path.get(split.key)
        if f is None:
            raise DataError(f"split {split!r} does not belong to {self.url!r}")
        schema = self.schema()
        cols = list(schema.names) if columns is None else list(columns)
        missing = [c for c in cols if schema.get_field_index(c) < 0]
        if missing:
            raise ColumnNotFoundError(
                f"column {missing[0]!r} not in {self.url}; columns: {', '.join(schema.names)}",
                column=missing[0],
            )
        file_cols = [
            c for c in cols if c not in f.partitions or (f.schema and f.schema.get_field_index(c) >= 0)
        ]
        lo, hi = split.start + offset, split.stop
        if lo >= hi:
            return
        out_schema = pa.schema([schema.field(c) for c in cols])
        for batch, unit in self._read_range(f, file_cols, lo, hi):
            yield self._finish(batch, f, cols, out_schema, unit)

    # -- reading -----------------------------------------------------------------------------
    def _finish(
        self, batch: pa.RecordBatch, f: _File, cols: list[str], out_schema: pa.Schema, unit: int
    ) -> pa.RecordBatch:
        arrays = []
        n = batch.num_rows
        for c in cols:
            idx = batch.schema.get_field_index(c)
            if idx >= 0:
                arr = batch.column(idx)
            else:
                arr = pa.repeat(pa.scalar(f.partitions.get(c), pa.string()), n)
            want = out_schema.field(c).type
            if not arr.type.equals(want):
                try:
                    arr = arr.cast(want)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise SchemaMismatchError(
                        f"column {c!r} in {f.path} (unit {unit}) cannot be read as {want}: {e}",
                        column=c,
                        path=f.path,
                    ) from e
            arrays.append(arr)
        return pa.RecordBatch.from_arrays(arrays, schema=out_schema)

    def _read_range(
        self, f: _File, cols: list[str], lo: int, hi: int
    ) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Rows [lo, hi) of file ``f`` (projected to ``cols``) with the unit each came from."""
        b = f.bounds
        units = [i for i in range(len(b) - 1) if b[i] < hi and b[i + 1] > lo]
        unit = units[0] if units else 0
        what = "row group" if f.format == "parquet" else "stripe" if f.format == "orc" else "rows from"
        try:
            with self._open(f) as fh:
                if f.format == "parquet":
                    # the footer parsed at open time: no second footer read per split. Remote
                    # files pre-buffer: the selected column chunks of a row group are fetched
                    # up front as a few coalesced ranges (adjacent chunks merged, gaps of
                    # unselected columns above 8 KiB skipped) instead of one request per page
                    # read through the Python file layer; same bytes, far fewer round trips
                    # Local files stream column chunks through a 1 MiB buffer, so memory does
                    # not grow with the row group size.
                    remote = not isinstance(fh, pa.NativeFile)
                    pf = pq.ParquetFile(
                        fh,
                        metadata=self._footer(f.path),
                        pre_buffer=remote,
                        buffer_size=0 if remote else _STREAM_BUFFER,
                    )
                    self._remember(f.path, pf.metadata)
                    for unit in units:
                        yield from (
                            (bt, unit)
                            for bt in self._clip(self._parquet_unit(pf, unit, cols), b[unit], lo, hi)
                        )
                elif f.format == "orc":
                    of = paorc.ORCFile(fh)
                    for unit in units:
                        # read_stripe(columns=[]) returns no rows: count from the bounds instead
                        if cols:
                            batch = of.read_stripe(unit, columns=cols)
                        else:
                            batch = _empty_batch(b[unit + 1] - b[unit])
                        yield from ((bt, unit) for bt in self._clip(iter([batch]), b[unit], lo, hi))
                else:
                    unit = 0
                    reader = pacsv.open_csv(fh, **self._csv_kwargs(cols or None, self.schema()))
                    batches = (bt if cols else _empty_batch(bt.num_rows) for bt in reader)
                    yield from ((bt, 0) for bt in self._clip(batches, 0, lo, hi))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, EOFError) as e:
            raise CorruptFileError(
                f"{f.path}: {what} {unit} cannot be decoded ({_oneline(e)}); the file is corrupt or truncated: "
                "rewrite it or move it out of the dataset",
                path=f.path,
                row_group=unit,
            ) from e
        except OSError as e:
            if self.is_local and not isinstance(e, (FileNotFoundError, PermissionError)):
                raise CorruptFileError(
                    f"{f.path}: {what} {unit} cannot be decoded ({_oneline(e)}); the file is corrupt or truncated",
                    path=f.path,
                    row_group=unit,
                ) from e
            raise

    def _parquet_unit(self, pf: pq.ParquetFile, unit: int, cols: list[str]) -> Iterator[pa.RecordBatch]:
        if not cols:
            n = pf.metadata.row_group(unit).num_rows
            for a in range(0, n, self.batch_rows):
                yield _empty_batch(min(self.batch_rows, n - a))
            return
        threads = self.use_threads
        if threads is None:
            md = pf.metadata.row_group(unit)
            wanted = set(cols)
            size = sum(
                md.column(j).total_uncompressed_size
                for j in range(md.num_columns)
                if md.column(j).path_in_schema.split(".")[0] in wanted
            )
            threads = size <= _THREADED_DECODE_BYTES
        yield from pf.iter_batches(
            batch_size=self.batch_rows, row_groups=[unit], columns=cols, use_threads=threads
        )

    @staticmethod
    def _clip(
        batches: Iterator[pa.RecordBatch], first_row: int, lo: int, hi: int
    ) -> Iterator[pa.RecordBatch]:
        """Keep rows [lo, hi) of a stream of batches whose first row is ``first_row``."""
        pos = first_row
        for bt in batches:
            n = bt.num_rows
            a, z = max(lo - pos, 0), min(hi - pos, n)
            pos += n
            if z > a:
                yield bt if (a == 0 and z == n) else bt.slice(a, z - a)
            if pos >= hi:
                return

    def _csv_kwargs(self, cols: list[str] | None, schema: pa.Schema | None) -> dict[str, Any]:
        o = self.csv_options
        read = pacsv.ReadOptions(column_names=o.get("column_names"), block_size=8 << 20)
        parse = pacsv.ParseOptions(delimiter=o.get("delimiter", ","))
        types = dict(o.get("column_types") or {})
        if schema is not None:
            for fld in schema:
                types.setdefault(fld.name, fld.type)
        conv = pacsv.ConvertOptions(
            column_types=types or None, include_columns=cols, strings_can_be_null=True
        )
        return {"read_options": read, "parse_options": parse, "convert_options": conv}

    # -- files and the local cache --------------------------------------------------------------
    def _open(self, f: _File) -> BinaryIO:
        comp = "infer" if f.format == "csv" else None
        if self.is_local:
            local = f.path
        elif self.cache_dir is not None:
            local = self._cached(f)
        else:
            return self.fs.open(f.path, "rb", compression=comp)  # type: ignore[no-any-return]
        if f.format == "csv":
            return fsspec.open(local, "rb", compression=comp).open()  # type: ignore[no-any-return]
        # a native Arrow file: reads column chunks straight into Arrow buffers (no Python file
        # layer, no GIL), and not memory-mapped, so page cache is not counted in our RSS
        return pa.OSFile(local, "rb")  # type: ignore[return-value]

    def _cached(self, f: _File) -> str:
        """Local copy of a remote file, made atomically on first use."""
        if self.cache_dir is None:  # pragma: no cover - callers check
            raise DataError("no cache_dir")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        digest = hashlib.sha256(f"{protocol}://{f.path}|{f.stamp}".encode()).hexdigest()[:32]
        name = f"{digest}-{posixpath.basename(f.path)}"
        local = os.path.join(self.cache_dir, name)
        if not os.path.exists(local):
            os.makedirs(self.cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".part-")
            os.close(fd)
            try:
                self.fs.get_file(f.path, tmp)
                os.replace(tmp, local)  # concurrent readers of one node race harmlessly
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            log.debug("cached %s at %s", f.path, local)
        return local


def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split())


def _cheapest_column(schema: pa.Schema) -> str | None:
    for fld in schema:
        if pa.types.is_primitive(fld.type):
            return fld.name
    return schema.names[0] if schema.names else None


def _empty_batch(n: int) -> pa.RecordBatch:
    """A batch with ``n`` rows and no columns (a projection of nothing still counts rows)."""
    return pa.record_batch([pa.nulls(n)], names=["_"]).select([])
