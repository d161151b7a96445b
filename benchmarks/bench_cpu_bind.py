"""Local 2-worker torch DDP throughput with and without ``--cpu-bind cores``, side by side.

The torch example (``examples/torch_ddp_ctr.py``: DLRM on synthetic Criteo-schema data, gloo)
under ``python -m kubeai_train.launch --framework torch --workers 2``, three ways:

* ``none``: today's default, every process on every core, torch sizing its pool from the host;
* ``none + OMP_NUM_THREADS=1``: the README's hand-tuned advice;
* ``cores``: ``--cpu-bind cores``, a disjoint share of the cores per process and thread
  variables to match.

Runs are interleaved (A B C A B C ...) so that load drifts on the machine hit every contender
alike. Reported per contender: the median training throughput (``examples_per_s`` of the
result rank 0 writes: the rows of all ranks over the wall time of ``Trainer.fit``), its ratio to
``none`` (of the medians, and the median of the per-repetition ratios), and the median job wall
time and CPU time (launcher and processes, start-up included: oversubscribed OpenMP threads
spin). On a machine other work also loads, pinned processes cannot move off a busy core: read
the figures with the load in mind.

    python benchmarks/bench_cpu_bind.py [--rows 200000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")

CONTENDERS: dict[str, list[str]] = {
    "none": [],
    "none + OMP_NUM_THREADS=1": ["--env", "OMP_NUM_THREADS=1"],
    "cores": ["--cpu-bind", "cores"],
}


def run_once(flags: list[str], data: Path, out: Path, batch_size: int) -> tuple[float, float, float]:
    result = out / "result.json"
    cmd = [
        sys.executable, "-m", "kubeai_train.launch", "--framework", "torch", "--workers", "2",
        "--log-dir", str(out / "logs"), *flags,
        "examples/torch_ddp_ctr.py", "--train-data", str(data / "train"), "--eval-data", str(data / "eval"),
        "--model-repo", str(out / "models"), "--model-dir", str(out / "model"),
        "--batch-size", str(batch_size), "--checkpoint-steps", "100000", "--result-json", str(result),
    ]  # fmt: skip
    # the launcher's own environment would win over the binding: measure without any
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(flags) or 'none'} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return float(json.loads(result.read_text())["examples_per_s"]), wall, cpu


def _children_cpu() -> float:
    # user + system seconds of every reaped descendant: the launcher and the job's processes
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="training rows")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-cpu-bind-") as tmp:
        data = Path(tmp) / "ctr"
        subprocess.run(
            [sys.executable, "-m", "kubeai_train.testing.ctr", "--rows", str(args.rows)]
            + ["--eval-rows", str(max(1000, args.rows // 10)), "--out", str(data)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        speed: dict[str, list[float]] = {k: [] for k in CONTENDERS}
        walls: dict[str, list[float]] = {k: [] for k in CONTENDERS}
        cpu_s: dict[str, list[float]] = {k: [] for k in CONTENDERS}
        n = 0
        for _ in range(args.reps):
            for name, flags in CONTENDERS.items():
                n += 1
                out = Path(tmp) / f"run{n}"
                out.mkdir()
                eps, wall, cpu = run_once(flags, data, out, args.batch_size)
                speed[name].append(eps)
                walls[name].append(wall)
                cpu_s[name].append(cpu)
                print(
                    f"  {name}: {eps:,.0f} examples/s, {wall:.1f}s, {cpu:.1f} cpu-s",
                    file=sys.stderr,
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in speed.items()}
    # per repetition against the "none" run next to it: robust to slow drifts of the machine's load
    pair = {
        k: statistics.median(a / b for a, b in zip(v, speed["none"], strict=True)) for k, v in speed.items()
    }
    print(
        f"torch DDP CTR example, 2 processes (--workers 2) on {len(cores)} cores, {args.rows} rows, "
        f"batch {args.batch_size}, {args.reps} interleaved repetitions; medians\n"
    )
    print(
        "| launch | examples/s (all ranks) | ratio to none | median per-repetition ratio "
        "| job wall time (s) | job CPU time (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for k in CONTENDERS:
        print(
            f"| {k} | {med[k]:,.0f} | {med[k] / med['none']:.2f} | {pair[k]:.2f} "
            f"| {statistics.median(walls[k]):.1f} | {statistics.median(cpu_s[k]):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
