"""``odps://`` source: MaxCompute (ODPS) tables read through the real pyodps client's tunnel.

URL: ``odps://<project>/tables/<table>[/<partition spec>]`` where the spec is a full or leading
partial spec, ``ds=20260101`` or ``ds=20260101/hh=01`` (``,`` also separates keys). A partial
spec reads every partition under it, in partition order.

How it reads: one TableTunnel download session per table / partition per job, splits are row
ranges of it, and rows come through the Arrow tunnel (``?data&arrow``, never the per-record
reader). By default (``reader="fast"``) the download request is made and signed by pyodps's
own session / RestClient, and its body is decoded here: scatter reads put every chunk's data at
its final place in one Arrow buffer (no copy besides the kernel's), every chunk's CRC32C is
verified with hardware CRC32C and the whole-stream CRC derived from the chunk CRCs, and each
Arrow IPC message becomes a record batch that references that buffer.
``reader="pyodps"`` uses ``TableDownloadSession.open_arrow_reader`` unchanged instead, and
``reader="storage"`` the Storage API (``odps.apis.storage_api`` batch-read sessions, read by
row offset with pyodps's ``ArrowReader``). The tunnel is the default because its bodies carry a
CRC32C per chunk that is verified here (Storage API bodies carry none), its download session
is shared by id across all processes of a job, and any row range can be addressed; measured
on the local server the fast tunnel reader is also the faster one (benchmarks/bench_odps.py).

Sharing the download session (every rank and loader worker must read the same snapshot, and
ODPS limits sessions): the session id of each partition is taken from, in order,

1. the ``sessions`` option: ``{"<project>.<table>[/<spec>]": "<download id>"}``;
2. the ``KUBEAI_ODPS_SESSIONS`` environment variable: the same mapping as JSON, which a chief,
   a launcher or a scheduler sets after ``create_sessions(url)`` /
   ``python -m kubeai_train.data.odps sessions URL`` (prints the ``export`` line);
3. a shared directory (``session_dir`` option or ``KUBEAI_ODPS_SESSION_DIR``): the first process
   creates the session under a lock file, the others reuse the id it writes;
4. otherwise the process creates one when it first needs it; the source object then carries
   the id to its DataLoader workers (pickled), so there is one session per rank.

Faults: a reset or truncated body, HTTP 5xx and a CRC mismatch reopen the download at the exact
row where the last complete batch ended (no row lost or duplicated), up to ``reopens`` times;
then :class:`~kubeai_train.data.types.ReadFailedError`. An expired session is replaced by a new
one; if its row count differs, :class:`OdpsTableChangedError`. Missing table / partition:
:class:`~kubeai_train.data.types.DatasetNotFoundError`; bad credentials or no permission:
:class:`OdpsPermissionError`; each names project, table and partition.

Credentials and endpoints (explicit options win): ``endpoint`` / ``ODPS_ENDPOINT``,
``tunnel_endpoint`` / ``ODPS_TUNNEL_ENDPOINT``, ``access_id`` / ``ALIBABA_CLOUD_ACCESS_KEY_ID``,
``secret_access_key`` / ``ALIBABA_CLOUD_ACCESS_KEY_SECRET``, ``security_token`` /
``ALIBABA_CLOUD_SECURITY_TOKEN`` (STS). The project is the URL's. The secret is never logged,
never in ``repr`` / ``describe`` / errors.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa

from kubeai_train.data.types import (
    ColumnNotFoundError,
    DataError,
    DatasetNotFoundError,
    ReadFailedError,
    Source,
    Split,
)

try:
    import crc32c as _crc32c  # hardware CRC32C (SSE4.2 / ARMv8) that accepts memoryviews
    import odps as _odps  # noqa: F401  (fail early with the install hint)
    import requests
    import urllib3
    from odps import ODPS
    from odps import errors as odps_errors
    from odps.tunnel import TableTunnel
    from odps.tunnel.io.stream import CompressOption
    from odps.tunnel.io.types import odps_type_to_arrow_type
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError("reading odps:// needs pyodps: pip install 'kubeai_train[odps]'") from _e


__all__ = [
    "SESSIONS_ENV",
    "SESSION_DIR_ENV",
    "OdpsPermissionError",
    "OdpsSessionError",
    "OdpsSource",
    "OdpsTableChangedError",
    "create_sessions",
    "main",
]

log = logging.getLogger("kubeai_train.data")

SESSIONS_ENV = "KUBEAI_ODPS_SESSIONS"
SESSION_DIR_ENV = "KUBEAI_ODPS_SESSION_DIR"
_COMPRESSION = {
    None: None,
    "none": None,
    "lz4": CompressOption.CompressAlgorithm.ODPS_LZ4,
    "zstd": CompressOption.CompressAlgorithm.ODPS_ZSTD,
    "zlib": CompressOption.CompressAlgorithm.ODPS_ZLIB,
    "deflate": CompressOption.CompressAlgorithm.ODPS_ZLIB,
}
_READERS = ("fast", "pyodps", "storage")
_URL = re.compile(r"^odps://(?P<project>[^/]+)/tables/(?P<table>[^/]+)(?:/(?P<spec>.*))?$")
_ACCESS_DENIED = (
    odps_errors.NoPermission,
    odps_errors.SignatureNotMatch,
    odps_errors.AuthorizationRequired,
)


class OdpsPermissionError(DataError, PermissionError):
    """Credentials rejected or no permission on the table (names project, table, partition)."""


class OdpsTableChangedError(DataError):
    """A replacement download session sees a different row count: the table / partition was
    rewritten while it was being read, so exactly-once cannot be kept. Restart the epoch."""


class OdpsSessionError(DataError):
    """A download session could not be created or shared (names the table and partition)."""


Spec = tuple[tuple[str, str], ...]


def _parse_spec(text: str, url: str) -> Spec:
    out: list[tuple[str, str]] = []
    for part in re.split(r"[,/]", text):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        value = value.strip().strip("'\"")
        if not eq or not key.strip() or not value:
            raise ValueError(f"partition spec {text!r} in {url!r} must be key=value[/key=value...]")
        out.append((key.strip(), value))
    return tuple(out)


def _spec_str(spec: Spec) -> str:
    return ",".join(f"{k}={v}" for k, v in spec)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DataError):
        return False
    if isinstance(exc, (ChecksumMismatch, odps_errors.ChecksumError)):
        return True
    if isinstance(exc, odps_errors.ODPSError):
        status = getattr(exc, "status_code", None)
        return status is not None and (status >= 500 or status == 429)
    if isinstance(
        exc,
        (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError))


_U32 = struct.Struct("!I")


def _forget_inherited_connections() -> None:
    """In a forked child, drop the pooled HTTP connections pyodps keeps per thread (class-wide):
    their sockets are shared with the parent, and two processes must not talk on one socket."""
    from odps.rest import RestClient

    try:
        RestClient._session_local.session_cache = {}
    except AttributeError:
        pass


os.register_at_fork(after_in_child=_forget_inherited_connections)

_CLIENTS: dict[tuple, dict[str, Any]] = {}
_CLIENTS_LOCK = threading.Lock()


class ChecksumMismatch(IOError):
    """A tunnel chunk's CRC32C does not match its data (corrupt or truncated body)."""


class OdpsSource(Source):
    """Rows of an ODPS table (or of its partitions) as Arrow record batches, split by row range.

    Args:
        url: ``odps://<project>/tables/<table>[/<partition spec>]``.
        endpoint, tunnel_endpoint, access_id, secret_access_key, security_token: see the module
            docstring (explicit values win over the environment).
        compression: ``None`` (default: loopback / fast networks), ``"lz4"``, ``"zstd"`` or
            ``"zlib"``: the tunnel compresses the body, the reader decompresses it.
        reader: ``"fast"`` (default), ``"pyodps"`` (pyodps's own TunnelArrowReader) or
            ``"storage"`` (pyodps's Storage API ArrowReader over a batch-read session per
            partition and process, addressed by row offset; its bodies carry no CRC).
        parallel: range readers per ``read`` call fetching consecutive sub-ranges concurrently
            (each its own HTTP connection), yielded in order.
        split_rows: rows per split (a download request reads at most this many rows).
        sessions: download ids to reuse, ``{"<project>.<table>[/<spec>]": id}``.
        session_dir: a directory shared by all processes of the job, to share sessions.
        partition_columns: append the partition keys as string columns (default True).
        reopens: reopen attempts per failing range before ReadFailedError (through
            ``data.read`` the pipeline's own ``retries`` come on top).
        backoff: first sleep between reopens in seconds (doubling, at most 2 s).
        timeout: seconds for connecting and for each socket read.

    Raises:
        ValueError: a malformed URL or option (one line naming it).
        DatasetNotFoundError: the table, or a partition matching the spec, does not exist.
        OdpsPermissionError: credentials rejected / no permission.
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint: str | None = None,
        tunnel_endpoint: str | None = None,
        access_id: str | None = None,
        secret_access_key: str | None = None,
        security_token: str | None = None,
        compression: str | None = None,
        reader: str = "fast",
        parallel: int = 1,
        split_rows: int = 1 << 20,
        sessions: Mapping[str, str] | None = None,
        session_dir: str | os.PathLike[str] | None = None,
        partition_columns: bool = True,
        reopens: int = 5,
        backoff: float = 0.1,
        timeout: float = 120.0,
    ) -> None:
        m = _URL.match(url) if isinstance(url, str) else None
        if m is None:
            raise ValueError(
                f"ODPS URL must be odps://<project>/tables/<table>[/<partition spec>], got {url!r}"
            )
        self.url = url
        self.project = m.group("project")
        self.table_name = m.group("table")
        self.spec: Spec = _parse_spec(m.group("spec") or "", url)
        env = os.environ
        self.endpoint = endpoint or env.get("ODPS_ENDPOINT")
        self.tunnel_endpoint = tunnel_endpoint or env.get("ODPS_TUNNEL_ENDPOINT") or None
        self.access_id = access_id or env.get("ALIBABA_CLOUD_ACCESS_KEY_ID")
        self._secret = secret_access_key or env.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        self._token = security_token or env.get("ALIBABA_CLOUD_SECURITY_TOKEN")
        if not self.endpoint:
            raise ValueError(f"{url}: no ODPS endpoint; set ODPS_ENDPOINT or pass endpoint=")
        if not self.access_id or not self._secret:
            raise ValueError(
                f"{url}: no ODPS credentials; set ALIBABA_CLOUD_ACCESS_KEY_ID and "
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET or pass access_id= / secret_access_key="
            )
        if compression not in _COMPRESSION:
            raise ValueError(f"compression must be one of None, 'lz4', 'zstd', 'zlib', got {compression!r}")
        if reader not in _READERS:
            raise ValueError(f"reader must be one of {_READERS}, got {reader!r}")
        for name, v in (("parallel", parallel), ("split_rows", split_rows)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(reopens, int) or reopens < 0:
            raise ValueError(f"reopens must be an integer >= 0, got {reopens!r}")
        self.compression = compression
        self.reader = reader
        self.parallel = parallel
        self.split_rows = split_rows
        self.partition_columns = partition_columns
        self.reopens = reopens
        self.backoff = backoff
        self.timeout = timeout
        sess_env = env.get(SESSIONS_ENV)
        self._shared_sessions: dict[str, str] = {}
        if sess_env:
            try:
                self._shared_sessions.update(json.loads(sess_env))
            except ValueError as e:
                raise ValueError(
                    f"{SESSIONS_ENV} must be a JSON object of table keys to download ids: {e}"
                ) from e
        self._shared_sessions.update(sessions or {})
        sdir = session_dir if session_dir is not None else env.get(SESSION_DIR_ENV)
        self.session_dir = os.fspath(sdir) if sdir else None
        # learned state (pickled to workers): partitions, session ids and their row counts
        self._partitions: list[Spec] | None = None
        self._partition_keys: tuple[str, ...] = ()
        self._schema: pa.Schema | None = None
        self._session_ids: dict[Spec, str] = {}
        self._counts: dict[Spec, int] = {}
        self._splits: list[Split] | None = None
        self._sessions: dict[Spec, Any] = {}
        self._lock = threading.RLock()
        self._pid = os.getpid()

    # -- pickling / description: live clients stay behind, the secret never shows ------------------
    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_sessions"] = {}
        d["_lock"] = None
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._lock = threading.RLock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"OdpsSource({self.url!r}, endpoint={self.endpoint!r}, reader={self.reader!r})"

    def describe(self) -> dict[str, Any]:
        return {
            "type": "odps",
            "url": self.url,
            "endpoint": self.endpoint,
            "tunnel_endpoint": self.tunnel_endpoint,
            "access_id": self.access_id,
            "partitions": [_spec_str(s) for s in (self._partitions or [])],
            "sessions": {self._key(s): i for s, i in self._session_ids.items()},
            "compression": self.compression,
            "reader": self.reader,
            "parallel": self.parallel,
        }

    def _where(self, spec: Spec | None = None) -> str:
        spec = self.spec if spec is None else spec
        where = f"ODPS table {self.project}.{self.table_name}"
        return where + (f" partition {_spec_str(spec)}" if spec else "")

    def _key(self, spec: Spec) -> str:
        return f"{self.project}.{self.table_name}" + (f"/{_spec_str(spec)}" if spec else "")

    # -- pyodps objects: one client per process and credentials, shared by every source and thread
    # (pyodps keeps its HTTP sessions per thread), and download sessions cached by id ----------------
    def _holder(self) -> dict[str, Any]:
        ident = (
            os.getpid(),
            self.endpoint,
            self.tunnel_endpoint,
            self.access_id,
            hashlib.sha256(f"{self._secret}|{self._token}".encode()).hexdigest(),
        )
        with _CLIENTS_LOCK:
            h = _CLIENTS.get(ident)
            if h is None:
                kw: dict[str, Any] = {"project": self.project, "endpoint": self.endpoint}
                if self.tunnel_endpoint:
                    kw["tunnel_endpoint"] = self.tunnel_endpoint
                if self._token:
                    from odps.accounts import StsAccount

                    o = ODPS(account=StsAccount(self.access_id, self._secret, self._token), **kw)
                else:
                    o = ODPS(self.access_id, self._secret, **kw)
                h = {"odps": o, "tunnel": TableTunnel(o, endpoint=self.tunnel_endpoint), "sessions": {}}
                _CLIENTS[ident] = h
        return h

    @property
    def _client(self) -> ODPS:
        return self._holder()["odps"]

    def _tunnel(self) -> TableTunnel:
        return self._holder()["tunnel"]

    def _translate(self, e: Exception, spec: Spec | None = None) -> Exception:
        """A DataError for a pyodps error that will not heal by retrying."""
        where = self._where(spec)
        if isinstance(e, (odps_errors.NoSuchPartition,)):
            return DatasetNotFoundError(
                f"{where} does not exist (server: {e.code})", table=self._key(spec or ())
            )
        if isinstance(e, odps_errors.NoSuchObject):
            return DatasetNotFoundError(
                f"{where} does not exist (server: {getattr(e, 'code', '')})", table=self._key(spec or ())
            )
        if isinstance(e, _ACCESS_DENIED) or getattr(e, "status_code", None) in (401, 403):
            return OdpsPermissionError(
                f"access to {where} denied for access key id {self.access_id!r} "
                f"(server: {getattr(e, 'code', type(e).__name__)}); check the credentials and the table's ACL",
                table=self._key(spec or ()),
            )
        return e

    # -- discovery -------------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._partitions is not None:
            return
        if self._discover_from_sessions():
            return
        o = self._client
        table = o.get_table(self.table_name, project=self.project)
        try:
            table.reload()
            tschema = table.table_schema
            keys = tuple(p.name for p in tschema.partitions)
            if keys and self.spec:
                bad = [k for k, _ in self.spec if k not in keys]
                if bad or [k for k, _ in self.spec] != list(keys[: len(self.spec)]):
                    raise ValueError(
                        f"{self.url}: partition spec {_spec_str(self.spec)!r} must name leading keys of "
                        f"{', '.join(keys)}"
                    )
            elif self.spec:
                raise ValueError(f"{self.url}: table {self.project}.{self.table_name} is not partitioned")
            if keys:
                prefix = _spec_str(self.spec) or None
                found = [
                    tuple((k, str(v)) for k, v in p.partition_spec.kv.items())
                    for p in table.partitions.iterate_partitions(spec=prefix)
                ]
                parts: list[Spec] = sorted(found)
                if not parts:
                    raise DatasetNotFoundError(
                        f"{self._where()} does not exist (no partition matches)", table=self._key(self.spec)
                    )
            else:
                parts = [()]
        except odps_errors.ODPSError as e:
            raise self._translate(e) from e
        self._set_schema(tschema, keys)
        self._partitions = parts

    def _discover_from_sessions(self) -> bool:
        """With shared session ids for this table, the partitions are their keys and the schema
        is the sessions' one: no listing, the same partitions on every rank."""
        base = f"{self.project}.{self.table_name}"
        parts: list[Spec] = []
        for key in self._shared_sessions:
            if key == base or key.startswith(base + "/"):
                spec = _parse_spec(key[len(base) + 1 :], self.url)
                if spec[: len(self.spec)] == self.spec:
                    parts.append(spec)
        if not parts:
            return False
        parts.sort()
        tschema = self._session(parts[0]).schema
        keys = tuple(p.name for p in tschema.partitions)
        bad = [p for p in parts if tuple(k for k, _ in p) != keys]
        if bad:
            raise ValueError(
                f"{self.url}: shared session keys {[self._key(p) for p in bad]} do not name full partitions "
                f"({', '.join(keys) or 'the table is not partitioned'})"
            )
        self._set_schema(tschema, keys)
        self._partitions = parts
        return True

    def _set_schema(self, tschema: Any, keys: tuple[str, ...]) -> None:
        fields = [pa.field(c.name, odps_type_to_arrow_type(c.type)) for c in tschema.simple_columns]
        if self.partition_columns:
            fields += [pa.field(k, pa.string()) for k in keys]
        self._schema = pa.schema(fields)
        self._partition_keys = keys

    def schema(self) -> pa.Schema:
        self._discover()
        assert self._schema is not None  # set by _discover
        return self._schema

    def partitions(self) -> list[str]:
        """The partitions read (``k=v,k=v``), in order; ``[""]`` for a non-partitioned table."""
        self._discover()
        return [_spec_str(s) for s in self._partitions or []]

    # -- sessions --------------------------------------------------------------------------------
    def _create_session(self, spec: Spec, download_id: str | None = None) -> Any:
        kw: dict[str, Any] = {}
        if spec:
            kw["partition_spec"] = _spec_str(spec)
        if self.compression:
            kw["compress_option"] = CompressOption(_COMPRESSION[self.compression])
        table = self._client.get_table(self.table_name, project=self.project)
        try:
            return self._tunnel().create_download_session(table, download_id=download_id, **kw)
        except odps_errors.ODPSError as e:
            raise self._translate(e, spec) from e

    def _session(self, spec: Spec) -> Any:
        """The pyodps TableDownloadSession for ``spec`` (shared id, see module doc)."""
        if self._pid != os.getpid():  # a forked DataLoader worker
            self._sessions = {}
            self._pid = os.getpid()
        cur = self._sessions.get(spec)
        if cur is not None:
            return cur
        with self._lock:
            cur = self._sessions.get(spec)
            if cur is not None:
                return cur
            sess: Any
            cache = self._holder()["sessions"]
            key = self._key(spec)
            sid = self._session_ids.get(spec) or self._shared_sessions.get(key)
            if sid is None and self.session_dir:
                sid = self._session_from_dir(spec, stale=None)
            if sid is None:
                sess = self._create_session(spec)
                log.info(
                    "created ODPS download session %s for %s (%d rows)",
                    sess.id,
                    self._where(spec),
                    sess.count,
                )
            else:
                sess = cache.get((key, sid)) or self._create_session(spec, download_id=sid)
                if sess.status == sess.Status.Expired:
                    sess = self._renew(spec, sess.id)
            cache[(key, sess.id)] = sess
            self._remember(spec, sess)
            self._sessions[spec] = sess
            return sess

    def _replace_session(self, spec: Spec, expired: Any) -> None:
        expired_id = str(expired.id)
        with self._lock:
            current = self._sessions.get(spec)
            if current is not None and current.id != expired_id:
                return  # another thread replaced it already
            new = self._renew(spec, expired_id)
            self._remember(spec, new)
            self._holder()["sessions"][(self._key(spec), new.id)] = new
            self._sessions[spec] = new

    def _remember(self, spec: Spec, sess: Any) -> None:
        count = int(sess.count)
        with self._lock:
            known = self._counts.get(spec)
            if known is not None and known != count:
                raise OdpsTableChangedError(
                    f"{self._where(spec)} changed while being read: download session {sess.id} has "
                    f"{count} rows, the splits were cut from {known}; restart the epoch (new splits)",
                    table=self._key(spec),
                )
            self._counts[spec] = count
            self._session_ids[spec] = sess.id

    def _renew(self, spec: Spec, expired_id: str) -> Any:
        """A new session replacing ``expired_id`` (shared through session_dir if configured)."""
        sid = self._session_from_dir(spec, stale=expired_id) if self.session_dir else None
        sess = self._create_session(spec, download_id=sid) if sid else self._create_session(spec)
        log.warning(
            "ODPS download session %s of %s expired; continuing with %s",
            expired_id,
            self._where(spec),
            sess.id,
        )
        return sess

    def _session_from_dir(self, spec: Spec, stale: str | None) -> str | None:
        """The id in the shared directory, creating (or replacing ``stale``) under a lock."""
        assert self.session_dir is not None
        d = Path(self.session_dir)
        d.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1(f"{self.endpoint}|{self._key(spec)}".encode()).hexdigest()[:20]
        path, lock = d / f"{name}.json", d / f"{name}.lock"
        deadline = time.monotonic() + self.timeout
        while True:
            if path.exists():
                try:
                    sid = json.loads(path.read_text())["id"]
                except (ValueError, KeyError, OSError):
                    sid = None
                if sid and sid != stale:
                    return str(sid)
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    if time.time() - lock.stat().st_mtime > 60:
                        lock.unlink(missing_ok=True)  # a creator that died
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise OdpsSessionError(
                        f"waited {self.timeout:.0f}s for another process to create the download session of "
                        f"{self._where(spec)} in {d}; remove {lock} if no job is running"
                    ) from None
                time.sleep(0.05)
                continue
            try:
                os.close(fd)
                if path.exists():  # someone finished between our check and the lock
                    sid = json.loads(path.read_text()).get("id")
                    if sid and sid != stale:
                        return str(sid)
                sess = self._create_session(spec)
                tmp = d / f"{name}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps({"key": self._key(spec), "id": sess.id, "count": int(sess.count)}))
                os.replace(tmp, path)
                log.info("created shared ODPS download session %s for %s", sess.id, self._where(spec))
                return str(sess.id)
            finally:
                lock.unlink(missing_ok=True)

    def session_ids(self) -> dict[str, str]:
        """``{"<project>.<table>[/<spec>]": download id}`` of every partition (creating sessions)."""
        self._discover()
        return {self._key(s): self._session(s).id for s in self._partitions or []}

    # -- splits ----------------------------------------------------------------------------------
    def splits(self) -> Sequence[Split]:
        if self._splits is None:
            self._discover()
            out: list[Split] = []
            for spec in self._partitions or []:
                count = int(self._session(spec).count)
                key = self._key(spec)
                for start in range(0, count, self.split_rows):
                    out.append(
                        Split(key, start, min(start + self.split_rows, count), {"partition": _spec_str(spec)})
                    )
            if not out and self._partitions:
                log.info("%s holds no rows", self._where())
            self._splits = out
        return self._splits

    def is_transient(self, exc: BaseException) -> bool:
        return _is_transient(exc)

    # -- reading ---------------------------------------------------------------------------------
    def read(
        self, split: Split, columns: Sequence[str] | None = None, offset: int = 0
    ) -> Iterator[pa.RecordBatch]:
        """Rows ``[split.start + offset, split.stop)`` of the split's partition, each exactly once.

        Every batch yielded has passed its CRC checks. A reset / truncated body, an HTTP 5xx or a
        CRC mismatch reopens the download at the first row not yet yielded (up to ``reopens``
        times, then ReadFailedError naming table, partition and row); an expired session is
        replaced (OdpsTableChangedError if the replacement's row count differs).
        """
        schema = self.schema()
        spec = _parse_spec(str(split.info.get("partition", "")), self.url) if split.info else ()
        if not split.info and self._partition_keys:
            spec = _parse_spec(split.key.partition("/")[2], self.url)
        cols = list(columns) if columns is not None else schema.names
        missing = [c for c in cols if schema.get_field_index(c) < 0]
        if missing:
            raise ColumnNotFoundError(
                f"columns {missing} not in {self._where()}; columns: {', '.join(schema.names)}",
                column=missing[0],
            )
        pkeys = set(self._partition_keys) if self.partition_columns else set()
        data_cols = [c for c in cols if c not in pkeys]
        all_data = [f.name for f in schema if f.name not in pkeys]
        # the tunnel returns columns in table order; ask for all when all are wanted
        fetch = (
            None if sorted(data_cols) == sorted(all_data) else [c for c in all_data if c in set(data_cols)]
        )
        if fetch is not None and not fetch:
            fetch = all_data[:1]  # only partition columns wanted: fetch the narrowest honest thing
        start = split.start + offset
        stop = split.stop
        if start > stop:
            raise ValueError(f"offset {offset} is beyond split {split!r}")
        out_schema = pa.schema([schema.field(c) for c in cols])
        pvals = dict(spec)

        def shape(batch: pa.RecordBatch) -> pa.RecordBatch:
            if batch.schema.names == cols:
                return batch  # already the requested columns in the requested order
            arrays = []
            for c in cols:
                if c in pkeys:
                    arrays.append(pa.repeat(pa.scalar(pvals.get(c), pa.string()), batch.num_rows))
                else:
                    arrays.append(batch.column(batch.schema.get_field_index(c)))
            return pa.RecordBatch.from_arrays(arrays, schema=out_schema)

        if start == stop:
            return
        if self.parallel > 1 and stop - start > 1:
            batches = self._read_parallel(spec, start, stop, fetch)
        else:
            batches = self._read_range(spec, start, stop, fetch)
        for batch in batches:
            yield shape(batch)

    def _read_parallel(
        self, spec: Spec, start: int, stop: int, fetch: list[str] | None
    ) -> Iterator[pa.RecordBatch]:
        n = self.parallel
        step = max(1, min(-(-(stop - start) // n), 1 << 18))
        ranges = [(a, min(a + step, stop)) for a in range(start, stop, step)]
        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="odps-range")
        try:
            pending: list[Future[list[pa.RecordBatch]]] = []
            it = iter(ranges)
            for a, b in it:
                pending.append(pool.submit(self._range_list, spec, a, b, fetch))
                if len(pending) >= n:
                    break
            while pending:
                done = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    a, b = nxt
                    pending.append(pool.submit(self._range_list, spec, a, b, fetch))
                yield from done.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _range_list(self, spec: Spec, start: int, stop: int, fetch: list[str] | None) -> list[pa.RecordBatch]:
        return list(self._read_range(spec, start, stop, fetch))

    def _read_range(
        self, spec: Spec, start: int, stop: int, fetch: list[str] | None
    ) -> Iterator[pa.RecordBatch]:
        """Rows [start, stop) of a partition; reopens at the exact row after transient faults."""
        pos = start
        attempt = 0
        while pos < stop:
            sess = self._session(spec)
            try:
                for batch in self._fetch(sess, pos, stop - pos, fetch, spec):
                    if batch.num_rows == 0:
                        continue
                    if pos + batch.num_rows > stop:
                        raise ChecksumMismatch(f"tunnel returned more rows than asked for at row {pos}")
                    pos += batch.num_rows
                    attempt = 0
                    yield batch
                if pos < stop:
                    raise ChecksumMismatch(f"tunnel body ended at row {pos}, expected {stop}")
            except Exception as e:
                if isinstance(e, DataError):
                    raise
                if isinstance(e, odps_errors.ODPSError) and not _is_transient(e):
                    if self._expired(sess):
                        self._replace_session(spec, sess)
                        continue
                    if (
                        self.reader == "storage"
                        and self._drop_read_session(spec, fetch)
                        and attempt < self.reopens
                    ):
                        attempt += 1  # an expired Storage API read session: open a new one
                        continue
                    raise self._translate(e, spec) from e
                if not _is_transient(e):
                    raise
                if attempt >= self.reopens:
                    raise ReadFailedError(
                        f"reading rows {pos}..{stop} of {self._where(spec)} failed {attempt + 1} times, last with "
                        f"{type(e).__name__}: {e}; check the ODPS service / network and resume from the state",
                        table=self._key(spec),
                        row=pos,
                    ) from e
                log.warning(
                    "transient %s reading %s at row %d (%s); reopening (%d/%d)",
                    type(e).__name__,
                    self._where(spec),
                    pos,
                    e,
                    attempt + 1,
                    self.reopens,
                )
                time.sleep(min(2.0, self.backoff * (2**attempt)))
                attempt += 1

    def _expired(self, sess: Any) -> bool:
        try:
            sess.reload()
        except odps_errors.ODPSError:
            return False
        return bool(sess.status == sess.Status.Expired)

    def _read_session(self, spec: Spec, fetch: list[str] | None) -> tuple[Any, str]:
        """(StorageApiClient, read session id) of a partition and column set, one per process."""
        from odps.apis.storage_api import SplitOptions, StorageApiClient, TableBatchScanRequest

        cache = self._holder()["sessions"]
        key = ("storage", self._key(spec), tuple(fetch or ()))
        with self._lock:
            hit = cache.get(key)
            if hit is not None:
                return hit  # type: ignore[no-any-return]
            table = self._client.get_table(self.table_name, project=self.project)
            client = StorageApiClient(self._client, table, rest_endpoint=self.tunnel_endpoint)
            req = TableBatchScanRequest(
                required_data_columns=list(fetch or []),
                required_partitions=[_spec_str(spec).replace(",", "/")] if spec else [],
            )
            req.split_options = SplitOptions.get_default_options(SplitOptions.SplitMode.ROW_OFFSET)
            try:
                resp = client.create_read_session(req)
            except odps_errors.ODPSError as e:
                raise self._translate(e, spec) from e
            known = self._counts.get(spec)
            if known is not None and int(resp.record_count) != known:
                raise OdpsTableChangedError(
                    f"{self._where(spec)}: Storage API read session has {resp.record_count} rows, the splits "
                    f"were cut from {known}; restart the epoch",
                    table=self._key(spec),
                )
            cache[key] = (client, resp.session_id)
            return cache[key]  # type: ignore[no-any-return]

    def _drop_read_session(self, spec: Spec, fetch: list[str] | None) -> bool:
        return (
            self._holder()["sessions"].pop(("storage", self._key(spec), tuple(fetch or ())), None) is not None
        )

    def _fetch(
        self, sess: Any, start: int, count: int, fetch: list[str] | None, spec: Spec = ()
    ) -> Iterator[pa.RecordBatch]:
        if self.reader == "storage":
            from odps.apis.storage_api import ArrowReader, Compression, ReadRowsRequest

            client, sid = self._read_session(spec, fetch)
            codec = {None: Compression.UNCOMPRESSED, "lz4": Compression.LZ4_FRAME, "zstd": Compression.ZSTD}
            req = ReadRowsRequest(
                sid,
                row_index=start,
                row_count=count,
                max_batch_rows=32768,
                compression=codec.get(self.compression, Compression.UNCOMPRESSED),
            )
            reader = ArrowReader(client.read_rows_stream(req))
            n = 0
            while n < count:
                batch = reader.read()
                if batch is None:
                    break
                n += batch.num_rows
                yield batch
            return
        if self.reader == "pyodps":
            reader = sess.open_arrow_reader(start, count, columns=fetch, compress=bool(self.compression))
            try:
                yield from reader
            finally:
                reader.close()
            return
        yield from _FastArrowDownload(sess, start, count, fetch, self.compression, self.timeout).batches()


class _FastArrowDownload:
    """One tunnel Arrow download, requested and signed by pyodps's session, decoded here."""

    BLOCK = 4 << 20

    def __init__(
        self,
        sess: Any,
        start: int,
        count: int,
        columns: list[str] | None,
        compression: str | None,
        timeout: float,
    ) -> None:
        self.sess = sess
        self.start, self.count, self.columns = start, count, columns
        self.compression = compression
        self.timeout = timeout

    def _request(self) -> Any:
        sess = self.sess
        params = sess.get_common_params(downloadid=sess.id)
        params["rowrange"] = f"({self.start},{self.count})"
        if self.columns:
            params["columns"] = ",".join(self.columns)
        headers = sess.get_common_headers(content_length=0, tags=sess._tags)
        if self.compression:
            headers["Accept-Encoding"] = CompressOption(
                _COMPRESSION[self.compression]
            ).algorithm.get_encoding()
        else:
            headers["Accept-Encoding"] = "identity"
        return sess._client.get(
            sess._table.table_resource(),
            stream=True,
            actions=["data", "arrow"],
            params=params,
            headers=headers,
            timeout=(min(self.timeout, 30.0), self.timeout),
        )

    def _decompressor(self, encoding: str | None) -> Any:
        if not encoding or encoding == "identity":
            return None
        if encoding == "deflate":
            return zlib.decompressobj()
        if encoding == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().decompressobj()
        if encoding in ("x-lz4-frame", "x-odps-lz4-frame", "lz4_frame"):
            import lz4.frame

            return lz4.frame.LZ4FrameDecompressor()
        raise ChecksumMismatch(f"tunnel answered with unknown Content-Encoding {encoding!r}")

    def _schema(self) -> pa.Schema:
        wanted = set(self.columns or ())
        return pa.schema(
            [
                pa.field(c.name, odps_type_to_arrow_type(c.type))
                for c in self.sess.schema.simple_columns
                if not wanted or c.name in wanted
            ]
        )

    def batches(self) -> Iterator[pa.RecordBatch]:
        resp = self._request()
        try:
            schema = self._schema()
            encoding = resp.headers.get("Content-Encoding")
            length = resp.headers.get("Content-Length")
            fp = getattr(resp.raw, "_fp", None)
            if (
                (not encoding or encoding == "identity")
                and length
                and fp is not None
                and hasattr(fp, "readinto")
            ):
                sock = _raw_socket(fp)
                if sock is not None:
                    yield from _scatter_batches(sock, fp, int(length), schema)
                else:
                    yield from _zero_copy_batches(fp, int(length), schema)
                return
            yield from _stream_batches(_body_blocks(resp, self._decompressor(encoding), self.BLOCK), schema)
        finally:
            resp.close()


_I32 = struct.Struct("<i")
_U16 = struct.Struct("<H")
_I64 = struct.Struct("<q")


def _read_exact(fp: Any, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = fp.readinto(view[got:])
        if not k:
            raise ChecksumMismatch(f"tunnel body truncated: {n - got} bytes of a chunk missing")
        got += k


def _ipc_body_length(meta: memoryview) -> int:
    """bodyLength of an Arrow IPC Message flatbuffer (field 3 of the root table)."""
    root = struct.unpack_from("<I", meta, 0)[0]
    vtable = root - _I32.unpack_from(meta, root)[0]
    vsize = _U16.unpack_from(meta, vtable)[0]
    if vsize < 4 + 2 * 4:
        return 0
    off = _U16.unpack_from(meta, vtable + 4 + 2 * 3)[0]
    return _I64.unpack_from(meta, root + off)[0] if off else 0


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


@functools.lru_cache(maxsize=8)
def _crc_shift_tables(nbytes: int) -> tuple[tuple[int, ...], ...]:
    """Byte tables of the GF(2) operator that appends ``nbytes`` zero bytes to a CRC32C, so that
    ``crc(A + B) == shift(crc(A)) ^ crc(B)`` for ``len(B) == nbytes`` (zlib's crc32_combine)."""
    base = [0x82F63B78] + [1 << (n - 1) for n in range(1, 32)]  # one zero bit, reflected polynomial
    result: list[int] | None = None
    bits = nbytes * 8
    while bits:
        if bits & 1:
            result = base if result is None else [_gf2_times(base, result[n]) for n in range(32)]
        bits >>= 1
        if bits:
            base = [_gf2_times(base, base[n]) for n in range(32)]
    assert result is not None  # nbytes >= 1
    return tuple(tuple(_gf2_times(result, b << (8 * k)) for b in range(256)) for k in range(4))


class _IpcCutter:
    """Turns the Arrow IPC stream in ``out[:off]`` into record batches as bytes are verified."""

    def __init__(self, out: pa.Buffer, view: memoryview, schema: pa.Schema) -> None:
        self.out, self.view, self.schema = out, view, schema
        self.parsed = 0
        self.ended = False

    def cut(self, off: int) -> Iterator[pa.RecordBatch]:
        view = self.view
        while not self.ended and off - self.parsed >= 8:
            parsed = self.parsed
            cont, mlen = struct.unpack_from("<Ii", view, parsed)
            hlen = 8
            if cont != 0xFFFFFFFF:  # legacy framing without the continuation marker
                mlen, hlen = _I32.unpack_from(view, parsed)[0], 4
            if mlen == 0:
                self.ended = True
                self.parsed += hlen
                return
            if off - parsed < hlen + mlen:
                return
            end = parsed + hlen + mlen + _ipc_body_length(view[parsed + hlen : parsed + hlen + mlen])
            if end > off:
                return
            msg = pa.ipc.read_message(self.out.slice(parsed, end - parsed))
            self.parsed = end
            if msg.type == "record batch":
                yield pa.ipc.read_record_batch(msg, self.schema)

    def check(self, off: int) -> None:
        if not self.ended and self.parsed != off:
            raise ChecksumMismatch(
                f"tunnel Arrow stream incomplete: {off - self.parsed} bytes left undecoded"
            )


def _raw_socket(fp: Any) -> socket.socket | None:
    """The socket under an http.client response with a plain (not chunked) body, if reachable."""
    if getattr(fp, "chunked", False) or getattr(fp, "length", None) is None:
        return None
    buffered = getattr(fp, "fp", None)
    sock = getattr(getattr(buffered, "raw", None), "_sock", None)
    if isinstance(sock, socket.socket) and hasattr(sock, "recvmsg_into") and hasattr(buffered, "peek"):
        return sock
    return None


class _Scatter:
    """Fills lists of buffers from a socket with scatter reads (recvmsg_into): the bytes of a
    response body land in their final places with one copy (kernel -> buffer)."""

    IOV = 64

    def __init__(self, sock: socket.socket, fp: Any) -> None:
        self.sock = sock
        # bytes http.client already buffered past the headers come first
        buffered = fp.fp
        pre = buffered.peek(1 << 16) if fp.length else b""
        self.pre = memoryview(buffered.read(min(len(pre), fp.length)))
        self.left = fp.length

    def fill(self, views: list[memoryview]) -> None:
        i, n_views = 0, len(views)
        while self.pre and i < n_views:
            v = views[i]
            k = min(len(v), len(self.pre))
            v[:k] = self.pre[:k]
            self.pre = self.pre[k:]
            self.left -= k
            if k == len(v):
                i += 1
            else:
                views[i] = v[k:]
        while i < n_views:
            n = self.sock.recvmsg_into(views[i : i + self.IOV])[0]
            if not n:
                raise ChecksumMismatch(f"tunnel body truncated: {self.left} bytes missing")
            self.left -= n
            while n:
                v = views[i]
                if n >= len(v):
                    n -= len(v)
                    i += 1
                else:
                    views[i] = v[n:]
                    n = 0


def _scatter_batches(
    sock: socket.socket, fp: Any, length: int, schema: pa.Schema
) -> Iterator[pa.RecordBatch]:
    """Decode a Content-Length tunnel Arrow body with no copy besides the kernel's.

    Scatter reads put each chunk's data at its final place in one buffer from Arrow's
    allocator and each 4-byte CRC in a side buffer; every chunk CRC32C is verified in place, the
    whole-stream CRC is derived from the chunk CRCs, and each Arrow message completed by verified
    bytes becomes a record batch referencing the buffer.
    """
    if length < 8:
        raise ChecksumMismatch(f"tunnel body of {length} bytes is too short")
    io = _Scatter(sock, fp)
    head = bytearray(4)
    io.fill([memoryview(head)])
    (size,) = _U32.unpack_from(head, 0)
    if size < 1:
        raise ChecksumMismatch(f"invalid tunnel chunk size {size}")
    step = size + 4
    body = length - 4
    nfull = (body - 4) // step
    final = body - nfull * step - 4  # data bytes of the final short chunk
    if final < 0 or final >= size:
        raise ChecksumMismatch("tunnel body framing is inconsistent with its Content-Length")
    t0, t1, t2, t3 = _crc_shift_tables(size)
    crc = _crc32c.crc32c
    out = pa.allocate_buffer(nfull * size + final)
    dest = memoryview(out).cast("B")
    cutter = _IpcCutter(out, dest, schema)
    per_block = max(1, (1 << 20) // step)
    crcs = bytearray(4 * per_block)
    cv = memoryview(crcs)
    off = 0
    total = 0
    done = 0
    while done < nfull:
        k = min(per_block, nfull - done)
        views: list[memoryview] = []
        for j in range(k):
            views.append(dest[off + j * size : off + (j + 1) * size])
            views.append(cv[4 * j : 4 * j + 4])
        io.fill(views)
        for j in range(k):
            got = crc(dest[off : off + size])
            if got != _U32.unpack_from(crcs, 4 * j)[0]:
                raise ChecksumMismatch(f"tunnel chunk CRC32C mismatch at data byte {off}")
            total = t0[total & 255] ^ t1[(total >> 8) & 255] ^ t2[(total >> 16) & 255] ^ t3[total >> 24] ^ got
            off += size
        done += k
        yield from cutter.cut(off)
    io.fill([dest[off : off + final], cv[0:4]])
    total = crc(dest[off : off + final], total)
    if total != _U32.unpack_from(crcs, 0)[0]:
        raise ChecksumMismatch(f"tunnel stream CRC32C mismatch after {off + final} data bytes")
    off += final
    yield from cutter.cut(off)
    cutter.check(off)


def _zero_copy_batches(fp: Any, length: int, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Decode a Content-Length tunnel Arrow body, verifying every CRC, with little CPU.

    Chunks are received about 1 MiB at a time into a reused buffer, each chunk's CRC32C is
    checked there (hardware CRC32C), the whole-stream CRC is derived from the chunk CRCs (CRC
    combination, no second pass over the data), and the data is copied once into a buffer
    from Arrow's allocator, where every Arrow message completed by verified bytes becomes a
    record batch without further copies.
    """
    if length < 8:
        raise ChecksumMismatch(f"tunnel body of {length} bytes is too short")
    head = bytearray(4)
    _read_exact(fp, memoryview(head))
    (size,) = _U32.unpack_from(head, 0)
    if size < 1:
        raise ChecksumMismatch(f"invalid tunnel chunk size {size}")
    step = size + 4
    t0, t1, t2, t3 = _crc_shift_tables(size)
    crc = _crc32c.crc32c
    remaining = length - 4
    out = pa.allocate_buffer(remaining)  # data bytes < body bytes
    dest = memoryview(out).cast("B")
    per_block = max(1, (1 << 20) // step)
    scratch = bytearray(min(per_block * step, remaining))
    sv = memoryview(scratch)
    off = 0  # verified data bytes in dest[:off]
    total = 0  # CRC32C of dest[:off]
    parsed = 0  # Arrow stream bytes already turned into batches
    ended = False
    while remaining > 0:
        want = min(len(scratch), remaining)
        last = want == remaining
        _read_exact(fp, sv[:want])
        remaining -= want
        nfull = (want - 4) // step if last else want // step
        pos = 0
        for _ in range(nfull):
            chunk = sv[pos : pos + size]
            got = crc(chunk)
            if got != _U32.unpack_from(scratch, pos + size)[0]:
                raise ChecksumMismatch(f"tunnel chunk CRC32C mismatch at data byte {off}")
            total = t0[total & 255] ^ t1[(total >> 8) & 255] ^ t2[(total >> 16) & 255] ^ t3[total >> 24] ^ got
            dest[off : off + size] = chunk
            off += size
            pos += step
        if last:
            n = want - pos - 4
            if n < 0 or n >= size:
                raise ChecksumMismatch("tunnel body framing is inconsistent with its Content-Length")
            tail = sv[pos : pos + n]
            total = crc(tail, total)
            if total != _U32.unpack_from(scratch, pos + n)[0]:
                raise ChecksumMismatch(f"tunnel stream CRC32C mismatch after {off + n} data bytes")
            dest[off : off + n] = tail
            off += n
        # every complete Arrow message in dest[parsed:off] -> a record batch
        while not ended and off - parsed >= 8:
            cont, mlen = struct.unpack_from("<Ii", dest, parsed)
            hlen = 8
            if cont != 0xFFFFFFFF:  # legacy framing without the continuation marker
                mlen, hlen = _I32.unpack_from(dest, parsed)[0], 4
            if mlen == 0:
                ended = True
                parsed += hlen
                break
            if off - parsed < hlen + mlen:
                break
            end = parsed + hlen + mlen + _ipc_body_length(dest[parsed + hlen : parsed + hlen + mlen])
            if end > off:
                break
            msg = pa.ipc.read_message(out.slice(parsed, end - parsed))
            parsed = end
            if msg.type == "record batch":
                yield pa.ipc.read_record_batch(msg, schema)
    if not ended and parsed != off:
        raise ChecksumMismatch(f"tunnel Arrow stream incomplete: {off - parsed} bytes left undecoded")


def _body_blocks(resp: Any, decompressor: Any, block: int) -> Iterator[bytes]:
    """The (decompressed) bytes of a streamed response body, about ``block`` at a time."""
    raw = resp.raw
    while True:
        data = raw.read(block, decode_content=False)
        if not data:
            break
        if decompressor is not None:
            data = decompressor.decompress(data)
        if data:
            yield data
    if decompressor is not None and hasattr(decompressor, "flush"):
        tail = decompressor.flush()
        if tail:
            yield tail


def _stream_batches(blocks: Iterator[bytes], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Decode a tunnel Arrow body of unknown length (compressed or chunked transfer encoding).

    Each chunk's CRC32C is verified where it was received, the whole-stream CRC derived from the
    chunk CRCs, and the data copied once into Arrow memory that grows as needed (only the
    undecoded tail moves); record batches reference that memory.
    """
    pending = bytearray()
    size = 0
    step = 0
    tables: tuple[tuple[int, ...], ...] = ()
    crc = _crc32c.crc32c
    cap = 8 << 20
    out = pa.allocate_buffer(cap)
    dest = memoryview(out).cast("B")
    cutter = _IpcCutter(out, dest, schema)
    off = 0
    total = 0

    def room(n: int) -> None:
        nonlocal cap, out, dest, cutter, off
        if off + n <= cap:
            return
        keep = off - cutter.parsed
        cap = max(2 * cap, 2 * (keep + n))  # doubling: few reallocations, batches keep old ones
        new = pa.allocate_buffer(cap)
        view = memoryview(new).cast("B")
        view[:keep] = dest[cutter.parsed : off]
        ended = cutter.ended
        out, dest, off = new, view, keep
        cutter = _IpcCutter(out, dest, schema)
        cutter.ended = ended

    for block in blocks:
        pending += block
        pos = 0
        if not size:
            if len(pending) < 4:
                continue
            (size,) = _U32.unpack_from(pending, 0)
            if size < 1:
                raise ChecksumMismatch(f"invalid tunnel chunk size {size}")
            step = size + 4
            tables = _crc_shift_tables(size)
            pos = 4
        t0, t1, t2, t3 = tables
        pv = memoryview(pending)
        try:
            # the final chunk is shorter than size + 4, so a complete span of that length is full
            while len(pending) - pos >= step:
                with pv[pos : pos + size] as chunk:  # released at once: views pin the bytearray
                    got = crc(chunk)
                    if got != _U32.unpack_from(pending, pos + size)[0]:
                        raise ChecksumMismatch(f"tunnel chunk CRC32C mismatch at data byte {off}")
                    room(size)
                    dest[off : off + size] = chunk
                total = (
                    t0[total & 255] ^ t1[(total >> 8) & 255] ^ t2[(total >> 16) & 255] ^ t3[total >> 24] ^ got
                )
                off += size
                pos += step
        finally:
            pv.release()
        del pending[:pos]
        yield from cutter.cut(off)
    if not size or not 4 <= len(pending) < step:
        raise ChecksumMismatch(f"tunnel body ended early after {off} data bytes (truncated)")
    n = len(pending) - 4
    last = bytes(pending[:n])
    total = crc(last, total)
    if total != _U32.unpack_from(pending, n)[0]:
        raise ChecksumMismatch(f"tunnel stream CRC32C mismatch after {off + n} data bytes")
    room(n)
    dest[off : off + n] = last
    off += n
    yield from cutter.cut(off)
    cutter.check(off)


def create_sessions(url: str, **options: Any) -> dict[str, str]:
    """Create (or reuse) the download sessions of ``url`` once, for a whole job.

    Returns ``{"<project>.<table>[/<spec>]": download id}``; give it to every process as
    ``KUBEAI_ODPS_SESSIONS=<json>`` (or the ``sessions=`` option) so that all ranks and loader
    workers read one snapshot through one session per partition.
    """
    return OdpsSource(url, **options).session_ids()


def main(argv: list[str] | None = None) -> int:
    """``python -m kubeai_train.data.odps sessions URL``: print the export line for a job."""
    parser = argparse.ArgumentParser(prog="python -m kubeai_train.data.odps")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sessions", help="create the download sessions of URL and print the export line")
    p.add_argument("url")
    p.add_argument("--compression", default=None, choices=["lz4", "zstd", "zlib"])
    args = parser.parse_args(argv)
    try:
        ids = create_sessions(args.url, compression=args.compression)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"export {SESSIONS_ENV}='{json.dumps(ids, sort_keys=True)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
