"""Tunnel download: one Arrow download request (``?data&arrow`` of a row range of a download
session), made and signed by pyodps's own session / RestClient, its body decoded by
:mod:`kubeai_train.data.odps.wire`."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from kubeai_train.data.odps import wire
from kubeai_train.data.odps._deps import CompressOption, odps_type_to_arrow_type
from kubeai_train.data.odps.types import ChecksumMismatch

__all__ = ["COMPRESSION", "FastArrowDownload"]

COMPRESSION = {
    None: None,
    "none": None,
    "lz4": CompressOption.CompressAlgorithm.ODPS_LZ4,
    "zstd": CompressOption.CompressAlgorithm.ODPS_ZSTD,
    "zlib": CompressOption.CompressAlgorithm.ODPS_ZLIB,
    "deflate": CompressOption.CompressAlgorithm.ODPS_ZLIB,
}


class FastArrowDownload:
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
                COMPRESSION[self.compression]
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
                sock = wire.raw_socket(fp)
                if sock is not None:
                    yield from wire.scatter_batches(sock, fp, int(length), schema)
                else:
                    yield from wire.zero_copy_batches(fp, int(length), schema)
                return
            yield from wire.stream_batches(
                wire.body_blocks(resp, self._decompressor(encoding), self.BLOCK), schema
            )
        finally:
            resp.close()
