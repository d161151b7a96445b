"""Reader benchmark: kubeai_train.data against the raw pyarrow loop and the row-at-a-time paths.

On the same Parquet files (Criteo schema from ``kubeai_train.testing.ctr``: 7 files of uneven
row groups, 65536 + 65536 + ~11800 rows each for 1M rows), in one run, each path in a fresh
subprocess (so peak RSS and CPU time are its own), the paths interleaved round after round:

The two comparisons the reader is held to (its default options against the raw loop):

* numeric, columns label + I1..I13: ``raw loop`` is ``for f in files: for rb in
  pq.ParquetFile(f).iter_batches(batch_size, columns=cols): {c: rb.column(i).to_numpy(
  zero_copy_only=False)}``, pyarrow's defaults (Arrow's thread pool decodes); it does less
  than the reader: nulls come out as NaN (the reader fills 0) and batches are not exact across
  files. ``data.read`` is ``data.read(dir, columns=cols, batch_size=...)`` with its defaults
  (prefetch 4, read_ahead 2); ``data.read sync`` the same with ``prefetch=0, read_ahead=0``
  (everything in the caller's thread: what the threads add).
* hashed, columns label + I1..I13 + C1..C26 with C1..C26 hashed to ids in ``[0, 2^20)``: the
  same raw loop, each C column through ``kubeai_train.data.convert.hash_ids(column, 2^20)``,
  the vectorised FNV-1a primitive the reader hashes with, on the same plain string arrays
  (the reader's source gets them from the same ``iter_batches``); ``data.read`` with
  ``hash_buckets={C1..C26: 2^20}``.

For reference (all 40 columns, strings as numpy object arrays):

* ``raw pyarrow``: the raw loop above on all columns; ``data.read``: this reader into the same
  numpy batches; ``data.read shuffle``: with ``shuffle=True`` (split order + 8-batch window shuffle);
* ``torch map-style``: ``DataLoader(batch_size)`` over a map-style dataset of in-memory rows;
* ``tf.data rows``: ``tf.data.Dataset.from_generator`` yielding rows, then ``.batch``.

Each child reads the data ``--passes`` times (the reader: ``num_epochs``), opening included.
The row-at-a-time paths read ``--slow-rows`` rows once (their rate does not depend on the
total). The machine may be shared, so the ``vs raw`` figures are the median over rounds of the
ratio to the raw loop measured in the same round (with the range), never absolute times;
``per CPU-s`` compares rows per CPU-second of the process (all its threads), which load on the
machine disturbs less. Also printed: the best rows/s, peak RSS, RSS growth over the process's
RSS after imports, and for this reader the bound ``prefetch x batch bytes`` the growth is
measured against.

    python benchmarks/bench_reader.py --rows 1000000 --repeat 9
    python benchmarks/bench_reader.py --paths raw_num,reader_num,raw_hash,reader_hash --repeat 15
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

PATHS = (
    "raw_num",
    "reader_num",
    "reader_num_sync",
    "raw_hash",
    "reader_hash",
    "raw",
    "reader",
    "reader_shuffle",
    "torch_map",
    "tf_rows",
)
READER_PATHS = ("reader_num", "reader_num_sync", "reader_hash", "reader", "reader_shuffle")
BASELINE = "@baseline"
LABELS = {
    "raw_num": "numeric: raw loop iter_batches+to_numpy",
    "reader_num": "numeric: data.read",
    "reader_num_sync": "numeric: data.read sync (no threads)",
    "raw_hash": "hashed: raw loop + hash_ids C1..C26",
    "reader_hash": "hashed: data.read hash_buckets C1..C26",
    "raw": "raw pyarrow iter_batches+to_numpy",
    "reader": "data.read (prefetch 4)",
    "reader_shuffle": "data.read shuffle=True",
    "torch_map": "torch DataLoader, map-style rows",
    "tf_rows": "tf.data from_generator rows",
}
# the raw loop each path is compared with
RAW_OF = {
    "raw_num": "raw_num",
    "raw_hash": "raw_hash",
    "reader_num": "raw_num",
    "reader_num_sync": "raw_num",
    "reader_hash": "raw_hash",
}
BUCKETS = 1 << 20


def columns(path: str = "") -> list[str]:
    numeric = ["label"] + [f"I{i}" for i in range(1, 14)]
    return numeric if path.endswith(("_num", "_num_sync")) else numeric + [f"C{i}" for i in range(1, 27)]


def raw_of(path: str) -> str:
    return RAW_OF.get(path.split("@")[0], "raw")


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return ru.ru_utime + ru.ru_stime


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


def child(path: str, data_dir: str, batch_size: int, rows_limit: int, passes: int) -> dict:
    import numpy as np  # noqa: F401
    import pyarrow.parquet as pq

    from kubeai_train.data.convert import hash_ids

    cols = columns(path)
    files = sorted(str(p) for p in Path(data_dir).glob("*.parquet"))
    out: dict = {"path": path}
    cpu0 = cpu_seconds()
    if path == "torch_map":
        import torch.utils.data as tud

        base = rss()
        cpu0 = cpu_seconds()
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
        cpu0 = cpu_seconds()
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
    elif path.startswith("raw"):
        hashed = path == "raw_hash"
        base = rss()
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        n = 0
        for _ in range(passes):
            for f in files:
                pf = pq.ParquetFile(f)
                for rb in pf.iter_batches(batch_size=batch_size, columns=cols):
                    batch = {
                        c: hash_ids(rb.column(i), BUCKETS)
                        if hashed and c.startswith("C")
                        else rb.column(i).to_numpy(zero_copy_only=False)
                        for i, c in enumerate(cols)
                    }
                    n += len(batch["label"])
    else:
        from kubeai_train import data

        kw: dict = {
            "columns": cols,
            "batch_size": batch_size,
            "rank": 0,
            "world_size": 1,
            "num_epochs": passes,
        }
        if path == "reader_hash":
            kw["hash_buckets"] = {c: BUCKETS for c in cols if c.startswith("C")}
        if path == "reader_shuffle":
            kw["shuffle"] = True
        if path == "reader_num_sync":
            kw["prefetch"] = 0
            if "read_ahead" in data.ReadOptions.__dataclass_fields__:  # not in a --baseline from before it
                kw["read_ahead"] = 0
        base = rss()
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        ds = data.read(data_dir, **kw)
        n = 0
        for i, batch in enumerate(ds):
            if i == 2:
                out["batch_bytes"] = batch_bytes(batch)
            n += len(batch["label"])
        out["prefetch"] = ds.options.prefetch
    out["seconds"] = time.perf_counter() - t0
    out["cpu"] = cpu_seconds() - cpu0
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
        "--passes",
        str(1 if path in ("torch_map", "tf_rows") else args.passes),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if base_tree:  # the reader of another checkout (before / after in one run)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [base_tree, env.get("PYTHONPATH")]))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{path} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    k = len(ys) // 2
    return ys[k] if len(ys) % 2 else (ys[k - 1] + ys[k]) / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--slow-rows", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--files", type=int, default=7)
    p.add_argument("--data", default="/tmp/kubeai_bench_reader7")
    p.add_argument("--repeat", type=int, default=5, help="rounds; every path runs once per round")
    p.add_argument("--passes", type=int, default=3, help="reads of the data per measurement")
    p.add_argument("--paths", help=f"comma-separated subset of {','.join(PATHS)} (default: all)")
    p.add_argument(
        "--baseline",
        help="a directory holding another kubeai_train (e.g. `git archive OLD kubeai_train | tar -x -C DIR`): "
        "its data.read rows are added, marked (baseline)",
    )
    p.add_argument("--child")
    p.add_argument("--rows-limit", type=int)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.batch_size, args.rows_limit, args.passes)))
        return 0

    marker = Path(args.data) / f"_rows_{args.rows}_files_{args.files}"
    if not marker.exists():
        print(f"writing {args.rows} rows to {args.data} ...", flush=True)
        gen = [sys.executable, "-m", "kubeai_train.testing.ctr", "--rows", str(args.rows), "--out", args.data]
        gen += ["--files", str(args.files), "--row-group-size", "65536"]
        subprocess.run(gen, check=True, capture_output=True, timeout=1800)
        marker.write_text("")
    for f in Path(args.data).glob("*.parquet"):  # warm the page cache for every path alike
        f.read_bytes()

    paths = list(PATHS)
    if args.paths:
        wanted = args.paths.split(",")
        unknown = [w for w in wanted if w not in PATHS]
        if unknown:
            raise SystemExit(f"--paths: unknown {unknown}; choose from {','.join(PATHS)}")
        paths = [p_ for p_ in PATHS if p_ in wanted]
        paths += [raw_of(p_) for p_ in paths if raw_of(p_) not in paths]  # every ratio needs its raw loop
    if args.baseline:
        for p_ in READER_PATHS:
            if p_ in paths:
                paths.insert(paths.index(p_) + 1, p_ + BASELINE)
                LABELS[p_ + BASELINE] = LABELS[p_] + " (baseline)"
    rounds: list[dict] = []
    for k in range(args.repeat):
        order = paths[k % len(paths) :] + paths[: k % len(paths)]  # no path always first or last
        rounds.append({path: run_child(path, args) for path in order})

    def rate(r: dict) -> float:
        return r["rows"] / r["seconds"]

    def cpu_rate(r: dict) -> float:
        return r["rows"] / r["cpu"]

    mib = 1 << 20
    print(
        f"\n{args.rows} rows in {args.files} files, batch_size {args.batch_size}, {args.repeat} rounds "
        f"of {args.passes} passes, paths interleaved; row-at-a-time paths on {args.slow_rows} rows\n"
    )
    hdr = (
        f"| {'path':<52} | {'best rows/s':>11} | {'vs raw, median (range)':>22} | {'per CPU-s vs raw':>16} | "
        f"{'peak RSS MiB':>12} | {'RSS growth MiB':>14} |"
    )
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    summary: dict[str, tuple[float, float, float, float]] = {}
    for path in paths:
        rs = [r[path] for r in rounds]
        raw = raw_of(path)
        ratios = [rate(r[path]) / rate(r[raw]) for r in rounds]
        cpu = median([cpu_rate(r[path]) for r in rounds]) / median([cpu_rate(r[raw]) for r in rounds])
        summary[path] = (median(ratios), min(ratios), max(ratios), cpu)
        best = max(rs, key=rate)
        growth = (best["rss_peak"] - best["rss_base"]) / mib
        span = f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        print(
            f"| {LABELS[path]:<52} | {rate(best):>11,.0f} | {span:>22} | {cpu:>15.2f}x | "
            f"{best['rss_peak'] / mib:>12.0f} | {growth:>14.0f} |"
        )
    print()
    for path, what in (
        ("reader_num", "numeric (label, I1..I13)"),
        ("reader_hash", "hashed (+ C1..C26 hashed)"),
    ):
        if path in summary:
            m, lo, hi, cpu = summary[path]
            print(
                f"{what}: data.read vs the raw loop {m:.2f}x (median of {args.repeat} rounds, range "
                f"{lo:.2f}-{hi:.2f}), per CPU-second {cpu:.2f}x"
            )
    if "reader" in paths and "torch_map" in paths and "tf_rows" in paths:
        best_of = {
            p_: max((r[p_] for r in rounds), key=rate) for p_ in ("reader", "raw", "torch_map", "tf_rows")
        }
        rd = best_of["reader"]
        slow = max(rate(best_of[p_]) for p_ in ("torch_map", "tf_rows"))
        print(
            f"this reader vs the faster row-at-a-time path: {rate(rd) / slow:.1f}x; "
            f"one batch ~{rd['batch_bytes'] / mib:.1f} MiB, prefetch {rd['prefetch']} -> "
            f"prefetch x batch = {rd['prefetch'] * rd['batch_bytes'] / mib:.0f} MiB; reader RSS growth "
            f"{(rd['rss_peak'] - rd['rss_base']) / mib:.0f} MiB vs raw pyarrow's "
            f"{(best_of['raw']['rss_peak'] - best_of['raw']['rss_base']) / mib:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
