"""The local ODPS server object: the catalog, credentials, sessions and faults it serves, its
background thread, and the download bodies it encodes (cached) for the handler."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from kubeai_train.testing.odps_server.auth import Credentials
from kubeai_train.testing.odps_server.catalog import Catalog, PartitionData, TableInfo
from kubeai_train.testing.odps_server.faults import Fault
from kubeai_train.testing.odps_server.handler import Handler, Httpd
from kubeai_train.testing.odps_server.state import HttpError, ReadSession, Session, Stats, record_rows
from kubeai_train.testing.odps_server.wire import (
    encode_arrow_batches,
    encode_records,
    frame_arrow,
)

__all__ = ["DEFAULT_ACCESS_ID", "DEFAULT_SECRET", "OdpsServer"]

logger = logging.getLogger("kubeai_train.testing.odps_server")


DEFAULT_ACCESS_ID = "local-access-id"
DEFAULT_SECRET = "local-secret"  # a test credential of the local server, not a real secret


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
        self._sessions: dict[str, Session] = {}
        self._read_sessions: dict[str, ReadSession] = {}
        self._session_lock = threading.Lock()
        self._bodies: OrderedDict[tuple, bytes] = OrderedDict()
        self._body_bytes = 0
        self._body_cache_bytes = body_cache_bytes
        self._body_lock = threading.Lock()
        self.stats = Stats()
        self._httpd = Httpd(("127.0.0.1", port), Handler)
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
            hit: list[Session | ReadSession] = [
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
    def _new_session(self, part: PartitionData) -> Session:
        sess = Session(uuid.uuid4().hex.upper(), part, time.time())
        with self._session_lock:
            self._sessions[sess.id] = sess
        with self.stats.lock:
            self.stats.sessions_created += 1
        return sess

    def _get_session(self, sid: str, table: TableInfo, spec: tuple) -> Session:
        with self._session_lock:
            sess = self._sessions.get(sid)
        if sess is None or sess.part.table.name != table.name or sess.part.spec != spec:
            raise HttpError(
                404, "NoSuchDownload", f"download session {sid!r} not found for this table/partition"
            )
        if time.time() - sess.created > self.session_ttl:
            sess.expired = True
        return sess

    def body(
        self, sess: Session, start: int, count: int, columns: tuple[str, ...] | None, arrow: bool
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
            body = encode_records(cols, record_rows(data, cols))
        with self._body_lock:
            self._bodies[key] = body
            self._body_bytes += len(body)
            while self._body_bytes > self._body_cache_bytes and len(self._bodies) > 1:
                _, old = self._bodies.popitem(last=False)
                self._body_bytes -= len(old)
        return body
