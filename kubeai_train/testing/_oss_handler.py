"""HTTP request handling of the local OSS server: routing, signatures, faults, byte accounting.

Requests are path-style (``/<bucket>/<url-quoted key>?<subresources>``), which is what oss2 sends
to an IP or ``localhost`` endpoint. ``/_admin/...`` (not a valid bucket name) is the admin API:
``GET /_admin/stats``, ``POST /_admin/stats/reset``, ``GET|POST|DELETE /_admin/faults`` (JSON).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from . import _oss_xml as xml
from ._oss_auth import verify
from ._oss_faults import Fault
from ._oss_httpd import OSSHTTPServer
from ._oss_store import ObjectMeta, StoreError

logger = logging.getLogger("kubeai_train.testing.oss_server")

_CHUNK = 256 * 1024


class _Abort(Exception):
    """The connection was reset on purpose (fault injection); nothing more to send."""


def _http_date(ts: float | None = None) -> str:
    return formatdate(ts, usegmt=True)


class OSSRequestHandler(BaseHTTPRequestHandler):
    """One connection's requests (HTTP/1.1 keep-alive, as requests' connection pool expects)."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm on, the body waits for
    # the client's delayed ACK (40 ms a request on Linux).
    disable_nagle_algorithm = True
    server_version = "AliyunOSS"
    sys_version = ""
    server: OSSHTTPServer

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args: Any) -> None:
        # The default logs the request line, whose query may hold a URL signature or an STS token.
        logger.debug("%s %s", self.command, urlsplit(self.path).path)

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        self.request_id = uuid.uuid4().hex[:24].upper()
        self._body_consumed = False
        split = urlsplit(self.path)
        self.params = dict(parse_qsl(split.query, keep_blank_values=True))
        self.hdrs = {k.lower(): v for k, v in self.headers.items()}
        raw_path = split.path
        if raw_path.startswith("/_admin/") or raw_path == "/_admin":
            self._admin(raw_path)
            return
        bucket, _, key = raw_path.lstrip("/").partition("/")
        self.bucket = unquote(bucket)
        self.key = unquote(key)
        self.op = self._operation()
        ident = f"{self.bucket}/{self.key}"
        self.server.counter.request(self.op)
        try:
            try:
                fault = self.server.faults.take(self.op, ident, ("delay",))
                if fault is not None:
                    time.sleep(fault.seconds)
                fault = self.server.faults.take(self.op, ident, ("error",))
                if fault is not None:
                    raise StoreError(fault.status, fault.code, f"injected fault: {fault.code}")
                if self.op != "GetObject":
                    fault = self.server.faults.take(self.op, ident, ("reset",))
                    if fault is not None:
                        self._drain()
                        self._reset()
                if self.server.credentials is not None:
                    verify(
                        self.server.credentials, self.command, self.hdrs, self.bucket, self.key, self.params
                    )
                self._dispatch()
            except StoreError as e:
                self._drain()
                self._error(e)
        except _Abort:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _operation(self) -> str:
        """The OSS operation name of this request (used by faults and statistics)."""
        m, p, h = self.command, self.params, self.hdrs
        if not self.bucket:
            return "ListBuckets"
        if not self.key:
            if m == "GET":
                for sub, name in (
                    ("bucketInfo", "GetBucketInfo"),
                    ("location", "GetBucketLocation"),
                    ("uploads", "ListMultipartUploads"),
                ):
                    if sub in p:
                        return name
                return "ListObjectsV2" if p.get("list-type") == "2" else "ListObjects"
            if m == "POST" and "delete" in p:
                return "DeleteMultipleObjects"
            return {"PUT": "PutBucket", "DELETE": "DeleteBucket", "HEAD": "HeadBucket"}.get(m, "Bucket" + m)
        if m == "GET":
            return "ListParts" if "uploadId" in p else "GetObject"
        if m == "HEAD":
            return "GetObjectMeta" if "objectMeta" in p else "HeadObject"
        if m == "PUT":
            if "uploadId" in p:
                return "UploadPart"
            return "CopyObject" if "x-oss-copy-source" in h else "PutObject"
        if m == "POST":
            if "append" in p:
                return "AppendObject"
            if "uploads" in p:
                return "InitiateMultipartUpload"
            if "uploadId" in p:
                return "CompleteMultipartUpload"
        if m == "DELETE":
            return "AbortMultipartUpload" if "uploadId" in p else "DeleteObject"
        return "Object" + m

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body, chunk by chunk (Content-Length or chunked transfer encoding)."""
        self._body_consumed = True
        if self.hdrs.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise _Abort()
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(3)
        else:
            remaining = int(self.hdrs.get("content-length", "0") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, _CHUNK))
                if not chunk:
                    raise _Abort()
                remaining -= len(chunk)
                yield chunk

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _drain(self) -> None:
        """Read an unread request body, so the connection stays usable after an early answer."""
        if not self._body_consumed:
            for _ in self._body_chunks():
                pass

    def _reset(self) -> None:
        """Reset the connection (TCP RST) now."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        finally:
            raise _Abort()

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/xml",
    ) -> None:
        self.send_response(status)
        self._common_headers()
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body or status not in (204,):
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.server.counter.body(len(body))  # before the write, as for object bodies
            try:
                self.wfile.write(body)
            except BaseException:
                self.server.counter.body(-len(body))
                raise

    def version_string(self) -> str:
        return self.server_version

    def _common_headers(self) -> None:
        # send_response() already wrote Date and Server.
        self.send_header("x-oss-request-id", self.request_id)

    def _error(self, e: StoreError) -> None:
        body = xml.error(
            e.code,
            e.message,
            self.request_id,
            self.server.host_id,
            **({"BucketName": self.bucket} if e.code == "NoSuchBucket" else {}),
        )
        headers = dict(e.headers)
        if self.command == "HEAD":
            headers["x-oss-err"] = base64.b64encode(body).decode()
            self.send_response(e.status)
            self._common_headers()
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(e.status, body, headers)

    # ------------------------------------------------------------------ admin
    def _admin(self, path: str) -> None:
        srv = self.server
        try:
            if path == "/_admin/stats" and self.command == "GET":
                payload: Any = srv.counter.snapshot()
                payload["get_ranges"] = [list(r) for r in payload["get_ranges"]]
            elif path == "/_admin/stats/reset" and self.command == "POST":
                self._drain()
                srv.counter.reset()
                payload = {"ok": True}
            elif path == "/_admin/faults" and self.command == "GET":
                payload = srv.faults.snapshot()
            elif path == "/_admin/faults" and self.command == "POST":
                spec = json.loads(self._body() or b"{}")
                spec.pop("fired", None)
                payload = srv.faults.add(Fault(**spec)).to_dict()
            elif path == "/_admin/faults" and self.command == "DELETE":
                self._drain()
                srv.faults.clear()
                payload = {"ok": True}
            else:
                self._drain()
                self._send(
                    404,
                    json.dumps({"error": f"no admin route {self.command} {path}"}).encode(),
                    content_type="application/json",
                )
                return
        except (TypeError, ValueError) as e:
            self._send(400, json.dumps({"error": str(e)}).encode(), content_type="application/json")
            return
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # ------------------------------------------------------------------ operations
    def _dispatch(self) -> None:
        op = self.op
        handler = getattr(self, "_op_" + op, None)
        if handler is None:
            raise StoreError(501, "NotImplemented", f"the local OSS server does not implement {op}")
        handler()

    def _host(self) -> str:
        return self.hdrs.get("host", "127.0.0.1")

    def _op_ListBuckets(self) -> None:
        buckets = [b for b in self.server.store.buckets() if b[0].startswith(self.params.get("prefix", ""))]
        self._send(200, xml.list_buckets(buckets, self._host()))

    def _op_PutBucket(self) -> None:
        self._drain()
        self.server.store.create_bucket(self.bucket)
        self._send(200, headers={"Location": "/" + self.bucket})

    def _op_DeleteBucket(self) -> None:
        self.server.store.delete_bucket(self.bucket)
        self._send(204)

    def _op_HeadBucket(self) -> None:
        self.server.store.require_bucket(self.bucket)
        self._send(200)

    def _op_GetBucketInfo(self) -> None:
        path = self.server.store.require_bucket(self.bucket)
        import os

        self._send(200, xml.bucket_info(self.bucket, os.stat(path).st_mtime, self._host()))

    def _op_GetBucketLocation(self) -> None:
        self.server.store.require_bucket(self.bucket)
        self._send(200, xml.bucket_location())

    def _max_keys(self) -> int:
        raw = self.params.get("max-keys", "100") or "100"
        if not raw.isdigit() or not 0 <= int(raw) <= 1000:
            raise StoreError(400, "InvalidArgument", f"max-keys must be an integer in 0..1000, got {raw!r}")
        return int(raw)

    def _op_ListObjects(self) -> None:
        p = self.params
        prefix, delimiter, marker = p.get("prefix", ""), p.get("delimiter", ""), p.get("marker", "")
        max_keys = self._max_keys()
        objects, prefixes, truncated, nxt = self.server.store.list_page(
            self.bucket, prefix, delimiter, marker, max_keys
        )
        url = p.get("encoding-type") == "url"
        self._send(
            200,
            xml.list_objects(
                self.bucket, prefix, marker, delimiter, max_keys, url, objects, prefixes, truncated, nxt
            ),
        )

    def _op_ListObjectsV2(self) -> None:
        p = self.params
        prefix, delimiter = p.get("prefix", ""), p.get("delimiter", "")
        token, start_after = p.get("continuation-token", ""), p.get("start-after", "")
        max_keys = self._max_keys()
        marker = start_after
        if token:
            try:
                marker = base64.urlsafe_b64decode(token.encode()).decode()
            except (ValueError, UnicodeDecodeError) as e:
                raise StoreError(400, "InvalidArgument", "the continuation-token is not valid") from e
        objects, prefixes, truncated, nxt = self.server.store.list_page(
            self.bucket, prefix, delimiter, marker, max_keys
        )
        url = p.get("encoding-type") == "url"
        next_token = base64.urlsafe_b64encode(nxt.encode()).decode() if truncated else ""
        self._send(
            200,
            xml.list_objects_v2(
                self.bucket,
                prefix,
                start_after,
                token,
                delimiter,
                max_keys,
                url,
                p.get("fetch-owner") == "true",
                objects,
                prefixes,
                truncated,
                next_token,
            ),
        )

    def _op_ListMultipartUploads(self) -> None:
        self.server.store.require_bucket(self.bucket)
        uploads = self.server.store.uploads(self.bucket, self.params.get("prefix", ""))
        self._send(200, xml.list_uploads(self.bucket, uploads, self.params.get("encoding-type") == "url"))

    def _op_DeleteMultipleObjects(self) -> None:
        import hashlib

        body = self._body()
        md5 = self.hdrs.get("content-md5")
        if md5 is not None and md5 != base64.b64encode(hashlib.md5(body).digest()).decode():
            raise StoreError(
                400, "InvalidDigest", "the Content-MD5 you specified did not match what was received"
            )
        keys, quiet = xml.parse_delete(body)
        self.server.store.require_bucket(self.bucket)
        for k in keys:
            self.server.store.delete(self.bucket, k)
        self._send(200, xml.delete_result([] if quiet else keys, self.params.get("encoding-type") == "url"))

    # objects
    def _meta_headers(self, meta: ObjectMeta) -> dict[str, str]:
        h = {
            "ETag": f'"{meta.etag}"',
            "Last-Modified": _http_date(meta.last_modified),
            "x-oss-object-type": meta.object_type,
            "x-oss-storage-class": "Standard",
            "Accept-Ranges": "bytes",
        }
        if meta.crc is not None:
            h["x-oss-hash-crc64ecma"] = str(meta.crc)
        if meta.object_type == "Appendable":
            h["x-oss-next-append-position"] = str(meta.size)
        for k, v in meta.user_meta.items():
            h["x-oss-meta-" + k] = v
        return h

    def _user_meta(self) -> dict[str, str]:
        return {k[len("x-oss-meta-") :]: v for k, v in self.hdrs.items() if k.startswith("x-oss-meta-")}

    def _no_overwrite(self) -> None:
        if self.hdrs.get("x-oss-forbid-overwrite", "").lower() == "true":
            try:
                self.server.store.head(self.bucket, self.key)
            except StoreError:
                return
            raise StoreError(409, "FileAlreadyExists", f"the object {self.key!r} already exists")

    def _op_HeadObject(self) -> None:
        _, meta = self.server.store.head(self.bucket, self.key, need_crc=True)
        self.send_response(200)
        self._common_headers()
        for k, v in self._meta_headers(meta).items():
            self.send_header(k, v)
        self.send_header("Content-Type", meta.content_type)
        self.send_header("Content-Length", str(meta.size))
        self.end_headers()

    _op_GetObjectMeta = _op_HeadObject

    def _parse_range(self, size: int) -> tuple[int, int] | None:
        """(first, last + 1) of a Range header, None for the whole object."""
        raw = self.hdrs.get("range")
        if raw is None:
            return None
        standard = self.hdrs.get("x-oss-range-behavior", "").lower() == "standard"
        spec = raw.strip()
        if not spec.startswith("bytes=") or "," in spec:
            return None  # OSS ignores what it does not understand and sends the whole object
        first, _, last = spec[len("bytes=") :].partition("-")
        try:
            if first == "":
                n = int(last)
                return (max(size - n, 0), size) if n > 0 else None
            start = int(first)
            end = int(last) + 1 if last else size
        except ValueError:
            return None
        if start >= size or end <= start:
            if standard:
                raise StoreError(
                    416,
                    "InvalidRange",
                    f"the range {raw!r} is not satisfiable for {size} bytes",
                    {"Content-Range": f"bytes */{size}"},
                )
            return None
        if end > size:
            if not standard:
                return None  # legacy behaviour: an overlong range means the whole object
            end = size
        return start, end

    def _op_GetObject(self) -> None:
        store = self.server.store
        path, meta = store.head(self.bucket, self.key)
        rng = self._parse_range(meta.size)
        if rng is None:
            _, meta = store.head(self.bucket, self.key, need_crc=True)
        start, end = rng if rng is not None else (0, meta.size)
        ident = f"{self.bucket}/{self.key}"
        self.send_response(206 if rng is not None else 200)
        self._common_headers()
        for k, v in self._meta_headers(meta).items():
            self.send_header(k, v)
        self.send_header("Content-Type", meta.content_type)
        self.send_header("Content-Length", str(end - start))
        if rng is not None:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{meta.size}")
        self.end_headers()
        self.server.counter.get_range(ident, start, end)
        faults = self.server.faults
        cut = faults.take(self.op, ident, ("reset", "truncate"))
        throttle = faults.take(self.op, ident, ("throttle",))
        limit = end - start if cut is None else min(cut.after_bytes, end - start)
        sent = 0
        began = time.monotonic()
        with open(path, "rb") as f:
            f.seek(start)
            while sent < limit:
                chunk = f.read(min(_CHUNK, limit - sent))
                if not chunk:
                    break
                if throttle is not None:
                    due = began + (sent + len(chunk)) / throttle.rate
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                # counted before it is written: a client holding the last byte must find it in
                # the statistics (counting after the write raced a test reading them right away)
                self.server.counter.body(len(chunk), ident)
                try:
                    self.wfile.write(chunk)
                except BaseException:
                    self.server.counter.body(-len(chunk), ident)
                    raise
                sent += len(chunk)
        if cut is not None:
            if cut.kind == "reset":
                self._reset()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            raise _Abort()

    def _op_PutObject(self) -> None:
        self._no_overwrite()
        meta = self.server.store.put(
            self.bucket,
            self.key,
            self._body_chunks(),
            self.hdrs.get("content-type"),
            self._user_meta(),
            self.hdrs.get("content-md5"),
        )
        self._send(200, headers=self._write_headers(meta))

    def _write_headers(self, meta: ObjectMeta) -> dict[str, str]:
        h = {"ETag": f'"{meta.etag}"'}
        if meta.crc is not None:
            h["x-oss-hash-crc64ecma"] = str(meta.crc)
        return h

    def _op_CopyObject(self) -> None:
        self._drain()
        source = unquote(self.hdrs["x-oss-copy-source"]).split("?", 1)[0]
        src_bucket, _, src_key = source.lstrip("/").partition("/")
        self._no_overwrite()
        meta = self.server.store.copy(
            src_bucket,
            src_key,
            self.bucket,
            self.key,
            self.hdrs.get("x-oss-metadata-directive"),
            self.hdrs.get("content-type"),
            self._user_meta(),
        )
        self._send(200, xml.copy_result(meta), self._write_headers(meta))

    def _op_AppendObject(self) -> None:
        raw = self.params.get("position", "")
        if not raw.isdigit():
            raise StoreError(400, "InvalidArgument", f"append position must be an integer >= 0, got {raw!r}")
        meta = self.server.store.append(
            self.bucket, self.key, int(raw), self._body_chunks(), self.hdrs.get("content-type")
        )
        h = self._write_headers(meta)
        h["x-oss-next-append-position"] = str(meta.size)
        self._send(200, headers=h)

    def _op_DeleteObject(self) -> None:
        self._drain()
        self.server.store.delete(self.bucket, self.key)
        self._send(204)

    def _op_InitiateMultipartUpload(self) -> None:
        self._drain()
        upload_id = self.server.store.init_upload(
            self.bucket, self.key, self.hdrs.get("content-type"), self._user_meta()
        )
        self._send(200, xml.init_multipart(self.bucket, self.key, upload_id))

    def _op_UploadPart(self) -> None:
        if "x-oss-copy-source" in self.hdrs:
            raise StoreError(501, "NotImplemented", "the local OSS server does not implement UploadPartCopy")
        raw = self.params.get("partNumber", "")
        if not raw.isdigit():
            raise StoreError(400, "InvalidArgument", f"partNumber must be an integer, got {raw!r}")
        etag, crc = self.server.store.upload_part(
            self.bucket, self.key, self.params["uploadId"], int(raw), self._body_chunks()
        )
        h = {"ETag": f'"{etag}"'}
        if crc is not None:
            h["x-oss-hash-crc64ecma"] = str(crc)
        self._send(200, headers=h)

    def _op_CompleteMultipartUpload(self) -> None:
        parts = xml.parse_complete(self._body())
        self._no_overwrite()
        meta = self.server.store.complete_upload(self.bucket, self.key, self.params["uploadId"], parts)
        location = f"http://{self._host()}/{self.bucket}/{self.key}"
        self._send(
            200, xml.complete_multipart(self.bucket, self.key, meta.etag, location), self._write_headers(meta)
        )

    def _op_AbortMultipartUpload(self) -> None:
        self._drain()
        self.server.store.abort_upload(self.bucket, self.key, self.params["uploadId"])
        self._send(204)

    def _op_ListParts(self) -> None:
        parts = self.server.store.list_parts(self.bucket, self.key, self.params["uploadId"])
        marker = self.params.get("part-number-marker", "") or "0"
        max_parts = self.params.get("max-parts", "1000") or "1000"
        if not marker.isdigit() or not max_parts.isdigit():
            raise StoreError(400, "InvalidArgument", "part-number-marker and max-parts must be integers")
        self._send(
            200,
            xml.list_parts(
                self.bucket, self.key, self.params["uploadId"], parts, int(marker), int(max_parts)
            ),
        )
