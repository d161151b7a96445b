"""The fast wire reader: a tunnel Arrow body (chunks of data, each followed by its CRC32C, and
the whole-stream CRC32C last) decoded into record batches that reference one Arrow buffer.

Three decoders, picked by what the HTTP response allows: scatter reads straight from the socket
(Content-Length body, the socket reachable), ``readinto`` into a reused buffer (Content-Length,
no socket), and a growing buffer for bodies of unknown length (compressed or chunked). All verify
every chunk's CRC with hardware CRC32C and derive the stream CRC from the chunk CRCs; any
mismatch, truncation or bad framing raises :class:`~kubeai_train.data.odps.types.ChecksumMismatch`,
which the source answers by reopening at the first row not yet yielded.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from kubeai_train.data.odps import _deps
from kubeai_train.data.odps.types import ChecksumMismatch

__all__ = [
    "body_blocks",
    "crc_shift_tables",
    "raw_socket",
    "scatter_batches",
    "stream_batches",
    "zero_copy_batches",
]

_U32 = struct.Struct("!I")
_I32 = struct.Struct("<i")
_U16 = struct.Struct("<H")
_I64 = struct.Struct("<q")
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
def crc_shift_tables(nbytes: int) -> tuple[tuple[int, ...], ...]:
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


def raw_socket(fp: Any) -> socket.socket | None:
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


def scatter_batches(sock: socket.socket, fp: Any, length: int, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
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
    t0, t1, t2, t3 = crc_shift_tables(size)
    crc = _deps.crc32c
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


def zero_copy_batches(fp: Any, length: int, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
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
    t0, t1, t2, t3 = crc_shift_tables(size)
    crc = _deps.crc32c
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


def body_blocks(resp: Any, decompressor: Any, block: int) -> Iterator[bytes]:
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


def stream_batches(blocks: Iterator[bytes], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Decode a tunnel Arrow body of unknown length (compressed or chunked transfer encoding).

    Each chunk's CRC32C is verified where it was received, the whole-stream CRC derived from the
    chunk CRCs, and the data copied once into Arrow memory that grows as needed (only the
    undecoded tail moves); record batches reference that memory.
    """
    pending = bytearray()
    size = 0
    step = 0
    tables: tuple[tuple[int, ...], ...] = ()
    crc = _deps.crc32c
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
            tables = crc_shift_tables(size)
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
