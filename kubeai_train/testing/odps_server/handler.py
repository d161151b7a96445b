"""The HTTP side of the local ODPS server: routing, the signature check, the REST metadata
(project, table, partitions), TableTunnel sessions and downloads, the admin endpoint, and
applying injected faults to responses. The Storage API routes live in
:mod:`kubeai_train.testing.odps_server.storage_api`; this handler sends their replies."""

from __future__ import annotations

import json
import logging
import socket
import struct
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.sax.saxutils import escape

from kubeai_train.testing.odps_server import storage_api
from kubeai_train.testing.odps_server.auth import AuthFailure, check_signature
from kubeai_train.testing.odps_server.catalog import CatalogError, TableInfo
from kubeai_train.testing.odps_server.faults import Fault, apply_faults
from kubeai_train.testing.odps_server.state import (
    ROWRANGE,
    STORAGE_PREFIX,
    HttpError,
    Session,
    lookup_partition,
    parse_spec,
    rfc822,
)
from kubeai_train.testing.odps_server.storage_api import Reply
from kubeai_train.testing.odps_server.wire import (
    ENCODINGS,
    END_RECORD_TAG,
    compress_body,
)

__all__ = ["Handler", "Httpd"]

logger = logging.getLogger("kubeai_train.testing.odps_server")


class Httpd(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    # the OdpsServer serving; typed loosely because server.py builds this class, not the reverse
    odps: Any

    def handle_error(self, request, client_address):  # a client gone away is no server error
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Httpd
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
            storage = raw.startswith(STORAGE_PREFIX + "/")
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
                raise HttpError(e.status, e.code, e.message) from None
            if storage:
                self._reply(
                    storage_api.route(
                        odps, self.command, raw, self._req_body, self.headers.get("Accept-Encoding", "")
                    )
                )
            else:
                self._route(raw)
        except HttpError as e:
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
        return apply_faults(self.server.odps._take_faults(scope))

    def _reply(self, reply: Reply) -> None:
        if reply.faults is None:
            self._send(reply.status, reply.body, reply.ctype)
        else:
            self._send_body(reply.body, reply.faults, None)

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
            raise HttpError(404, "NoSuchObject", f"no such resource {parts.path}")
        project = segs[1]
        if len(segs) >= 3 and segs[2] == "logs":
            self._send(200, b"")
            return
        if not odps.catalog.project_exists(project):
            raise HttpError(404, "NoSuchProject", f"project {project!r} does not exist")
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
                raise HttpError(404, "NoSuchTable", f"table {project}.{segs[3]} does not exist")
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
        raise HttpError(404, "NoSuchObject", f"no such resource {parts.path}")

    def _project_xml(self, project: str) -> None:
        now = rfc822(time.time())
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
            f"<CreationTime>{rfc822(mtime)}</CreationTime><LastModifiedTime>{rfc822(mtime)}</LastModifiedTime>"
            f"<Schema><![CDATA[{json.dumps(meta if not extended else {})}]]></Schema></Table>"
        )
        self._send(200, body.encode())

    def _partitions_xml(self, table: TableInfo, params: dict[str, str]) -> None:
        prefix = parse_spec(params.get("partition"))
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
        spec = lookup_partition(table, parse_spec(params.get("partition")))
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

    def _session_json(self, sess: Session) -> None:
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
        spec = lookup_partition(table, parse_spec(params.get("partition")))
        part = self.server.odps.catalog.read(table, spec)
        self._session_json(self.server.odps._new_session(part))

    def _session_status(self, table: TableInfo, params: dict[str, str]) -> None:
        spec = lookup_partition(table, parse_spec(params.get("partition")))
        self._session_json(self.server.odps._get_session(params["downloadid"], table, spec))

    def _download(self, table: TableInfo, params: dict[str, str]) -> None:
        odps = self.server.odps
        spec = lookup_partition(table, parse_spec(params.get("partition")))
        sess = odps._get_session(params["downloadid"], table, spec)
        if sess.expired:
            raise HttpError(
                400,
                "StatusConflict",
                f"download session {sess.id} has expired; create a new download session",
            )
        m = ROWRANGE.match(params.get("rowrange", ""))
        if not m:
            raise HttpError(
                400, "InvalidRowRange", f"rowrange must be '(start,count)', got {params.get('rowrange')!r}"
            )
        start, count = int(m.group(1)), int(m.group(2))
        if start + count > sess.part.num_rows:
            raise HttpError(
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
                raise HttpError(
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
