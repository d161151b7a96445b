"""The odps:// :class:`~kubeai_train.data.types.Source`: discovery of partitions and schema, the
choice of each partition's download session, splits as row ranges, and reads that reopen at the
exact row after a transient fault (the package docstring describes the contract)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from kubeai_train.data.odps import sessions, storage
from kubeai_train.data.odps._deps import (
    ODPS,
    CompressOption,
    TableTunnel,
    odps_errors,
    odps_type_to_arrow_type,
)
from kubeai_train.data.odps.tunnel import COMPRESSION, FastArrowDownload
from kubeai_train.data.odps.types import (
    ACCESS_DENIED,
    SESSION_DIR_ENV,
    SESSIONS_ENV,
    URL,
    ChecksumMismatch,
    OdpsPermissionError,
    OdpsTableChangedError,
    Spec,
    is_transient,
    parse_spec,
    spec_str,
)
from kubeai_train.data.types import (
    ColumnNotFoundError,
    DataError,
    DatasetNotFoundError,
    ReadFailedError,
    Source,
    Split,
)

__all__ = ["OdpsSource"]

log = logging.getLogger("kubeai_train.data")

_READERS = ("fast", "pyodps", "storage")


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
        m = URL.match(url) if isinstance(url, str) else None
        if m is None:
            raise ValueError(
                f"ODPS URL must be odps://<project>/tables/<table>[/<partition spec>], got {url!r}"
            )
        self.url = url
        self.project = m.group("project")
        self.table_name = m.group("table")
        self.spec: Spec = parse_spec(m.group("spec") or "", url)
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
        if compression not in COMPRESSION:
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
            "partitions": [spec_str(s) for s in (self._partitions or [])],
            "sessions": {self._key(s): i for s, i in self._session_ids.items()},
            "compression": self.compression,
            "reader": self.reader,
            "parallel": self.parallel,
        }

    def _where(self, spec: Spec | None = None) -> str:
        spec = self.spec if spec is None else spec
        where = f"ODPS table {self.project}.{self.table_name}"
        return where + (f" partition {spec_str(spec)}" if spec else "")

    def _key(self, spec: Spec) -> str:
        return f"{self.project}.{self.table_name}" + (f"/{spec_str(spec)}" if spec else "")

    # -- pyodps objects: one client per process and credentials, shared by every source and thread
    # (pyodps keeps its HTTP sessions per thread), and download sessions cached by id ----------------
    def _holder(self) -> dict[str, Any]:
        return sessions.client_holder(
            self.project, self.endpoint, self.tunnel_endpoint, self.access_id, self._secret, self._token
        )

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
        if isinstance(e, ACCESS_DENIED) or getattr(e, "status_code", None) in (401, 403):
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
                        f"{self.url}: partition spec {spec_str(self.spec)!r} must name leading keys of "
                        f"{', '.join(keys)}"
                    )
            elif self.spec:
                raise ValueError(f"{self.url}: table {self.project}.{self.table_name} is not partitioned")
            if keys:
                prefix = spec_str(self.spec) or None
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
                spec = parse_spec(key[len(base) + 1 :], self.url)
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
        return [spec_str(s) for s in self._partitions or []]

    # -- sessions --------------------------------------------------------------------------------
    def _create_session(self, spec: Spec, download_id: str | None = None) -> Any:
        kw: dict[str, Any] = {}
        if spec:
            kw["partition_spec"] = spec_str(spec)
        if self.compression:
            kw["compress_option"] = CompressOption(COMPRESSION[self.compression])
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
        return sessions.session_from_dir(
            self.session_dir,
            self.endpoint,
            self._key(spec),
            self._where(spec),
            stale,
            self.timeout,
            lambda: self._create_session(spec),
        )

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
                        Split(key, start, min(start + self.split_rows, count), {"partition": spec_str(spec)})
                    )
            if not out and self._partitions:
                log.info("%s holds no rows", self._where())
            self._splits = out
        return self._splits

    def is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

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
        spec = parse_spec(str(split.info.get("partition", "")), self.url) if split.info else ()
        if not split.info and self._partition_keys:
            spec = parse_spec(split.key.partition("/")[2], self.url)
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
                if isinstance(e, odps_errors.ODPSError) and not is_transient(e):
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
                if not is_transient(e):
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
        cache = self._holder()["sessions"]
        key = ("storage", self._key(spec), tuple(fetch or ()))
        with self._lock:
            hit = cache.get(key)
            if hit is not None:
                return hit  # type: ignore[no-any-return]
            table = self._client.get_table(self.table_name, project=self.project)
            try:
                client, resp = storage.open_read_session(
                    self._client, table, self.tunnel_endpoint, spec_str(spec) if spec else None, fetch
                )
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
            client, sid = self._read_session(spec, fetch)
            yield from storage.read_rows(client, sid, start, count, self.compression)
            return
        if self.reader == "pyodps":
            reader = sess.open_arrow_reader(start, count, columns=fetch, compress=bool(self.compression))
            try:
                yield from reader
            finally:
                reader.close()
            return
        yield from FastArrowDownload(sess, start, count, fetch, self.compression, self.timeout).batches()
