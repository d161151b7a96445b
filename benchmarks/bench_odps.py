"""ODPS tunnel read throughput, side by side in one run (not a test).

A table of ROWS rows x 14 numeric columns (7 bigint, 7 double) is written as Parquet and served
by the local ODPS server (kubeai_train.testing.odps_server) in a separate process; bodies are
cached by the server after a warm-up, so the server sends a prepared body. Every reader reads
the same rows through the same download session:

* wire: the tunnel Arrow body (request signed by pyodps) drained with readinto into one reused
  buffer, nothing decoded or checked: the strictest wire limit of this setup;
* plain GET: the same request read whole through requests (Response.content);
* kubeai fast reader: OdpsSource(reader="fast") into ready Arrow record batches, every chunk
  CRC32C and the whole-stream CRC verified;
* the same with parallel range readers (parallel=2, 4) and with lz4 compression;
* the Storage API path: OdpsSource(reader="storage"), i.e. pyodps's storage_api ArrowReader over
  a batch-read session (its bodies carry no CRC, so nothing is verified there);
* pyodps's TunnelArrowReader (open_arrow_reader), unmodified;
* pyodps's record reader (open_record_reader) on a RECORD_ROWS subset, rate scaled.

    python benchmarks/bench_odps.py [--rows 1000000] [--record-rows 50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _serve(root: str, q: mp.Queue) -> None:
    from kubeai_train.testing.odps_server import OdpsServer

    srv = OdpsServer(root, project="bench", body_cache_bytes=4 << 30)
    q.put(srv.env("bench"))
    srv.serve_forever()


def _make_table(root: Path, rows: int) -> None:
    d = root / "bench" / "wide"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cols: dict[str, np.ndarray] = {}
    for i in range(7):
        cols[f"i{i}"] = rng.integers(0, 1 << 40, rows, dtype=np.int64)
        cols[f"d{i}"] = rng.random(rows)
    pq.write_table(pa.table(cols), d / "part-0.parquet", row_group_size=1 << 20)


_CPU: dict[str, float] = {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--record-rows", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    from kubeai_train.data.odps import OdpsSource
    from kubeai_train.data.odps.tunnel import FastArrowDownload

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _make_table(root, args.rows)
        ctx = mp.get_context("spawn")
        q: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=_serve, args=(str(root), q), daemon=True)
        proc.start()
        try:
            env = q.get(timeout=60)
            os.environ.update(env)
            url = "odps://bench/tables/wide"
            src = OdpsSource(url, split_rows=args.rows)
            split = src.splits()[0]
            sess = src._session(())
            rows = split.num_rows

            def wire() -> int:
                dl = FastArrowDownload(sess, 0, rows, None, None, 120.0)
                resp = dl._request()
                fp = resp.raw._fp
                buf = bytearray(4 << 20)
                n = 0
                while True:
                    k = fp.readinto(buf)
                    if not k:
                        break
                    n += k
                resp.close()
                return n

            body_bytes = wire()  # warm-up: the server encodes and caches the body

            def fast(source: OdpsSource) -> int:
                return sum(b.num_rows for b in source.read(split))

            def pyodps_arrow() -> int:
                with sess.open_arrow_reader(0, rows) as r:
                    return sum(b.num_rows for b in r)

            rec_rows = min(args.record_rows, rows)

            def pyodps_record() -> int:
                n = 0
                with sess.open_record_reader(0, rec_rows) as r:
                    for _ in r:
                        n += 1
                return n

            def plain_get() -> int:
                # the same signed request through requests, body read whole (Response.content)
                dl = FastArrowDownload(sess, 0, rows, None, None, 120.0)
                resp = dl._request()
                n = len(resp.content)
                resp.close()
                return n

            sp2 = OdpsSource(url, split_rows=args.rows, parallel=2, sessions={"bench.wide": sess.id})
            sp4 = OdpsSource(url, split_rows=args.rows, parallel=4, sessions={"bench.wide": sess.id})
            sl = OdpsSource(url, split_rows=args.rows, compression="lz4", sessions={"bench.wide": sess.id})
            ss = OdpsSource(url, split_rows=args.rows, reader="storage", sessions={"bench.wide": sess.id})
            rec_name = f"pyodps record reader ({rec_rows} rows, scaled)"
            cases: list[tuple[str, Callable[[], int], int]] = [
                ("wire: raw drain of the tunnel body (no checks)", wire, body_bytes),
                ("plain GET via requests (Response.content)", plain_get, body_bytes),
                ("kubeai fast reader (CRC verified) -> batches", lambda: fast(src), rows),
                ("kubeai fast reader, parallel=2 range readers", lambda: fast(sp2), rows),
                ("kubeai fast reader, parallel=4 range readers", lambda: fast(sp4), rows),
                ("kubeai fast reader, lz4 compression", lambda: fast(sl), rows),
                ("Storage API: pyodps ArrowReader (no CRC on wire)", lambda: fast(ss), rows),
                ("pyodps TunnelArrowReader (open_arrow_reader)", pyodps_arrow, rows),
                (rec_name, pyodps_record, rec_rows),
            ]
            for _, fn, expect in cases:  # warm up every path (and the server's body cache)
                assert fn() == expect
            walls: dict[str, list[float]] = {name: [] for name, _, _ in cases}
            cpus: dict[str, list[float]] = {name: [] for name, _, _ in cases}
            for _ in range(args.repeat):  # round robin: every reader sees the same load
                for name, fn, expect in cases:
                    c = time.process_time()
                    t = time.perf_counter()
                    assert fn() == expect
                    walls[name].append(time.perf_counter() - t)
                    cpus[name].append(time.process_time() - c)
            results: list[tuple[str, float]] = []
            for name, _, _ in cases:
                scale = rows / rec_rows if name == rec_name else 1.0
                _CPU[name] = statistics.median(cpus[name]) * scale
                results.append((name, rows / (statistics.median(walls[name]) * scale)))
            rec_rate = results[-1][1]
        finally:
            proc.terminate()
            proc.join(10)

    wire_rate = results[0][1]
    get_rate = results[1][1]
    wire_cpu = _CPU[results[0][0]]
    print(
        f"\nODPS tunnel read, {rows} rows x 14 numeric columns, body {body_bytes / 1e6:.0f} MB "
        f"({body_bytes / rows:.0f} B/row), median of {args.repeat} round-robin rounds, loopback, local server in its own process\n"
        "rows/s and its ratios are wall clock; 'client CPU s' is the reader process's CPU time for all rows\n"
    )
    print(
        f"| {'reader':50} | {'rows/s':>12} | {'MB/s':>6} | {'x wire':>6} | {'x GET':>6} | {'x record':>8} "
        f"| {'client CPU s':>12} |"
    )
    print(f"|{'-' * 52}|{'-' * 14}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 14}|")
    for name, rate in results:
        print(
            f"| {name:50} | {rate:12,.0f} | {rate * body_bytes / rows / 1e6:6.0f} | "
            f"{rate / wire_rate:6.2f} | {rate / get_rate:6.2f} | {rate / rec_rate:8.1f} | {_CPU[name]:12.3f} |"
        )
    print(
        f"\nwire drain CPU {wire_cpu:.3f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
