"""Round-robin vs balanced placement on a live local coordinator-mode cluster, side by side.

One run launches, one after another on the same machine and data, local TF clusters (a chief,
2 workers and ``--ps`` parameter servers) training the same
:class:`~kubeai_train.tf.coordinator.TablesModel` (one table per Criteo column, the Kaggle
cardinalities divided by ``--scale``, so a few tables are large and most are tiny) with
``placement="round_robin"`` (TensorFlow's default, tables cut by the default ``MinSizePartitioner``)
and ``placement="balanced"``, alternating ``--repeats`` times. It reports, from the chief's
placement report, the measured per-PS max/mean of resident bytes and of per-step traffic (see
``kubeai_train.tf.coordinator.balanced`` for how they are measured), the planned ones beside
them, and the steady-state step time (the first logging window, which opens the readers, left
out), with the balanced / round-robin ratios.

    python benchmarks/bench_balance_live.py [--rows 40000] [--ps 2] [--scale 300] [--repeats 1]

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
POLICIES = ("round_robin", "balanced")
LOG_STEPS = 10


def _tables(scale: int) -> dict[str, int]:
    from kubeai_train.testing.ctr import CRITEO_KAGGLE_CARDINALITIES

    return {f"C{i + 1}": max(2, c // scale) for i, c in enumerate(CRITEO_KAGGLE_CARDINALITIES)}


# ------------------------------------------------------------------------------------------- job side
def job_main() -> int:
    from kubeai_train import tf as ktf
    from kubeai_train.tf import coordinator

    p = argparse.ArgumentParser()
    p.add_argument("--placement", choices=POLICIES, required=True)
    p.add_argument("--train-data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    windows: list[float] = []
    config = ktf.TrainConfig(
        model_dir=str(out / "model"),
        train_data=args.train_data,
        batch_size=args.batch_size,
        log_steps=LOG_STEPS,
        save_checkpoint_steps=100_000,
        hooks=[lambda step: windows.append(step.seconds)],
    )
    model = coordinator.TablesModel(_tables(args.scale), dim=8, hidden=(64,), dense=("I1",))
    res = coordinator.run(model, config, placement=args.placement)
    if res.role == "chief":
        (out / "result.json").write_text(
            json.dumps({"placement": res.placement, "windows": windows, "steps": res.local_steps})
        )
    return 0


# ------------------------------------------------------------------------------------------- driver
def _ratio(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def launch(policy: str, args: argparse.Namespace, train: str, work: Path) -> dict[str, float]:
    out = work / f"{policy}-{time.time_ns()}"
    cmd = [
        sys.executable, "-m", "kubeai_train.launch", "--framework", "tf",
        "--ps", str(args.ps), "--workers", "2", "--env", "TF_CPP_MIN_LOG_LEVEL=2", "--timeout", "900",
        __file__, "--placement", policy, "--train-data", train, "--out", str(out),
        "--scale", str(args.scale), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=960,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{policy} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads((out / "result.json").read_text())
    ps = r["placement"]["ps"]
    steady = r["windows"][1:] or r["windows"]
    return {
        "measured_bytes": _ratio([e["measured_bytes"] for e in ps]),
        "measured_traffic": _ratio([e["measured_traffic"] for e in ps]),
        "planned_bytes": _ratio([e["planned_bytes"] for e in ps]),
        "planned_traffic": _ratio([e["planned_traffic"] for e in ps]),
        "step_ms": 1000 * sum(steady) / (LOG_STEPS * len(steady)),
        "max_ps_mib": max(e["measured_bytes"] for e in ps) / 2**20,
        "max_ps_traffic_kib": max(e["measured_traffic"] for e in ps) / 2**10,
        "shards": sum(1 for _ in r["placement"]["devices"]),
    }


def driver_main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=40_000)
    p.add_argument("--ps", type=int, default=2)
    p.add_argument("--scale", type=int, default=300, help="table rows = Criteo Kaggle cardinality // scale")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    from kubeai_train.testing import ctr

    work = Path(tempfile.mkdtemp(prefix="bench_balance_live-"))
    ctr.generate(args.rows, work / "data", seed=0, files=4)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in POLICIES}
    for _ in range(args.repeats):
        for policy in POLICIES:
            r = launch(policy, args, str(work / "data"), work)
            runs[policy].append(r)
            print(f"  {policy:11s} " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
    tables = _tables(args.scale)
    print(
        f"\n{len(tables)} tables ({sum(tables.values())} rows, dim 8, Adagrad), MLP 64, batch {args.batch_size}, "
        f"{args.rows} rows, ps={args.ps} workers=2 chief=1, cores={os.cpu_count()}, "
        f"load average at end {os.getloadavg()[0]:.1f}"
    )
    keys = [
        ("measured_bytes", "measured max/mean bytes"),
        ("measured_traffic", "measured max/mean traffic"),
        ("planned_bytes", "planned max/mean bytes"),
        ("planned_traffic", "planned max/mean traffic"),
        ("max_ps_mib", "largest PS MiB"),
        ("max_ps_traffic_kib", "hottest PS KiB/step"),
        ("step_ms", "step ms (steady)"),
    ]
    print("| | round_robin | balanced | balanced / round_robin |")
    print("|---|---|---|---|")
    for k, label in keys:
        rr = statistics.median(r[k] for r in runs["round_robin"])
        bal = statistics.median(r[k] for r in runs["balanced"])
        print(f"| {label} | {rr:.3f} | {bal:.3f} | {bal / rr:.3f} |")
    return 0


if __name__ == "__main__":
    if os.environ.get("TF_CONFIG"):
        code = job_main()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(driver_main())
