"""Reader benchmark: kubeai_train.data against raw pyarrow and the row-at-a-time paths.

On the same Parquet files (Criteo schema from ``kubeai_train.testing.ctr``) and the same
columns, in one run, each path in a fresh subprocess (so peak RSS is its own):

* ``raw pyarrow``: ``ParquetFile.iter_batches(batch_size) + to_numpy`` per column, one thread;
* ``data.read``: this reader into the same numpy batches (default prefetch 4);
* ``data.read + hash``: the same with ``hash_buckets`` for C1..C26 (int64 ids, what a CTR
  trainer consumes: different output, shown for reference);
* ``data.read shuffle``: with ``shuffle=True`` (split order + 8-batch window shuffle);
* ``torch map-style``: ``DataLoader(batch_size)`` over a map-style dataset of in-memory rows;
* ``tf.data rows``: ``tf.data.Dataset.from_generator`` yielding rows, then ``.batch``.

The row-at-a-time paths read ``--slow-rows`` rows (their rate does not depend on the total).
Prints rows/s, the ratio to raw pyarrow, peak RSS, RSS growth over the process's RSS after
imports, and for this reader the bound ``prefetch x batch bytes`` the growth is measured
against.

    python benchmarks/bench_reader.py --rows 1000000 --slow-rows 100000
    # before / after: the data.read rows of another commit, in the same run
    git archive OLD kubeai_train | tar -x -C /tmp/old && python benchmarks/bench_reader.py --baseline /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("raw", "reader", "reader_hash", "reader_shuffle", "torch_map", "tf_rows")
READER_PATHS = ("reader", "reader_hash", "reader_shuffle")
BASELINE = "@baseline"
LABELS = {
    "raw": "raw pyarrow iter_batches+to_numpy",
    "reader": "data.read (prefetch 4)",
    "reader_hash": "data.read + hash C1..C26",
    "reader_shuffle": "data.read shuffle=True",
    "torch_map": "torch DataLoader, map-style rows",
    "tf_rows": "tf.data from_generator rows",
}


def columns() -> list[str]:
    return ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent
    across fork + exec, so every child would report at least the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def batch_bytes(batch: dict) -> int:
    total = 0
    for a in batch.values():
        total += a.nbytes
        if a.dtype == object:
            total += sum(sys.getsizeof(x) for x in a)
    return total


def filled(table):
    """Nulls replaced (the row paths' collate / signatures cannot take None)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = []
    for col in table.columns:
        fill = "" if pa.types.is_string(col.type) else 0
        cols.append(pc.fill_null(col, pa.scalar(fill, col.type)))
    return pa.table(cols, names=table.column_names)


def child(path: str, data_dir: str, batch_size: int, rows_limit: int) -> dict:
    import numpy as np  # noqa: F401
    import pyarrow.parquet as pq

    cols = columns()
    files = sorted(str(p) for p in Path(data_dir).glob("*.parquet"))
    out: dict = {"path": path}
    if path == "torch_map":
        import torch.utils.data as tud

        base = rss()
        t0 = time.perf_counter()
        table = filled(pq.read_table(files, columns=cols).slice(0, rows_limit))
        arrays = {c: table.column(c).to_numpy() for c in cols}

        class Rows(tud.Dataset):
            def __len__(self) -> int:
                return table.num_rows

            def __getitem__(self, i: int) -> dict:
                return {c: arrays[c][i] for c in cols}

        n = 0
        for b in tud.DataLoader(Rows(), batch_size=batch_size, num_workers=0):
            n += len(b["label"])
    elif path == "tf_rows":
        import tensorflow as tf

        base = rss()
        t0 = time.perf_counter()
        table = filled(pq.read_table(files, columns=cols).slice(0, rows_limit))
        arrays = [table.column(c).to_numpy(zero_copy_only=False) for c in cols]
        arrays = [a.astype(object) if a.dtype == object else a for a in arrays]
        sig = tuple(
            tf.TensorSpec((), tf.string if a.dtype == object else tf.as_dtype(a.dtype)) for a in arrays
        )

        def gen():
            for i in range(table.num_rows):
                yield tuple(a[i] for a in arrays)

        n = 0
        for b in tf.data.Dataset.from_generator(gen, output_signature=sig).batch(batch_size):
            n += int(b[0].shape[0])
    elif path == "raw":
        base = rss()
        t0 = time.perf_counter()
        n = 0
        for f in files:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=batch_size, columns=cols):
                batch = {c: rb.column(i).to_numpy(zero_copy_only=False) for i, c in enumerate(cols)}
                n += len(batch["label"])
    else:
        from kubeai_train import data

        kw: dict = {"columns": cols, "batch_size": batch_size, "rank": 0, "world_size": 1}
        if path == "reader_hash":
            kw["hash_buckets"] = {c: 1 << 20 for c in cols if c.startswith("C")}
        if path == "reader_shuffle":
            kw["shuffle"] = True
        ds = data.read(data_dir, **kw)
        base = rss()
        t0 = time.perf_counter()
        n = 0
        for i, batch in enumerate(ds):
            if i == 2:
                out["batch_bytes"] = batch_bytes(batch)
            n += len(batch["label"])
        out["prefetch"] = ds.options.prefetch
    out["seconds"] = time.perf_counter() - t0
    out["rows"] = n
    out["rss_base"] = base
    out["rss_peak"] = peak_rss()
    return out


def run_child(path: str, args: argparse.Namespace) -> dict:
    base_tree = None
    if path.endswith(BASELINE):
        path, base_tree = path[: -len(BASELINE)], args.baseline
    limit = args.slow_rows if path in ("torch_map", "tf_rows") else args.rows
    cmd = [
        sys.executable,
        __file__,
        "--child",
        path,
        "--data",
        args.data,
        "--batch-size",
        str(args.batch_size),
        "--rows-limit",
        str(limit),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if base_tree:  # the reader of another checkout (before / after in one run)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [base_tree, env.get("PYTHONPATH")]))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{path} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--slow-rows", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--data", default="/tmp/kubeai_bench_reader")
    p.add_argument("--repeat", type=int, default=2, help="runs per path; the best rate is reported")
    p.add_argument(
        "--baseline",
        help="a directory holding another kubeai_train (e.g. `git archive OLD kubeai_train | tar -x -C DIR`): "
        "its data.read rows are added, marked (baseline)",
    )
    p.add_argument("--child")
    p.add_argument("--rows-limit", type=int)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.batch_size, args.rows_limit)))
        return 0

    marker = Path(args.data) / f"_rows_{args.rows}"
    if not marker.exists():
        print(f"writing {args.rows} rows to {args.data} ...", flush=True)
        gen = [sys.executable, "-m", "kubeai_train.testing.ctr", "--rows", str(args.rows), "--out", args.data]
        subprocess.run(
            [*gen, "--files", "4", "--row-group-size", "65536"], check=True, capture_output=True, timeout=1800
        )
        marker.write_text("")
    for f in Path(args.data).glob("*.parquet"):  # warm the page cache for every path alike
        f.read_bytes()

    paths = list(PATHS)
    if args.baseline:
        for p_ in READER_PATHS:
            paths.insert(paths.index(p_) + 1, p_ + BASELINE)
            LABELS[p_ + BASELINE] = LABELS[p_] + " (baseline)"
    results = {}
    for _ in range(args.repeat):
        for path in paths:
            r = run_child(path, args)
            best = results.get(path)
            if best is None or r["seconds"] / r["rows"] < best["seconds"] / best["rows"]:
                results[path] = r
    raw_rate = results["raw"]["rows"] / results["raw"]["seconds"]
    mib = 1 << 20
    print(
        f"\n{args.rows} rows, {len(columns())} columns (label, I1..I13, C1..C26), batch_size {args.batch_size}, "
        f"best of {args.repeat}; row-at-a-time paths on {args.slow_rows} rows\n"
    )
    hdr = f"| {'path':<45} | {'rows':>9} | {'rows/s':>10} | {'vs raw':>6} | {'peak RSS MiB':>12} | {'RSS growth MiB':>14} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for path in paths:
        r = results[path]
        rate = r["rows"] / r["seconds"]
        growth = (r["rss_peak"] - r["rss_base"]) / mib
        print(
            f"| {LABELS[path]:<45} | {r['rows']:>9} | {rate:>10,.0f} | {rate / raw_rate:>5.2f}x | "
            f"{r['rss_peak'] / mib:>12.0f} | {growth:>14.0f} |"
        )
    rd = results["reader"]
    slow = max(results[p]["rows"] / results[p]["seconds"] for p in ("torch_map", "tf_rows"))
    print(
        f"\nthis reader vs the faster row-at-a-time path: {rd['rows'] / rd['seconds'] / slow:.1f}x; "
        f"one batch ~{rd['batch_bytes'] / mib:.1f} MiB, prefetch {rd['prefetch']} -> "
        f"prefetch x batch = {rd['prefetch'] * rd['batch_bytes'] / mib:.0f} MiB; reader RSS growth "
        f"{(rd['rss_peak'] - rd['rss_base']) / mib:.0f} MiB vs raw pyarrow's "
        f"{(results['raw']['rss_peak'] - results['raw']['rss_base']) / mib:.0f} MiB"
    )

    def rate(p_: str) -> float:
        return results[p_]["rows"] / results[p_]["seconds"]

    line = f"data.read + hash vs data.read: {rate('reader_hash') / rate('reader'):.2f}x"
    if args.baseline:
        line += f" (baseline {rate('reader_hash' + BASELINE) / rate('reader' + BASELINE):.2f}x)"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
