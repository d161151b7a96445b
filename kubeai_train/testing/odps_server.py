"""A local ODPS (MaxCompute) REST + table tunnel server that the real pyodps client talks to.

It serves Parquet files under a root directory as ODPS tables (layout in
:mod:`kubeai_train.testing._odps_catalog`): project / table / partition metadata, TableTunnel
download sessions (create, poll, reuse by id), the Arrow download with its chunk + CRC32C framing,
the protobuf record download with its checksums, and deflate / zstd / lz4 compression of either.
Requests must be signed with the configured access key (pyodps's "ODPS id:signature" scheme);
bad credentials get a real 403 that pyodps raises.

For tests, benchmarks and offline development it adds fault injection (a connection reset
mid-body, an HTTP status such as 503, a corrupt chunk CRC, expired sessions, slow responses) and
byte counters, both through the Python API and an unauthenticated admin endpoint on loopback
(``GET /__admin__/stats``, ``POST /__admin__/faults``, ``POST /__admin__/expire``).

Usage::

    with OdpsServer(root) as server:
        os.environ.update(server.env())           # ODPS_ENDPOINT, ODPS_TUNNEL_ENDPOINT, ...
        server.inject("reset", count=1, after_bytes=100_000)
        ...

    python -m kubeai_train.testing.odps_server --root DIR [--port P] [--project P]
"""

from __future__ import annotations

import argparse
import email.utils
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.sax.saxutils import escape

import pyarrow as pa

from kubeai_train.testing._odps_auth import AuthFailure, Credentials, check_signature
from kubeai_train.testing._odps_catalog import Catalog, CatalogError, PartitionData, TableInfo
from kubeai_train.testing._odps_wire import (
    ENCODINGS,
    END_RECORD_TAG,
    compress_body,
    encode_arrow_batches,
    encode_records,
    frame_arrow,
)

__all__ = ["DEFAULT_ACCESS_ID", "DEFAULT_SECRET", "Fault", "OdpsServer", "main"]

logger = logging.getLogger(__name__)

DEFAULT_ACCESS_ID = "local-access-id"
DEFAULT_SECRET = "local-secret"  # a test credential of the local server, not a real secret
_FAULT_KINDS = ("reset", "truncate", "status", "bad_crc", "slow")
_FAULT_SCOPES = ("data", "session", "meta", "any")
_STORAGE_PREFIX = "/api/storage/v1"
_ROWRANGE = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


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


@dataclass
class _Session:
    id: str
    part: PartitionData
    created: float
    expired: bool = False


@dataclass
class _ReadSession:
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
class _Stats:
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


class _HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status, self.code, self.message = status, code, message


def _parse_spec(text: str | None) -> tuple[tuple[str, str], ...]:
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
            raise _HttpError(
                400, "InvalidPartitionSpec", f"partition spec {text!r} is not key=value[,key=value]"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out.append((key.strip(), value))
    return tuple(out)


def _spec_str(spec: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in spec)


def _rfc822(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


class OdpsServer:
    """The local ODPS server; a context manager that runs it on a background thread.

    Args:
        root: directory of projects / tables / partitions (see module docstring).
        port: TCP port on 127.0.0.1 (0: a free one).
        access_id, secret: the only access key accepted.
        project: default project for :meth:`env`.
        chunk_size: data bytes per CRC chunk of Arrow bodies.
        batch_rows: rows per Arrow record batch in download bodies.
        session_ttl: seconds after which a download session expires (real ODPS: 24 h).
        body_cache_bytes: memory for encoded download bodies (re-reads of a range are free).
        prefix: URL path prefix of the REST endpoint (real endpoints end in /api).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        port: int = 0,
        access_id: str = DEFAULT_ACCESS_ID,
        secret: str = DEFAULT_SECRET,
        project: str | None = None,
        chunk_size: int = 65536,
        batch_rows: int = 32768,
        session_ttl: float = 24 * 3600.0,
        body_cache_bytes: int = 1 << 30,
        prefix: str = "/api",
    ) -> None:
        if chunk_size < 16:
            raise ValueError(f"chunk_size must be >= 16, got {chunk_size}")
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        self.catalog = Catalog(root)
        self.credentials = Credentials(access_id, secret)
        self.chunk_size = chunk_size
        self.batch_rows = batch_rows
        self.session_ttl = session_ttl
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self._project = project
        self._faults: list[Fault] = []
        self._fault_lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._read_sessions: dict[str, _ReadSession] = {}
        self._session_lock = threading.Lock()
        self._bodies: OrderedDict[tuple, bytes] = OrderedDict()
        self._body_bytes = 0
        self._body_cache_bytes = body_cache_bytes
        self._body_lock = threading.Lock()
        self.stats = _Stats()
        self._httpd = _Httpd(("127.0.0.1", port), _Handler)
        self._httpd.odps = self
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def endpoint(self) -> str:
        """The REST endpoint (ODPS_ENDPOINT)."""
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def tunnel_endpoint(self) -> str:
        """The tunnel endpoint (ODPS_TUNNEL_ENDPOINT)."""
        return f"http://127.0.0.1:{self.port}"

    def env(self, project: str | None = None) -> dict[str, str]:
        """Environment variables that point pyodps / kubeai_train at this server."""
        env = {
            "ODPS_ENDPOINT": self.endpoint,
            "ODPS_TUNNEL_ENDPOINT": self.tunnel_endpoint,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": self.credentials.access_id,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": self.credentials.secret,
        }
        project = project or self._project
        if project:
            env["ODPS_PROJECT_NAME"] = project
        return env

    def start(self) -> OdpsServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="odps-server",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()

    def serve_forever(self) -> None:
        self._httpd.serve_forever(poll_interval=0.2)

    def __enter__(self) -> OdpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault injection -----------------------------------------------------------------------
    def inject(self, kind: str, **kwargs: Any) -> Fault:
        """Add a fault rule (see :class:`Fault`); returns it."""
        fault = Fault(kind, **kwargs)
        with self._fault_lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._fault_lock:
            self._faults.clear()

    def pending_faults(self) -> list[Fault]:
        with self._fault_lock:
            return [Fault(**vars(f)) for f in self._faults]

    def expire_sessions(self, session_id: str | None = None) -> int:
        """Mark one (or every) download / Storage API read session expired; returns how many."""
        with self._session_lock:
            hit: list[_Session | _ReadSession] = [
                s for s in self._sessions.values() if session_id in (None, s.id)
            ]
            hit += [s for s in self._read_sessions.values() if session_id in (None, s.id)]
            for s in hit:
                s.expired = True
        return len(hit)

    def _take_faults(self, scope: str) -> list[Fault]:
        fired = []
        with self._fault_lock:
            for f in list(self._faults):
                if f.scope in (scope, "any") and not (f.kind == "bad_crc" and scope != "data"):
                    fired.append(f)
                    if f.count > 0:
                        f.count -= 1
                        if f.count == 0:
                            self._faults.remove(f)
        if fired:
            with self.stats.lock:
                for f in fired:
                    self.stats.faults_fired[f.kind] = self.stats.faults_fired.get(f.kind, 0) + 1
        return fired

    # -- sessions and bodies -------------------------------------------------------------------
    def _new_session(self, part: PartitionData) -> _Session:
        sess = _Session(uuid.uuid4().hex.upper(), part, time.time())
        with self._session_lock:
            self._sessions[sess.id] = sess
        with self.stats.lock:
            self.stats.sessions_created += 1
        return sess

    def _get_session(self, sid: str, table: TableInfo, spec: tuple) -> _Session:
        with self._session_lock:
            sess = self._sessions.get(sid)
        if sess is None or sess.part.table.name != table.name or sess.part.spec != spec:
            raise _HttpError(
                404, "NoSuchDownload", f"download session {sid!r} not found for this table/partition"
            )
        if time.time() - sess.created > self.session_ttl:
            sess.expired = True
        return sess

    def body(
        self, sess: _Session, start: int, count: int, columns: tuple[str, ...] | None, arrow: bool
    ) -> bytes:
        """The uncompressed download body of a row range (cached)."""
        key = (
            sess.part.table.project,
            sess.part.table.name,
            sess.part.spec,
            sess.part.version,
            start,
            count,
            columns,
            arrow,
        )
        with self._body_lock:
            hit = self._bodies.get(key)
            if hit is not None:
                self._bodies.move_to_end(key)
                return hit
        data = sess.part.data.slice(start, count)
        if columns:
            # Arrow bodies keep the table's column order (pyodps reorders on its side); record
            # bodies number fields in the requested order.
            wanted = set(columns)
            order = [n for n, _ in sess.part.table.columns if n in wanted] if arrow else list(columns)
            data = data.select(order)
        if arrow:
            batches = data.to_batches(max_chunksize=self.batch_rows)
            body = frame_arrow(encode_arrow_batches(batches), self.chunk_size)
        else:
            cols = [(n, t) for n, t in sess.part.table.columns if not columns or n in columns]
            if columns:
                cols = [next(c for c in cols if c[0] == n) for n in columns]
            body = encode_records(cols, _rows(data, cols))
        with self._body_lock:
            self._bodies[key] = body
            self._body_bytes += len(body)
            while self._body_bytes > self._body_cache_bytes and len(self._bodies) > 1:
                _, old = self._bodies.popitem(last=False)
                self._body_bytes -= len(old)
        return body


def _rows(data: pa.Table, cols: list[tuple[str, str]]):
    arrays = []
    for name, odps_type in cols:
        col = data.column(name)
        if odps_type == "datetime":
            col = col.cast(pa.int64())
        elif odps_type == "date":
            col = col.cast(pa.int32())
        arrays.append(col.to_pylist())
    return zip(*arrays, strict=True)


class _Httpd(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    odps: OdpsServer

    def handle_error(self, request, client_address):  # a client gone away is no server error
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Httpd
    _reset = False

    def log_message(self, format: str, *args: Any) -> None:  # never log request lines (signatures)
        logger.debug("odps-server %s", self.command)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- plumbing ------------------------------------------------------------------------------
    def _send(
        self, status: int, body: bytes, ctype: str = "application/xml", extra: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-odps-request-id", uuid.uuid4().hex)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            with self.server.odps.stats.lock:
                self.server.odps.stats.body_bytes += len(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
            f"{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"<RequestId>{uuid.uuid4().hex}</RequestId><HostId>127.0.0.1</HostId></Error>"
        ).encode()
        self._send(status, body)

    def _dispatch(self) -> None:
        odps = self.server.odps
        with odps.stats.lock:
            odps.stats.requests += 1
        length = int(self.headers.get("Content-Length") or 0)
        self._req_body = b""
        if length:
            self._req_body = self.rfile.read(length)
        elif self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._drain_chunked()
        try:
            raw = self.path
            if raw.startswith("/__admin__/"):
                self._admin(raw)
                return
            storage = raw.startswith(_STORAGE_PREFIX + "/")
            # REST calls are signed relative to the endpoint (which ends in the prefix); Storage
            # API calls go to the tunnel endpoint, so their signed path keeps /api/storage/v1.
            if not storage and odps.prefix and (raw == odps.prefix or raw.startswith(odps.prefix + "/")):
                raw = raw[len(odps.prefix) :]
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                check_signature(odps.credentials, self.command, raw, headers)
            except AuthFailure as e:
                with odps.stats.lock:
                    odps.stats.auth_failures += 1
                raise _HttpError(e.status, e.code, e.message) from None
            if storage:
                self._storage_route(raw)
            else:
                self._route(raw)
        except _HttpError as e:
            self._error(e.status, e.code, e.message)
        except CatalogError as e:
            self._error(500, "InternalServerError", str(e))
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        if self._reset:
            self.close_connection = True

    def _drain_chunked(self) -> None:
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return
            self.rfile.read(size + 2)

    def _apply_faults(self, scope: str) -> list[Fault]:
        faults = self.server.odps._take_faults(scope)
        for f in faults:
            if f.kind == "slow":
                time.sleep(f.delay)
        for f in faults:
            if f.kind == "status":
                raise _HttpError(
                    f.status,
                    "ServiceUnavailable" if f.status == 503 else "InternalServerError",
                    f"injected fault: HTTP {f.status}",
                )
        return faults

    # -- routes --------------------------------------------------------------------------------
    def _admin(self, raw: str) -> None:
        odps = self.server.odps
        path = urlsplit(raw).path
        if path == "/__admin__/stats" and self.command == "GET":
            self._send(200, json.dumps(odps.stats.snapshot()).encode(), "application/json")
        elif path == "/__admin__/faults" and self.command == "POST":
            try:
                spec = json.loads(self._req_body or b"{}")
                if spec.get("clear"):
                    odps.clear_faults()
                else:
                    odps.inject(**spec)
            except (TypeError, ValueError) as e:
                self._send(400, json.dumps({"error": str(e)}).encode(), "application/json")
                return
            self._send(200, json.dumps({"pending": len(odps.pending_faults())}).encode(), "application/json")
        elif path == "/__admin__/expire" and self.command == "POST":
            q = dict(parse_qsl(urlsplit(raw).query))
            n = odps.expire_sessions(q.get("session"))
            self._send(200, json.dumps({"expired": n}).encode(), "application/json")
        else:
            self._send(404, json.dumps({"error": f"no admin route {path}"}).encode(), "application/json")

    def _route(self, raw: str) -> None:
        odps = self.server.odps
        parts = urlsplit(raw)
        segs = [unquote(s) for s in parts.path.strip("/").split("/") if s]
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        if len(segs) == 2 and segs[0] == "projects" and self.command == "PUT":
            self._send(200, b"")  # survey logs
            return
        if not segs or segs[0] != "projects" or len(segs) < 2:
            raise _HttpError(404, "NoSuchObject", f"no such resource {parts.path}")
        project = segs[1]
        if len(segs) >= 3 and segs[2] == "logs":
            self._send(200, b"")
            return
        if not odps.catalog.project_exists(project):
            raise _HttpError(404, "NoSuchProject", f"project {project!r} does not exist")
        if len(segs) == 2:
            self._apply_faults("meta")
            self._project_xml(project)
            return
        if segs[2] == "tunnel" and "service" in params:
            self._send(200, f"127.0.0.1:{odps.port}".encode(), "text/plain")
            return
        if len(segs) == 3 and segs[2] == "tables":
            self._apply_faults("meta")
            names = "".join(f"<Table><Name>{escape(t)}</Name></Table>" for t in odps.catalog.tables(project))
            self._send(200, f"<Tables><Marker></Marker><MaxItems>1000</MaxItems>{names}</Tables>".encode())
            return
        if len(segs) == 4 and segs[2] == "tables":
            table = odps.catalog.table(project, segs[3])
            if table is None:
                raise _HttpError(404, "NoSuchTable", f"table {project}.{segs[3]} does not exist")
            if "downloads" in params and self.command == "POST":
                self._apply_faults("session")
                self._create_session(table, params)
            elif "downloadid" in params and "data" in params:
                self._download(table, params)
            elif "downloadid" in params:
                self._apply_faults("session")
                self._session_status(table, params)
            elif "partitions" in params:
                self._apply_faults("meta")
                self._partitions_xml(table, params)
            elif "partition" in params:
                self._apply_faults("meta")
                self._partition_xml(table, params)
            else:
                self._apply_faults("meta")
                self._table_xml(table, extended="extended" in params)
            return
        raise _HttpError(404, "NoSuchObject", f"no such resource {parts.path}")

    # -- Storage API (odps.apis.storage_api): batch-read sessions and Arrow IPC streams ----------
    def _storage_route(self, raw: str) -> None:
        odps = self.server.odps
        parts = urlsplit(raw)
        segs = [unquote(x) for x in parts.path[len(_STORAGE_PREFIX) :].strip("/").split("/") if x]
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        # projects/<p>/schemas/<s>/tables/<t>/(sessions[/<id>] | data)
        if len(segs) < 7 or segs[0] != "projects" or segs[2] != "schemas" or segs[4] != "tables":
            raise _HttpError(404, "NoSuchObject", f"no such Storage API resource {parts.path}")
        project, name, rest = segs[1], segs[5], segs[6:]
        if not odps.catalog.project_exists(project):
            raise _HttpError(404, "NoSuchProject", f"project {project!r} does not exist")
        table = odps.catalog.table(project, name)
        if table is None:
            raise _HttpError(404, "NoSuchTable", f"table {project}.{name} does not exist")
        if rest == ["sessions"] and self.command == "POST":
            self._apply_faults("session")
            self._storage_create(table)
        elif len(rest) == 2 and rest[0] == "sessions" and self.command == "GET":
            self._apply_faults("session")
            self._storage_json(self._storage_session(rest[1], table), 200)
        elif rest == ["data"] and self.command == "GET":
            self._storage_data(table, params)
        else:
            raise _HttpError(404, "NoSuchObject", f"no such Storage API resource {parts.path}")

    def _storage_session(self, sid: str, table: TableInfo) -> _ReadSession:
        odps = self.server.odps
        with odps._session_lock:
            sess = odps._read_sessions.get(sid)
        if sess is None or sess.table.name != table.name:
            raise _HttpError(
                404, "NoSuchSession", f"read session {sid!r} not found for {table.project}.{table.name}"
            )
        if time.time() - sess.created > odps.session_ttl:
            sess.expired = True
        return sess

    def _storage_create(self, table: TableInfo) -> None:
        odps = self.server.odps
        try:
            req = json.loads(self._req_body or b"{}")
        except ValueError as e:
            raise _HttpError(400, "InvalidArgument", f"read session request is not JSON: {e}") from None
        known = [n for n, _ in table.columns]
        columns = list(req.get("RequiredDataColumns") or known)
        bad = [c for c in columns if c not in known]
        pcols = list(req.get("RequiredPartitionColumns") or [])
        bad += [c for c in pcols if c not in table.partition_keys]
        if bad:
            raise _HttpError(
                400, "InvalidColumnSpec", f"columns {bad} not in table {table.project}.{table.name}"
            )
        wanted = [_parse_spec(x) for x in req.get("RequiredPartitions") or []]
        specs = (
            [self._lookup_partition(table, w) for w in wanted] if wanted else list(table.partitions or [()])
        )
        parts = [odps.catalog.read(table, sp) for sp in specs]
        split = req.get("SplitOptions") or {}
        mode = split.get("SplitMode", "Size")
        number = int(split.get("SplitNumber") or 0)
        total = sum(p.num_rows for p in parts)
        row_bytes = max(1, sum(p.data.nbytes for p in parts) // max(1, total))
        if mode == "RowOffset":
            split_rows = 0
        elif mode == "Parallelism":
            split_rows = max(1, -(-total // max(1, number)))
        elif mode == "Size":
            split_rows = max(1, (number or 256 << 20) // row_bytes)
        else:
            raise _HttpError(400, "InvalidArgument", f"split mode {mode!r} is not supported here")
        sess = _ReadSession(uuid.uuid4().hex.upper(), table, parts, columns, pcols, split_rows, time.time())
        with odps._session_lock:
            odps._read_sessions[sess.id] = sess
        with odps.stats.lock:
            odps.stats.sessions_created += 1
        self._storage_json(sess, 201)

    def _storage_json(self, sess: _ReadSession, status: int) -> None:
        ptypes = dict.fromkeys(sess.table.partition_keys, "string")
        ctypes = dict(sess.table.columns)
        total = sess.num_rows
        body = {
            "SessionId": sess.id,
            "SessionType": "batch_read",
            "SessionStatus": "EXPIRED" if sess.expired else "NORMAL",
            "ExpirationTime": int((sess.created + self.server.odps.session_ttl) * 1000),
            "SplitsCount": -(-total // sess.split_rows) if sess.split_rows else -1,
            "RecordCount": total,
            "DataSchema": {
                "DataColumns": [
                    {"Name": c, "Type": ctypes[c], "Comment": "", "Nullable": True} for c in sess.columns
                ],
                "PartitionColumns": [
                    {"Name": k, "Type": ptypes[k], "Comment": "", "Nullable": True}
                    for k in sess.partition_columns
                ],
            },
            "SupportedDataFormat": [{"Type": "arrow", "Version": "v5"}],
        }
        self._send(status, json.dumps(body).encode(), "application/json")

    def _storage_data(self, table: TableInfo, params: dict[str, str]) -> None:
        odps = self.server.odps
        sess = self._storage_session(params.get("session_id", ""), table)
        if sess.expired:
            raise _HttpError(
                400, "SessionExpired", f"read session {sess.id} has expired; create a new read session"
            )
        try:
            split_index = int(params.get("split_index", "0"))
            row_index = int(params.get("row_index", "0"))
            row_count = int(params.get("row_count", "0"))
            max_rows = max(1, int(params.get("max_batch_rows", "4096")))
        except ValueError:
            raise _HttpError(
                400, "InvalidArgument", "split_index, row_index, row_count must be integers"
            ) from None
        total = sess.num_rows
        if sess.split_rows:
            lo = split_index * sess.split_rows
            hi = min(total, lo + sess.split_rows)
            if split_index < 0 or lo >= max(total, 1) and total:
                raise _HttpError(400, "InvalidArgument", f"split_index {split_index} out of range")
        else:
            lo, hi = 0, total
        start = lo + row_index
        stop = hi if row_count <= 0 else min(hi, start + row_count)
        if start > hi:
            raise _HttpError(400, "InvalidArgument", f"row_index {row_index} is beyond the split")
        faults = self._apply_faults("data")
        with odps.stats.lock:
            odps.stats.data_requests += 1
        data = sess.rows(start, stop - start)
        accept = self.headers.get("Accept-Encoding", "").strip().upper()
        codec = {"LZ4_FRAME": "lz4", "ZSTD": "zstd"}.get(accept)
        sink = pa.BufferOutputStream()
        opts = pa.ipc.IpcWriteOptions(compression=codec)
        with pa.ipc.new_stream(sink, data.schema, options=opts) as writer:
            for batch in data.to_batches(max_chunksize=max_rows):
                writer.write_batch(batch)
        self._send_body(sink.getvalue().to_pybytes(), faults, None)

    def _project_xml(self, project: str) -> None:
        now = _rfc822(time.time())
        body = (
            f"<Project><Name>{escape(project)}</Name><Owner>ALIYUN$local</Owner><State>AVAILABLE</State>"
            f"<CreationTime>{now}</CreationTime><LastModifiedTime>{now}</LastModifiedTime>"
            "<Type>managed</Type><Properties></Properties></Project>"
        )
        self._send(200, body.encode())

    @staticmethod
    def _schema_json(table: TableInfo, extra: dict | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "columns": [{"name": n, "type": t, "comment": "", "isNullable": True} for n, t in table.columns],
            "partitionKeys": [{"name": k, "type": "string", "comment": ""} for k in table.partition_keys],
        }
        out.update(extra or {})
        return out

    def _table_xml(self, table: TableInfo, extended: bool) -> None:
        odps = self.server.odps
        mtime = table.path.stat().st_mtime
        meta = self._schema_json(
            table,
            {
                "tableName": table.name,
                "comment": "",
                "owner": "ALIYUN$local",
                "createTime": int(mtime),
                "lastModifiedTime": int(mtime),
                "lastDDLTime": int(mtime),
                "isVirtualView": False,
                "lifecycle": -1,
                "recordNum": odps.catalog.row_count(table),
                "size": odps.catalog.byte_size(table),
            },
        )
        body = (
            f'<Table format="json"><Name>{escape(table.name)}</Name><TableId>{abs(hash(str(table.path)))}</TableId>'
            f"<Owner>ALIYUN$local</Owner><Type>MANAGED_TABLE</Type>"
            f"<CreationTime>{_rfc822(mtime)}</CreationTime><LastModifiedTime>{_rfc822(mtime)}</LastModifiedTime>"
            f"<Schema><![CDATA[{json.dumps(meta if not extended else {})}]]></Schema></Table>"
        )
        self._send(200, body.encode())

    def _lookup_partition(self, table: TableInfo, spec: tuple[tuple[str, str], ...]) -> tuple:
        if not table.partition_keys:
            if spec:
                raise _HttpError(
                    400,
                    "InvalidPartitionSpec",
                    f"table {table.project}.{table.name} is not partitioned; got {_spec_str(spec)}",
                )
            return ()
        if [k for k, _ in spec] != list(table.partition_keys):
            raise _HttpError(
                400,
                "InvalidPartitionSpec",
                f"table {table.project}.{table.name} is partitioned by {','.join(table.partition_keys)}; "
                f"a full partition spec is needed, got {_spec_str(spec) or 'none'!r}",
            )
        if spec not in table.partitions:
            raise _HttpError(
                404,
                "NoSuchPartition",
                f"partition {_spec_str(spec)} of table {table.project}.{table.name} does not exist",
            )
        return spec

    def _partitions_xml(self, table: TableInfo, params: dict[str, str]) -> None:
        prefix = _parse_spec(params.get("partition"))
        items = []
        for spec in table.partitions:
            if tuple(spec[: len(prefix)]) != prefix:
                continue
            cols = "".join(f'<Column Name="{escape(k)}" Value="{escape(v)}"/>' for k, v in spec)
            mtime = table.partition_dir(spec).stat().st_mtime
            items.append(
                f"<Partition>{cols}<CreationTime>{int(mtime)}</CreationTime>"
                f"<LastDDLTime>{int(mtime)}</LastDDLTime><LastModifiedTime>{int(mtime)}</LastModifiedTime></Partition>"
            )
        body = f"<Partitions><Marker></Marker><MaxItems>{len(items)}</MaxItems>{''.join(items)}</Partitions>"
        self._send(200, body.encode())

    def _partition_xml(self, table: TableInfo, params: dict[str, str]) -> None:
        spec = self._lookup_partition(table, _parse_spec(params.get("partition")))
        part = self.server.odps.catalog.read(table, spec)
        mtime = int(table.partition_dir(spec).stat().st_mtime)
        meta = {
            "createTime": mtime,
            "lastDDLTime": mtime,
            "lastModifiedTime": mtime,
            "partitionRecordNum": part.num_rows,
            "partitionSize": int(part.data.nbytes),
        }
        cols = "".join(f'<Column Name="{escape(k)}" Value="{escape(v)}"/>' for k, v in spec)
        body = f"<Partition>{cols}<Schema><![CDATA[{json.dumps(meta)}]]></Schema></Partition>"
        self._send(200, body.encode())

    def _session_json(self, sess: _Session) -> None:
        table = sess.part.table
        status = "EXPIRED" if sess.expired else "NORMAL"
        body = {
            "DownloadID": sess.id,
            "Status": status,
            "RecordCount": sess.part.num_rows,
            "Schema": self._schema_json(table),
            "QuotaName": "",
            "SupportReadByRawSize": False,
        }
        self._send(200, json.dumps(body).encode(), "application/json")

    def _create_session(self, table: TableInfo, params: dict[str, str]) -> None:
        spec = self._lookup_partition(table, _parse_spec(params.get("partition")))
        part = self.server.odps.catalog.read(table, spec)
        self._session_json(self.server.odps._new_session(part))

    def _session_status(self, table: TableInfo, params: dict[str, str]) -> None:
        spec = self._lookup_partition(table, _parse_spec(params.get("partition")))
        self._session_json(self.server.odps._get_session(params["downloadid"], table, spec))

    def _download(self, table: TableInfo, params: dict[str, str]) -> None:
        odps = self.server.odps
        spec = self._lookup_partition(table, _parse_spec(params.get("partition")))
        sess = odps._get_session(params["downloadid"], table, spec)
        if sess.expired:
            raise _HttpError(
                400,
                "StatusConflict",
                f"download session {sess.id} has expired; create a new download session",
            )
        m = _ROWRANGE.match(params.get("rowrange", ""))
        if not m:
            raise _HttpError(
                400, "InvalidRowRange", f"rowrange must be '(start,count)', got {params.get('rowrange')!r}"
            )
        start, count = int(m.group(1)), int(m.group(2))
        if start + count > sess.part.num_rows:
            raise _HttpError(
                400,
                "InvalidRowRange",
                f"rowrange ({start},{count}) is beyond the {sess.part.num_rows} rows of the session",
            )
        columns: tuple[str, ...] | None = None
        if params.get("columns"):
            columns = tuple(c for c in params["columns"].split(",") if c)
            known = {n for n, _ in table.columns}
            bad = [c for c in columns if c not in known]
            if bad:
                raise _HttpError(
                    400, "InvalidColumnSpec", f"columns {bad} not in table {table.project}.{table.name}"
                )
        arrow = "arrow" in params
        faults = self._apply_faults("data")
        with odps.stats.lock:
            odps.stats.data_requests += 1
        body = odps.body(sess, start, count, columns, arrow)
        bad_crc = next((f for f in faults if f.kind == "bad_crc"), None)
        if bad_crc is not None:
            body = self._corrupt(body, arrow, bad_crc.chunk)
        encoding = None
        accept = [e.strip().lower() for e in self.headers.get("Accept-Encoding", "").split(",") if e.strip()]
        if len(accept) == 1 and accept[0] in ENCODINGS:
            encoding = accept[0]
            body = compress_body(body, encoding)
        self._send_body(body, faults, encoding)

    def _send_body(self, body: bytes, faults: list[Fault], encoding: str | None) -> None:
        odps = self.server.odps
        reset = next((f for f in faults if f.kind in ("reset", "truncate")), None)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-odps-request-id", uuid.uuid4().hex)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.end_headers()
        limit = len(body) if reset is None else min(reset.after_bytes, max(len(body) - 1, 0))
        view = memoryview(body)
        sent = 0
        block = 4 << 20
        while sent < limit:
            n = min(block, limit - sent)
            self.wfile.write(view[sent : sent + n])
            sent += n
        with odps.stats.lock:
            odps.stats.body_bytes += sent
            odps.stats.data_bytes += sent
        if reset is not None:
            self._reset = True
            self.close_connection = True
            try:
                if reset.kind == "reset":  # RST instead of FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    self.connection.shutdown(socket.SHUT_RDWR)
                self.connection.close()
            except OSError:
                pass

    def _corrupt(self, body: bytes, arrow: bool, chunk: int) -> bytes:
        buf = bytearray(body)
        if arrow:
            (size,) = struct.unpack_from("!I", buf, 0)
            n_full = (len(buf) - 4 - 4) // (size + 4)
            idx = min(chunk, n_full)
            pos = 4 + idx * (size + 4) + size if idx < n_full else len(buf) - 4
            buf[pos] ^= 0xFF
        else:
            # flip the low bit of the first record's checksum (the varint after its end tag)
            tag = END_RECORD_TAG
            pos = buf.find(tag)
            if pos >= 0:
                buf[pos + len(tag)] ^= 0x01
        return bytes(buf)


def main(argv: list[str] | None = None) -> int:
    """``python -m kubeai_train.testing.odps_server --root DIR [--port P]``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m kubeai_train.testing.odps_server",
        description="Local ODPS REST + tunnel server over Parquet files (offline development).",
    )
    parser.add_argument(
        "--root", required=True, help="directory: ROOT/<project>/<table>[/<k=v>...]/*.parquet"
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--project", default=None, help="default project for the printed ODPS_PROJECT_NAME")
    parser.add_argument("--access-id", default=DEFAULT_ACCESS_ID)
    parser.add_argument(
        "--secret-env",
        default=None,
        metavar="VAR",
        help="read the accepted secret from this environment variable (default: the local test secret)",
    )
    args = parser.parse_args(argv)
    secret = DEFAULT_SECRET
    if args.secret_env:
        secret = os.environ.get(args.secret_env, "")
        if not secret:
            print(f"error: --secret-env {args.secret_env}: variable is not set or empty", file=sys.stderr)
            return 2
    try:
        server = OdpsServer(
            args.root, port=args.port, access_id=args.access_id, secret=secret, project=args.project
        )
    except (CatalogError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    project = args.project
    if project is None:
        projects = sorted(p.name for p in server.catalog.root.iterdir() if p.is_dir())
        project = projects[0] if projects else None
    print(f"ODPS server on {server.endpoint} (tunnel {server.tunnel_endpoint}), root {server.catalog.root}")
    print("export these to use it:")
    for k, v in server.env(project).items():
        shown = v if k != "ALIBABA_CLOUD_ACCESS_KEY_SECRET" or not args.secret_env else f"${args.secret_env}"
        print(f"export {k}={shown}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
