"""A file dataset's split plan, made once per job and shared through a directory.

Planning a file dataset means reading every file's footer (Parquet) or header (ORC, CSV): its
schema and its row group / stripe boundaries. Done by every rank, that is ``files x ranks``
requests before the first batch -- 10 M GETs for 1,000 workers over 10,000 files -- and every
rank then reads each footer a second time when it opens a file to read it.

With a plan directory (``FileSource(plan_dir=...)`` or ``KUBEAI_TRAIN_PLAN_DIR``; the local
launcher sets one per job) one process, the planner (in a local or mounted directory the first
to take the plan's lock file; in an object store rank 0), reads the footers and writes the plan: per file its listing stamp (size and modification time), partitions, row group
bounds, schema and the raw footer bytes. Every other process lists the files (one request per
1,000 objects), loads the plan and, when the stamps of its own listing match the plan's, reads
no footer at all: not while planning and not when it opens a file to read row groups (the
footer travels with the plan), so it fetches only the column chunks it reads. A plan that does
not match the listing (files added, rewritten or removed since) is not used: the planner writes
a new one; another process waits for it, up to ``plan_timeout`` seconds, and then plans by
itself with a warning, so a missing planner slows a job down but never hangs or misreads it.

The plan is written atomically (a local file is renamed into place; an object store's single
PUT is atomic), so a reader sees a whole plan or none. It holds no credentials: the storage
options are the caller's, never written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from kubeai_train import cluster

__all__ = ["PLAN_DIR_ENV", "PLAN_VERSION", "FilePlan", "plan_key"]

log = logging.getLogger("kubeai_train.data")

#: The environment variable naming the plan directory (a local path or an fsspec URL).
PLAN_DIR_ENV = cluster.PLAN_DIR_ENV
PLAN_VERSION = 1
STALE_LOCK_S = 120.0  # a plan lock older than this is a planner that died


def plan_key(parts: Mapping[str, Any]) -> str:
    """The plan file's name for a dataset: a hash of what decides its files and splits."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def footer_bytes(md: pq.FileMetaData) -> bytes:
    """A parsed Parquet footer as bytes :func:`parse_footer` reads back."""
    sink = pa.BufferOutputStream()
    md.write_metadata_file(sink)
    return bytes(sink.getvalue().to_pybytes())


def parse_footer(raw: bytes) -> pq.FileMetaData:
    return pq.read_metadata(pa.BufferReader(raw))


def schema_bytes(schema: pa.Schema) -> bytes:
    return bytes(schema.serialize().to_pybytes())


def parse_schema(raw: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(raw))


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


class FilePlan:
    """The plan file of one dataset in a plan directory.

    Args:
        plan_dir: a local directory or an fsspec URL, shared by the job's processes.
        key: :func:`plan_key` of the dataset.
        storage_options: fsspec options for ``plan_dir`` (not written anywhere).
    """

    def __init__(self, plan_dir: str, key: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.plan_dir = plan_dir.rstrip("/")
        self.key = key
        self.fs, root = fsspec.core.url_to_fs(self.plan_dir, **dict(storage_options or {}))
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self.path = f"{root.rstrip('/')}/{key}.plan.json"

    def __repr__(self) -> str:
        return f"FilePlan({self.plan_dir}/{self.key}.plan.json)"

    def load(self) -> dict[str, Any] | None:
        """The plan as written, or None when there is none (or it cannot be parsed)."""
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            plan = json.loads(raw)
        except ValueError:
            log.warning("%r is not a plan (unparsable); ignoring it", self)
            return None
        if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION or plan.get("key") != self.key:
            return None
        return plan

    def write(self, files: Sequence[Mapping[str, Any]]) -> None:
        """Write the plan of ``files`` (each: path, format, partitions, stamp, bounds, schema,
        footer as bytes or None) atomically."""
        body = json.dumps(
            {
                "version": PLAN_VERSION,
                "key": self.key,
                "created": time.time(),
                "files": [
                    {
                        **{k: f[k] for k in ("path", "format", "partitions", "stamp", "bounds")},
                        "schema": _b64(f.get("schema")),
                        "footer": _b64(f.get("footer")),
                    }
                    for f in files
                ],
            }
        ).encode()
        if self.local:
            d = os.path.dirname(self.path)
            os.makedirs(d, exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(body)
            os.replace(tmp, self.path)
        else:
            self.fs.pipe_file(self.path, body)  # one PUT: visible whole or not at all
        log.info("wrote the split plan of %d files to %s", len(files), self.plan_dir)

    @staticmethod
    def files_of(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The plan's files with schema and footer decoded to bytes."""
        return [
            {**f, "schema": _unb64(f.get("schema")), "footer": _unb64(f.get("footer"))}
            for f in plan.get("files") or ()
        ]

    @staticmethod
    def matches(plan: Mapping[str, Any], listing: Sequence[tuple[str, str]]) -> bool:
        """Whether the plan was made from exactly these ``(path, stamp)`` files."""
        return [(f["path"], f["stamp"]) for f in plan.get("files") or ()] == list(listing)

    @property
    def _lock(self) -> str:
        return f"{self.path}.lock"

    def plan_or_lock(
        self, listing: Sequence[tuple[str, str]], timeout: float, poll: float = 0.05
    ) -> tuple[dict[str, Any] | None, bool]:
        """Local directories: a plan matching ``listing`` made by another process, or the plan's
        lock for this one to plan (``(None, True)``; :meth:`release` it after :meth:`write`).
        ``(None, False)`` after ``timeout`` seconds of another process holding the lock. A lock
        older than ``STALE_LOCK_S`` is a planner that died and is removed."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.close(os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                plan = self.load()
                if plan is not None and self.matches(plan, listing):
                    return plan, False
                try:
                    if time.time() - os.stat(self._lock).st_mtime > STALE_LOCK_S:
                        os.unlink(self._lock)  # a planner that died
                        continue
                except FileNotFoundError:
                    continue  # released meanwhile: look again
                if time.monotonic() >= deadline:
                    return None, False
                time.sleep(poll)
                continue
            plan = self.load()  # written between our first look and the lock
            if plan is not None and self.matches(plan, listing):
                self.release()
                return plan, False
            return None, True

    def release(self) -> None:
        try:
            os.unlink(self._lock)
        except FileNotFoundError:
            pass

    def wait(
        self, listing: Sequence[tuple[str, str]], timeout: float, poll: float = 0.1
    ) -> dict[str, Any] | None:
        """A plan matching ``listing``, polling until ``timeout`` seconds; None after that."""
        deadline = time.monotonic() + timeout
        while True:
            plan = self.load()
            if plan is not None and self.matches(plan, listing):
                return plan
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll)
