"""Synchronous between-graph training with one straggler: backup workers vs none, side by side.

One run launches, alternating ``--repeats`` times, local TF clusters (2 PS, a chief and 2 workers)
through ``python -m kubeai_train.launch``, all training ``kubeai_train.tf.run(DeepFM, sync=True,
max_steps=N)`` on the same data; worker 1 sleeps ``--straggle`` seconds after every step (a slow
machine). With ``backup_workers=0`` every global step waits for all 3 replicas; with
``backup_workers=1`` each step aggregates the first 2. Reported: the chief's training time to
``max_steps`` (median), its ratio to the no-backup run, the straggler's share of the local steps,
and whether every process exited by itself (no launcher grace-period stop).

    python benchmarks/bench_tf_straggler.py [--max-steps 60] [--straggle 0.3] [--repeats 2]

The same file is the job script: with TF_CONFIG set it runs one process of a job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _job(args: argparse.Namespace) -> int:
    from kubeai_train import cluster
    from kubeai_train import tf as ktf

    info = cluster.current()
    role = "chief" if info.role == "master" else info.role
    out = Path(args.out)
    slow = role == "worker" and info.index == 1

    def hook(step: ktf.StepInfo) -> None:
        if slow:
            time.sleep(args.straggle)

    cfg = ktf.TrainConfig(
        model_dir=str(out / "model"),
        train_data=args.train_data,
        batch_size=256,
        num_epochs=100,
        sync=True,
        backup_workers=args.backup,
        max_steps=args.max_steps,
        log_steps=1,
        save_checkpoint_steps=10_000,
        hooks=[hook],
    )
    model = ktf.DeepFM(features=ktf.CtrFeatures(hash_buckets=1000), embedding_dim=8)
    res = ktf.run(model, cfg)
    if role != "ps":
        (out / f"{role}-{info.index}.json").write_text(
            json.dumps(
                {"steps": res.local_steps, "train_seconds": res.train_seconds, "global": res.global_step}
            )
        )
    return 0


def _launch(args: argparse.Namespace, data: Path, backup: int, out: Path) -> dict[str, object]:
    cmd = [
        sys.executable, "-m", "kubeai_train.launch", "--framework", "tf", "--ps", "2", "--workers", "2",
        "--env", "TF_CPP_MIN_LOG_LEVEL=2", "--timeout", "600", __file__, "--job",
        "--train-data", str(data), "--out", str(out), "--backup", str(backup),
        "--max-steps", str(args.max_steps), "--straggle", str(args.straggle),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=700)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"backup={backup}: job failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    r = {p.stem: json.loads(p.read_text()) for p in out.glob("*-*.json")}
    steps = {k: v["steps"] for k, v in r.items()}
    return {
        "chief_train_s": r["chief-0"]["train_seconds"],
        "straggler_share": steps["worker-1"] / max(1, sum(steps.values())),
        "self_exit": "success grace period" not in proc.stdout + proc.stderr,
        "wall_s": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train-data", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--backup", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--straggle", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.job:
        return _job(args)

    from kubeai_train.testing import ctr

    work = Path(tempfile.mkdtemp(prefix="bench-straggler-"))
    ctr.generate(20_000, work / "data", seed=5, files=2)
    runs: dict[int, list[dict[str, object]]] = {0: [], 1: []}
    for k in range(args.repeats):
        for backup in (0, 1):
            runs[backup].append(_launch(args, work / "data", backup, work / f"b{backup}-{k}"))
    base = statistics.median(float(r["chief_train_s"]) for r in runs[0])  # type: ignore[arg-type]
    print(f"sync, 3 replicas, max_steps {args.max_steps}, worker 1 +{args.straggle} s per step")
    print(
        "| backup_workers | chief train s to max_steps | vs none | straggler's share of steps | all exit by themselves |"
    )
    print("|---|---|---|---|---|")
    for backup, rs in runs.items():
        t = statistics.median(float(r["chief_train_s"]) for r in rs)  # type: ignore[arg-type]
        share = statistics.median(float(r["straggler_share"]) for r in rs)  # type: ignore[arg-type]
        print(f"| {backup} | {t:.2f} | {t / base:.2f} | {share:.2f} | {all(r['self_exit'] for r in rs)} |")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # a job process: TF's gRPC server threads would block a normal exit
