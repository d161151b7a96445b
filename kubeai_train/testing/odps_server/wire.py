"""Byte formats of the ODPS tunnel download, as the real pyodps 0.13.2 client decodes them.

The local ODPS server (:mod:`kubeai_train.testing.odps_server`) encodes table rows with these
functions.

Arrow download body (``GET ...?data&arrow``)::

    uint32 BE chunk_size
    repeated: chunk_size data bytes + uint32 BE CRC32C(this chunk's data)      (full chunks)
    last:     0..chunk_size-1 data bytes + uint32 BE CRC32C(all data bytes)     (always present)

The concatenated data bytes are an Arrow IPC stream *without* its schema message (the client
prepends the schema it derives from the session's ODPS schema); the reader in
:mod:`kubeai_train.data.odps` deframes and verifies it. Record download bodies are
protobuf-wire records with per-record CRC32C and a CRC-of-CRCs footer. Compression
(deflate, zstd, lz4 frame) wraps the whole body.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator

import crc32c as _crc32c
import pyarrow as pa

from kubeai_train._protowire import varint as _varint

__all__ = [
    "ARROW_EOS",
    "ENCODINGS",
    "END_RECORD_TAG",
    "compress_body",
    "crc32c",
    "encode_arrow_batches",
    "encode_records",
    "frame_arrow",
]

# End-of-stream marker of the Arrow IPC streaming format.
ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"

# Content-Encoding names pyodps asks for (CompressOption.CompressAlgorithm.get_encoding).
ENCODINGS = ("deflate", "zstd", "x-lz4-frame", "x-odps-lz4-frame", "lz4_frame")

_U32 = struct.Struct("!I")


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``crc`` (hardware accelerated: SSE4.2 / ARMv8)."""
    return _crc32c.crc32c(data, crc)


def encode_arrow_batches(batches: Iterable[pa.RecordBatch]) -> bytes:
    """Arrow IPC stream messages of ``batches`` without the schema message, ending with EOS."""
    parts = [batch.serialize().to_pybytes() for batch in batches]
    parts.append(ARROW_EOS)
    return b"".join(parts)


def frame_arrow(data: bytes, chunk_size: int = 65536, corrupt_chunk: int | None = None) -> bytes:
    """Wrap Arrow stream bytes in the tunnel's chunk + CRC32C framing.

    Args:
        data: Arrow IPC stream bytes (see :func:`encode_arrow_batches`).
        chunk_size: data bytes per full chunk.
        corrupt_chunk: if set, the CRC of that chunk (0-based; the last short chunk counts too)
            is flipped, to inject a checksum fault.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    view = memoryview(data)
    out = bytearray(_U32.pack(chunk_size))
    n_full = len(data) // chunk_size
    for i in range(n_full):
        chunk = view[i * chunk_size : (i + 1) * chunk_size]
        crc = crc32c(chunk)
        if corrupt_chunk == i:
            crc ^= 0xFFFFFFFF
        out += chunk
        out += _U32.pack(crc)
    out += view[n_full * chunk_size :]
    total = crc32c(view)
    if corrupt_chunk is not None and corrupt_chunk >= n_full:
        total ^= 0xFFFFFFFF
    out += _U32.pack(total)
    return bytes(out)


def compress_body(body: bytes, encoding: str) -> bytes:
    """Compress a whole tunnel body for the given Content-Encoding (see :data:`ENCODINGS`)."""
    if encoding == "deflate":
        return zlib.compress(body, 1)
    if encoding == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=1).compress(body)
    if encoding in ("x-lz4-frame", "x-odps-lz4-frame", "lz4_frame"):
        import lz4.frame

        return lz4.frame.compress(body)
    raise ValueError(f"unknown tunnel encoding {encoding!r}; known: {', '.join(ENCODINGS)}")


# -- record (protobuf wire) format -------------------------------------------------------------

_TUNNEL_META_COUNT = 33554430
_TUNNEL_META_CHECKSUM = 33554431
_TUNNEL_END_RECORD = 33553408
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")


def _tag(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


END_RECORD_TAG = _tag(_TUNNEL_END_RECORD, 0)


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def _signed32(crc: int) -> int:
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def encode_records(columns: list[tuple[str, str]], rows: Iterator[tuple]) -> bytes:
    """Encode rows in the tunnel's protobuf record format with its CRC32C checksums.

    Args:
        columns: (name, odps type) of each column, in order; supported types are bigint, int,
            smallint, tinyint, double, float, boolean, string, binary, datetime, date.
        rows: tuples of Python values (None for null; datetime/date as int ms / days).
    """
    encoders = []
    for idx, (name, odps_type) in enumerate(columns, start=1):
        if odps_type in ("bigint", "int", "smallint", "tinyint", "datetime", "date"):
            tag = _tag(idx, 0)

            def enc(v, tag=tag):
                v = int(v)
                return tag + _varint(_zigzag(v) & 0xFFFFFFFFFFFFFFFF), _I64.pack(v)

        elif odps_type == "double":
            tag = _tag(idx, 1)

            def enc(v, tag=tag):
                b = _F64.pack(float(v))
                return tag + b, b

        elif odps_type == "float":
            tag = _tag(idx, 5)

            def enc(v, tag=tag):
                b = _F32.pack(float(v))
                return tag + b, b

        elif odps_type == "boolean":
            tag = _tag(idx, 0)

            def enc(v, tag=tag):
                return tag + (b"\x01" if v else b"\x00"), (b"\x01" if v else b"\x00")

        elif odps_type in ("string", "binary"):
            tag = _tag(idx, 2)

            def enc(v, tag=tag):
                b = v.encode() if isinstance(v, str) else bytes(v)
                return tag + _varint(len(b)) + b, b

        else:
            raise ValueError(f"column {name!r}: type {odps_type} is not supported by the record encoder")
        encoders.append((_I32.pack(idx), enc))

    end_tag = _tag(_TUNNEL_END_RECORD, 0)
    out = bytearray()
    crccrc = 0
    count = 0
    for row in rows:
        crc_input = bytearray()
        for (idx_bytes, enc), value in zip(encoders, row, strict=True):
            if value is None:
                continue
            wire, crc_bytes = enc(value)
            out += wire
            crc_input += idx_bytes
            crc_input += crc_bytes
        crc = crc32c(bytes(crc_input))
        out += end_tag + _varint(crc)
        crccrc = crc32c(_I32.pack(_signed32(crc)), crccrc)
        count += 1
    out += _tag(_TUNNEL_META_COUNT, 0) + _varint(_zigzag(count))
    out += _tag(_TUNNEL_META_CHECKSUM, 0) + _varint(crccrc)
    return bytes(out)
