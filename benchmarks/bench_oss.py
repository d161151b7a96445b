"""Projected Parquet read over oss:// (local OSS server): ossfs defaults vs kubeai_train's settings.

Reads 2 of 40 columns of one Parquet file served by ``kubeai_train.testing.oss_server`` (in its
own process, as in offline mode, so that client and server do not share a GIL) and
reports, side by side in one run, the response body bytes the server sent (its byte counter),
the GET requests, and the wall time (median of ``--repeats``), against the ideal: the selected
column chunks plus the footer.

    python benchmarks/bench_oss.py [--rows 250000] [--row-group 62500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ossfs
import pyarrow as pa
import pyarrow.parquet as pq

from kubeai_train import data
from kubeai_train.data.oss import OSSFileSystem
from kubeai_train.testing.oss_server import AdminClient

KEY = "bench/wide.parquet"
COLUMNS = ["c07", "c33"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=250_000)
    ap.add_argument("--row-group", type=int, default=62_500)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    table = pa.table({f"c{i:02d}": rng.random(args.rows) for i in range(40)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=args.row_group, compression="none")
    payload = buf.getvalue()
    md = pq.ParquetFile(io.BytesIO(payload)).metadata
    chunks = sum(
        md.row_group(rg).column(md.schema.names.index(c)).total_compressed_size
        for rg in range(md.num_row_groups)
        for c in COLUMNS
    )
    footer = md.serialized_size + 8
    ideal = chunks + footer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "bench", *KEY.split("/"))
        path.parent.mkdir(parents=True)
        path.write_bytes(payload)
        env = dict(os.environ, OSS_ACCESS_KEY_ID="bench-id", OSS_ACCESS_KEY_SECRET="bench-secret")
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubeai_train.testing.oss_server", "--root", tmp],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            endpoint = ""
            while not endpoint:
                line = proc.stdout.readline() if proc.stdout else ""
                if not line:
                    raise RuntimeError("the OSS server did not start")
                if line.startswith("export OSS_ENDPOINT="):
                    endpoint = line.strip().split("=", 1)[1]
            rows = _run(args, endpoint, table, payload)
        finally:
            proc.terminate()
            proc.wait(10)
    _report(args, rows, payload, md, chunks, footer, ideal)


def _run(args, endpoint: str, table: pa.Table, payload: bytes) -> list[tuple[str, int, int, float]]:
    srv = AdminClient(endpoint)
    opts = {"endpoint": endpoint, "key": "bench-id", "secret": "bench-secret"}
    stock = ossfs.OSSFileSystem(skip_instance_cache=True, **opts)
    ours = OSSFileSystem(skip_instance_cache=True, **opts)
    want = table.select(COLUMNS)

    def with_fs(fs, **read_kw) -> Callable[[], int]:
        def run() -> int:
            with fs.open(f"bench/{KEY}", "rb") as fh:
                got = pq.ParquetFile(fh, **read_kw).read(columns=COLUMNS)
            if not got.equals(want):
                raise AssertionError("wrong data")
            return got.num_rows

        return run

    def reader() -> int:
        ds = data.read(
            f"oss://bench/{KEY}",
            columns=COLUMNS,
            batch_size=65_536,
            rank=0,
            world_size=1,
            storage_options=opts,
        )
        return sum(len(b[COLUMNS[0]]) for b in ds)

    cases = [
        ("ossfs defaults (readahead, 5 MiB blocks)", with_fs(stock)),
        ("kubeai_train.data.oss (exact ranges)", with_fs(ours)),
        ("kubeai_train.data.oss + pyarrow pre_buffer", with_fs(ours, pre_buffer=True)),
        ("data.read('oss://...', columns=2)", reader),
    ]
    rows = []
    for name, fn in cases:
        fn()  # warm-up: connections, server metadata cache
        times, sent, gets = [], 0, 0
        for _ in range(args.repeats):
            srv.reset_stats()
            t0 = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t0)
            st = srv.stats()
            sent, gets = st["bytes_by_object"].get(f"bench/{KEY}", 0), st["requests"].get("GetObject", 0)
        if n != args.rows:
            raise AssertionError(f"{name}: read {n} rows, expected {args.rows}")
        rows.append((name, sent, gets, statistics.median(times)))
    return rows


def _report(args, rows, payload, md, chunks, footer, ideal) -> None:
    print(
        f"file: {len(payload) / 1e6:.1f} MB, 40 float64 columns x {args.rows} rows, "
        f"{md.num_row_groups} row groups; selected {COLUMNS}: {chunks / 1e6:.2f} MB of column chunks "
        f"+ {footer / 1e3:.1f} kB footer = {ideal / 1e6:.2f} MB ideal"
    )
    base_bytes, base_time = rows[0][1], rows[0][3]
    head = f"{'setting':<44} {'bytes sent':>12} {'x ideal':>8} {'GETs':>5} {'time s':>8} {'bytes vs default':>17} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    for name, sent, gets, t in rows:
        print(
            f"{name:<44} {sent:>12,} {sent / ideal:>8.2f} {gets:>5} {t:>8.3f} {sent / base_bytes:>17.3f} "
            f"{base_time / t:>8.1f}x"
        )


if __name__ == "__main__":
    main()
