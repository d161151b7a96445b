"""ODPS tunnel read throughput, side by side in one run (not a test).

A table of ROWS rows x 14 numeric columns (7 bigint, 7 double) is written as Parquet and served
by the local ODPS server (kubeai_train.testing.odps_server) in a separate process; bodies are
cached by the server after a warm-up, so the server sends a prepared body. Every reader reads
the same rows through the same download session:

* wire: a plain HTTP GET of the tunnel Arrow body (signed by pyodps), bytes drained, nothing
  decoded or checked: the wire limit of this setup;
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


def _time(fn, repeat: int, name: str = "") -> tuple[float, int]:
    """Median wall time of ``fn`` (and its median client CPU time, kept in _CPU[name])."""
    times, cpus, n = [], [], 0
    for _ in range(repeat):
        c = time.process_time()
        t = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    _CPU[name] = statistics.median(cpus)
    return statistics.median(times), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--record-rows", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    from kubeai_train.data.odps import OdpsSource, _FastArrowDownload

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
                dl = _FastArrowDownload(sess, 0, rows, None, None, 120.0)
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

            for s in (src,):
                fast(s)  # warm the arrow path
            with sess.open_record_reader(0, rec_rows) as r:  # warm the record body cache
                for _ in r:
                    pass

            results: list[tuple[str, float]] = []
            name = "wire: plain GET of the tunnel body"
            t_wire, _ = _time(wire, args.repeat, name)
            results.append((name, rows / t_wire))
            name = "kubeai fast reader (CRC verified) -> batches"
            t, n = _time(lambda: fast(src), args.repeat, name)
            assert n == rows
            results.append((name, rows / t))
            for par in (2, 4):
                sp = OdpsSource(url, split_rows=args.rows, parallel=par, sessions={"bench.wide": sess.id})
                fast(sp)
                name = f"kubeai fast reader, parallel={par} range readers"
                t, n = _time(lambda sp=sp: fast(sp), args.repeat, name)
                assert n == rows
                results.append((name, rows / t))
            sl = OdpsSource(url, split_rows=args.rows, compression="lz4")
            fast(sl)
            name = "kubeai fast reader, lz4 compression"
            t, n = _time(lambda: fast(sl), args.repeat, name)
            results.append((name, rows / t))
            ss = OdpsSource(url, split_rows=args.rows, reader="storage", sessions={"bench.wide": sess.id})
            fast(ss)
            name = "Storage API: pyodps ArrowReader (no CRC on wire)"
            t, n = _time(lambda: fast(ss), args.repeat, name)
            assert n == rows
            results.append((name, rows / t))
            name = "pyodps TunnelArrowReader (open_arrow_reader)"
            t, n = _time(pyodps_arrow, args.repeat, name)
            assert n == rows
            results.append((name, rows / t))
            name = f"pyodps record reader ({rec_rows} rows, scaled)"
            t, n = _time(pyodps_record, 1, name)
            assert n == rec_rows
            rec_rate = rec_rows / t
            _CPU[name] *= rows / rec_rows
            results.append((name, rec_rate))
        finally:
            proc.terminate()
            proc.join(10)

    wire_rate = results[0][1]
    wire_cpu = _CPU[results[0][0]]
    print(
        f"\nODPS tunnel read, {rows} rows x 14 numeric columns, body {body_bytes / 1e6:.0f} MB "
        f"({body_bytes / rows:.0f} B/row), median of {args.repeat}, loopback, local server in its own process\n"
        "rows/s and its ratios are wall clock; 'client CPU s' is the reader process's CPU time for all rows\n"
    )
    print(
        f"| {'reader':50} | {'rows/s':>12} | {'MB/s':>6} | {'x wire':>6} | {'x record':>8} | {'client CPU s':>12} |"
    )
    print(f"|{'-' * 52}|{'-' * 14}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 14}|")
    for name, rate in results:
        print(
            f"| {name:50} | {rate:12,.0f} | {rate * body_bytes / rows / 1e6:6.0f} | "
            f"{rate / wire_rate:6.2f} | {rate / rec_rate:8.1f} | {_CPU[name]:12.3f} |"
        )
    print(
        f"\nwire drain CPU {wire_cpu:.3f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
