"""The Storage API routes of the local ODPS server (``odps.apis.storage_api``): batch-read
sessions (create, poll) and their splits as Arrow IPC streams, under ``/api/storage/v1``.

:func:`route` answers one signed request with a :class:`Reply`; the HTTP handler sends it, a
data stream with the request's body faults (reset, truncate) applied.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow as pa

from kubeai_train.testing.odps_server.catalog import TableInfo
from kubeai_train.testing.odps_server.faults import Fault, apply_faults
from kubeai_train.testing.odps_server.state import (
    STORAGE_PREFIX,
    HttpError,
    ReadSession,
    lookup_partition,
    parse_spec,
)

__all__ = ["Reply", "route"]


@dataclass
class Reply:
    """One response: JSON (``faults`` None) or an Arrow stream to send with ``faults``."""

    status: int
    body: bytes
    ctype: str = "application/json"
    faults: list[Fault] | None = None


def route(odps: Any, command: str, raw: str, req_body: bytes, accept_encoding: str) -> Reply:
    """Answer ``command raw`` (the path under ``/api/storage/v1``, signature already checked).

    ``odps`` is the serving ``OdpsServer``.

    Raises:
        HttpError: an unknown route, project, table or session, a bad request, or an injected
            status fault.
    """
    parts = urlsplit(raw)
    segs = [unquote(x) for x in parts.path[len(STORAGE_PREFIX) :].strip("/").split("/") if x]
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    # projects/<p>/schemas/<s>/tables/<t>/(sessions[/<id>] | data)
    if len(segs) < 7 or segs[0] != "projects" or segs[2] != "schemas" or segs[4] != "tables":
        raise HttpError(404, "NoSuchObject", f"no such Storage API resource {parts.path}")
    project, name, rest = segs[1], segs[5], segs[6:]
    if not odps.catalog.project_exists(project):
        raise HttpError(404, "NoSuchProject", f"project {project!r} does not exist")
    table = odps.catalog.table(project, name)
    if table is None:
        raise HttpError(404, "NoSuchTable", f"table {project}.{name} does not exist")
    if rest == ["sessions"] and command == "POST":
        apply_faults(odps._take_faults("session"))
        return _create(odps, table, req_body)
    if len(rest) == 2 and rest[0] == "sessions" and command == "GET":
        apply_faults(odps._take_faults("session"))
        return _session_reply(odps, _session(odps, rest[1], table), 200)
    if rest == ["data"] and command == "GET":
        return _data(odps, table, params, accept_encoding)
    raise HttpError(404, "NoSuchObject", f"no such Storage API resource {parts.path}")


def _session(odps: Any, sid: str, table: TableInfo) -> ReadSession:
    with odps._session_lock:
        sess = odps._read_sessions.get(sid)
    if sess is None or sess.table.name != table.name:
        raise HttpError(
            404, "NoSuchSession", f"read session {sid!r} not found for {table.project}.{table.name}"
        )
    if time.time() - sess.created > odps.session_ttl:
        sess.expired = True
    return sess


def _create(odps: Any, table: TableInfo, req_body: bytes) -> Reply:
    try:
        req = json.loads(req_body or b"{}")
    except ValueError as e:
        raise HttpError(400, "InvalidArgument", f"read session request is not JSON: {e}") from None
    known = [n for n, _ in table.columns]
    columns = list(req.get("RequiredDataColumns") or known)
    bad = [c for c in columns if c not in known]
    pcols = list(req.get("RequiredPartitionColumns") or [])
    bad += [c for c in pcols if c not in table.partition_keys]
    if bad:
        raise HttpError(400, "InvalidColumnSpec", f"columns {bad} not in table {table.project}.{table.name}")
    wanted = [parse_spec(x) for x in req.get("RequiredPartitions") or []]
    specs = [lookup_partition(table, w) for w in wanted] if wanted else list(table.partitions or [()])
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
        raise HttpError(400, "InvalidArgument", f"split mode {mode!r} is not supported here")
    sess = ReadSession(uuid.uuid4().hex.upper(), table, parts, columns, pcols, split_rows, time.time())
    with odps._session_lock:
        odps._read_sessions[sess.id] = sess
    with odps.stats.lock:
        odps.stats.sessions_created += 1
    return _session_reply(odps, sess, 201)


def _session_reply(odps: Any, sess: ReadSession, status: int) -> Reply:
    ptypes = dict.fromkeys(sess.table.partition_keys, "string")
    ctypes = dict(sess.table.columns)
    total = sess.num_rows
    body = {
        "SessionId": sess.id,
        "SessionType": "batch_read",
        "SessionStatus": "EXPIRED" if sess.expired else "NORMAL",
        "ExpirationTime": int((sess.created + odps.session_ttl) * 1000),
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
    return Reply(status, json.dumps(body).encode())


def _data(odps: Any, table: TableInfo, params: dict[str, str], accept_encoding: str) -> Reply:
    sess = _session(odps, params.get("session_id", ""), table)
    if sess.expired:
        raise HttpError(
            400, "SessionExpired", f"read session {sess.id} has expired; create a new read session"
        )
    try:
        split_index = int(params.get("split_index", "0"))
        row_index = int(params.get("row_index", "0"))
        row_count = int(params.get("row_count", "0"))
        max_rows = max(1, int(params.get("max_batch_rows", "4096")))
    except ValueError:
        raise HttpError(
            400, "InvalidArgument", "split_index, row_index, row_count must be integers"
        ) from None
    total = sess.num_rows
    if sess.split_rows:
        lo = split_index * sess.split_rows
        hi = min(total, lo + sess.split_rows)
        if split_index < 0 or lo >= max(total, 1) and total:
            raise HttpError(400, "InvalidArgument", f"split_index {split_index} out of range")
    else:
        lo, hi = 0, total
    start = lo + row_index
    stop = hi if row_count <= 0 else min(hi, start + row_count)
    if start > hi:
        raise HttpError(400, "InvalidArgument", f"row_index {row_index} is beyond the split")
    faults = apply_faults(odps._take_faults("data"))
    with odps.stats.lock:
        odps.stats.data_requests += 1
    data = sess.rows(start, stop - start)
    codec = {"LZ4_FRAME": "lz4", "ZSTD": "zstd"}.get(accept_encoding.strip().upper())
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=codec)
    with pa.ipc.new_stream(sink, data.schema, options=opts) as writer:
        for batch in data.to_batches(max_chunksize=max_rows):
            writer.write_batch(batch)
    return Reply(200, sink.getvalue().to_pybytes(), "application/octet-stream", faults)
