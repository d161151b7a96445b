"""Input throughput of TF parameter-server training: workers x input path x mode, in one run.

The claim measured: in TF2 coordinator mode a Python reader on the chief feeds every worker
through the chief (so adding workers does not add input capacity), while ``tf.data`` readers of
native files on the workers, and the between-graph mode (each worker reads its own share through
``kubeai_train.data`` in its own process), scale input with the workers.

Every configuration trains the same DeepFM on the same generated CTR data (Parquet for
``kubeai_train.data``, the same rows as TFRecord for the worker readers) on a real local cluster
(chief + ``--ps`` PS + N workers, through the launcher). examples/s is measured in steady state
from the step hooks (first hook excluded: start-up), over all training processes.

    python benchmarks/bench_tf_input.py --rows 150000 --workers 1,2

Prints a markdown table and the ratios (N workers / 1 worker, and each path / coordinator-chief).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    # name: (mode, example script, extra args)
    "coordinator/chief-reader": ("coordinator", "tf_coord_ctr.py", ["--input", "chief"]),
    "coordinator/chief-reader-1thread": ("coordinator", "tf_coord_ctr.py", ["--input", "chief", "--reader-threads", "1"]),
    "coordinator/worker-tfrecord": ("coordinator", "tf_coord_ctr.py", ["--input", "workers"]),
    "between-graph/worker-reader": ("between-graph", "tf_ps_ctr.py", []),
}  # fmt: skip


def _job() -> int:
    """Job mode: run the example named by BENCH_EXAMPLE with a hook logging every StepInfo."""
    example = os.environ["BENCH_EXAMPLE"]
    out = Path(os.environ["BENCH_STEPS"])
    spec = importlib.util.spec_from_file_location("example", ROOT / "examples" / example)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]

    def hook(step) -> None:
        with open(out, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "rank": step.rank, "role": step.role,
                                "examples": step.examples, "t": time.time()}) + "\n")  # fmt: skip

    return mod.main(sys.argv[2:], hooks=[hook])


def _rate(steps_file: Path) -> float:
    """Steady-state examples/s over all reporting processes (each one's first hook dropped)."""
    by_pid: dict[int, list[dict]] = {}
    for line in steps_file.read_text().splitlines():
        rec = json.loads(line)
        by_pid.setdefault(rec["pid"], []).append(rec)
    examples, t0, t1 = 0, float("inf"), 0.0
    for recs in by_pid.values():
        if len(recs) < 2:
            continue
        examples += recs[-1]["examples"] - recs[0]["examples"]
        t0, t1 = min(t0, recs[0]["t"]), max(t1, recs[-1]["t"])
    return examples / (t1 - t0) if t1 > t0 else float("nan")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        return _job()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=150_000)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--ps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from kubeai_train.launch import run_processes
    from kubeai_train.testing import ctr
    from kubeai_train.tf import CtrFeatures
    from kubeai_train.tf.coordinator import write_native
    from kubeai_train.tf.coordinator.models import DeepFMModuleModel

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_tf_input-"))
    data = out / "data"
    if not (data / "train").exists():
        ctr.generate_split(args.rows, 2000, data, seed=5, files=8, eval_files=1)
    native = data / "train_tfrecord"
    if not native.exists():
        t0 = time.perf_counter()
        model = DeepFMModuleModel(features=CtrFeatures(hash_buckets=10000))
        write_native(str(data / "train"), str(native), {**model.raw_features(), "label": "int64"}, files=8)
        print(f"wrote TFRecord copy in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    workers = [int(w) for w in args.workers.split(",")]
    rows: list[dict] = []
    for name in args.configs.split(","):
        mode, example, extra = CONFIGS[name]
        for n in workers:
            run_dir = out / f"{name.replace('/', '_')}-w{n}"
            steps = run_dir / "steps.jsonl"
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(run_dir / "model", ignore_errors=True)  # a finished model dir would skip training
            steps.unlink(missing_ok=True)
            cli = [
                "--job",
                "--train-data", str(data / "train"), "--eval-data", str(data / "eval"),
                "--model-repo", str(run_dir / "repo"), "--model-dir", str(run_dir / "model"),
                "--batch-size", str(args.batch_size), "--log-steps", "20", "--checkpoint-steps", "100000",
                *extra,
            ]  # fmt: skip
            if "--input" in extra and "workers" in extra:
                cli += ["--native-data", str(native)]
            t0 = time.perf_counter()
            res = run_processes(
                Path(__file__),
                framework="tf",
                workers=n,
                ps=args.ps,
                args=cli,
                env={"BENCH_EXAMPLE": example, "BENCH_STEPS": str(steps), "TF_CPP_MIN_LOG_LEVEL": "2"},
                timeout=900,
                log_dir=run_dir / "logs",
                check=False,
            )
            wall = time.perf_counter() - t0
            rate = _rate(steps) if res.exit_code == 0 and steps.exists() else float("nan")
            rows.append({"config": name, "mode": mode, "workers": n, "examples_per_s": rate,
                         "job_seconds": wall, "exit": res.exit_code})  # fmt: skip
            print(f"{name} workers={n}: {rate:.0f} examples/s (job {wall:.0f} s, exit {res.exit_code})",
                  file=sys.stderr)  # fmt: skip

    base = {r["workers"]: r["examples_per_s"] for r in rows if r["config"] == "coordinator/chief-reader"}
    one = {r["config"]: r["examples_per_s"] for r in rows if r["workers"] == min(workers)}
    print(f"\nrows={args.rows} batch={args.batch_size} ps={args.ps} cpus={os.cpu_count()} "
          f"load1={os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| mode | input path | workers | examples/s | x vs 1 worker | x vs coordinator/chief-reader |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        vs1 = r["examples_per_s"] / one[r["config"]] if one.get(r["config"]) else float("nan")
        vsb = r["examples_per_s"] / base[r["workers"]] if base.get(r["workers"]) else float("nan")
        path = r["config"].split("/", 1)[1]
        print(
            f"| {r['mode']} | {path} | {r['workers']} | {r['examples_per_s']:.0f} | {vs1:.2f} | {vsb:.2f} |"
        )
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
