"""The fast wire reader: CRC combination, the three body decoders on framed bodies (every CRC
verified, truncation caught), and the fallback decoder through a real source."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kubeai_train.data.odps import OdpsSource

from ._tables import TOTAL, all_ids, rows


def test_crc_combination_matches_a_second_pass():
    import crc32c

    from kubeai_train.data.odps.wire import crc_shift_tables

    rng = np.random.default_rng(1)
    a, b = rng.bytes(1000), rng.bytes(4096)
    t0, t1, t2, t3 = crc_shift_tables(len(b))
    ca, cb = crc32c.crc32c(a), crc32c.crc32c(b)
    combined = t0[ca & 255] ^ t1[(ca >> 8) & 255] ^ t2[(ca >> 16) & 255] ^ t3[ca >> 24] ^ cb
    assert combined == crc32c.crc32c(a + b)


def _framed(n_rows: int, chunk: int, corrupt: int | None = None) -> tuple[bytes, pa.Table]:
    from kubeai_train.testing.odps_server.wire import encode_arrow_batches, frame_arrow

    t = rows(n_rows, 0)
    return frame_arrow(encode_arrow_batches(t.to_batches(max_chunksize=50)), chunk, corrupt_chunk=corrupt), t


class _SockResponse:
    """What the decoders need of an http.client response: .fp (buffered socket file), .length."""

    chunked = False

    def __init__(self, body: bytes) -> None:
        import socket
        import threading

        a, b = socket.socketpair()
        self._keep = a
        threading.Thread(target=lambda: (a.sendall(body), a.shutdown(socket.SHUT_WR)), daemon=True).start()
        b.settimeout(10)
        self.sock = b
        self.fp = b.makefile("rb")
        self.length = len(body)

    def readinto(self, buf) -> int:
        return self.fp.readinto(buf)


@pytest.mark.parametrize("path", ["scatter", "blocks", "stream"])
@pytest.mark.parametrize("chunk", [64, 1000, 4096])
def test_body_decoders_verify_every_crc(path, chunk):
    from kubeai_train.data.odps.types import ChecksumMismatch
    from kubeai_train.data.odps.wire import (
        raw_socket,
        scatter_batches,
        stream_batches,
        zero_copy_batches,
    )

    def decode(body: bytes, length: int | None = None) -> pa.Table:
        schema = rows(0, 0).schema
        if path == "stream":  # unknown length (compressed / chunked): blocks of any size
            sizes = np.random.default_rng(len(body)).integers(1, 3 * chunk, 10_000)
            cuts = np.minimum(np.cumsum(sizes), len(body))
            blocks = [body[a:b] for a, b in zip([0, *cuts[:-1]], cuts, strict=True) if b > a]
            return pa.Table.from_batches(list(stream_batches(iter(blocks), schema)), schema=schema)
        resp = _SockResponse(body)
        if path == "scatter":
            assert raw_socket(resp) is resp.sock
            batches = list(scatter_batches(resp.sock, resp, length or len(body), schema))
        else:
            batches = list(zero_copy_batches(resp, length or len(body), schema))
        return pa.Table.from_batches(batches, schema=schema)

    body, table = _framed(777, chunk)
    assert decode(body).equals(table)
    for k in (0, 3):
        with pytest.raises(ChecksumMismatch):
            decode(_framed(777, chunk, corrupt=k)[0])
    with pytest.raises(ChecksumMismatch):
        decode(body[: len(body) // 2], length=len(body))  # truncated: the connection ends early
    # a body whose data is an exact multiple of the chunk size ends with an empty final chunk
    from kubeai_train.testing.odps_server.wire import encode_arrow_batches, frame_arrow

    data = encode_arrow_batches(table.to_batches(max_chunksize=50))
    exact = frame_arrow(data + b"\0" * (-len(data) % chunk), chunk)
    assert decode(exact).equals(table)


@pytest.mark.integration
def test_fallback_reader_without_socket_access(env, monkeypatch):
    from kubeai_train.data.odps import wire

    monkeypatch.setattr(wire, "raw_socket", lambda fp: None)
    src = OdpsSource("odps://proj/tables/events", split_rows=1000, backoff=0.01)
    src.splits()
    env.inject("bad_crc", chunk=1)
    env.inject("truncate", after_bytes=4000)
    assert all_ids(src) == list(range(TOTAL))
