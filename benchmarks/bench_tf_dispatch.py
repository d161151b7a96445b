"""Asynchronous between-graph training with one slow worker: static vs dynamic assignment, side by side.

One run launches, alternating ``--repeats`` times, local TF clusters (2 PS, a chief and 2 workers)
through ``python -m kubeai_train.launch``, all training ``kubeai_train.tf.run(DeepFM)`` for one
epoch of the same data, asynchronously; worker 1 sleeps ``--straggle`` seconds after every step
(a slow machine: a per-batch, so compute-proportional, slowdown). Reported per assignment: the
epoch's training time (the latest trainer's ``train_seconds``; median), its ratio to static, the
slow worker's share of the rows, and the eval AUC of the published model.

    python benchmarks/bench_tf_dispatch.py [--rows 60000] [--straggle 0.05] [--repeats 2]

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
        eval_data=args.eval_data,
        batch_size=512,
        num_epochs=1,
        log_steps=1,
        save_checkpoint_steps=10_000,
        hooks=[hook],
        reader_options={"assignment": args.assignment},
    )
    model = ktf.DeepFM(features=ktf.CtrFeatures(hash_buckets=1000), embedding_dim=8)
    res = ktf.run(model, cfg)
    if role != "ps":
        (out / f"{role}-{info.index}.json").write_text(
            json.dumps({"examples": res.examples, "train_seconds": res.train_seconds, "metrics": res.metrics})
        )
    return 0


def _launch(args: argparse.Namespace, data: Path, assignment: str, out: Path) -> dict[str, float]:
    cmd = [
        sys.executable, "-m", "kubeai_train.launch", "--framework", "tf", "--ps", "2", "--workers", "2",
        "--env", "TF_CPP_MIN_LOG_LEVEL=2", "--timeout", "600", __file__, "--job",
        "--train-data", str(data / "train"), "--eval-data", str(data / "eval"), "--out", str(out),
        "--assignment", assignment, "--straggle", str(args.straggle),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=700)
    if proc.returncode != 0:
        raise SystemExit(
            f"{assignment}: job failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    r = {p.stem: json.loads(p.read_text()) for p in out.glob("*-*.json")}
    rows = {k: v["examples"] for k, v in r.items()}
    return {
        "epoch_s": max(v["train_seconds"] for v in r.values()),
        "slow_share": rows["worker-1"] / max(1, sum(rows.values())),
        "rows": float(sum(rows.values())),
        "auc": float(r["chief-0"]["metrics"]["auc"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train-data", default=None)
    ap.add_argument("--eval-data", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--assignment", default="static")
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--straggle", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.job:
        return _job(args)

    from kubeai_train.testing import ctr

    work = Path(tempfile.mkdtemp(prefix="bench-tf-dispatch-"))
    ctr.generate_split(args.rows, args.rows // 5, work / "data", seed=5, files=4, eval_files=1)
    runs: dict[str, list[dict[str, float]]] = {"static": [], "dynamic": []}
    for k in range(args.repeats):
        for a in runs:
            runs[a].append(_launch(args, work / "data", a, work / f"{a}-{k}"))
    base = statistics.median(r["epoch_s"] for r in runs["static"])
    print(
        f"async between-graph, chief + 2 workers, 2 PS, {args.rows} rows, worker 1 +{args.straggle} s per step"
    )
    print(
        "| assignment | epoch train s | vs static | slow worker's share of rows | rows trained | eval AUC |"
    )
    print("|---|---|---|---|---|---|")
    for a, rs in runs.items():
        t = statistics.median(r["epoch_s"] for r in rs)
        share = statistics.median(r["slow_share"] for r in rs)
        auc = statistics.median(r["auc"] for r in rs)
        rows = {int(r["rows"]) for r in rs}
        print(f"| {a} | {t:.2f} | {t / base:.2f} | {share:.3f} | {sorted(rows)} | {auc:.4f} |")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # a job process: TF's gRPC server threads would block a normal exit
