"""kubeai_train.tf between-graph trainer vs a hand-written between-graph loop, side by side.

One run launches, one after another on the same machine, local TF clusters (2 PS, a chief and
W workers) through ``python -m kubeai_train.launch``:

* ``trainer``: ``kubeai_train.tf.run(DeepFM, TrainConfig)`` (positions stored per step, logging,
  readiness protocol, final checkpoint, export);
* ``handwritten``: the same DeepFM, data and cluster, written by hand the usual way:
  ``replica_device_setter`` (round-robin), ``kubeai_train.data.read(...).to_tf()``, a bare
  ``session.run(train_op)`` loop, no checkpoints, no position tracking;

alternating A/B ``--repeats`` times, with 1 and 2 workers, and reports training examples/s
(sum of examples over the trainers / the longest trainer's loop time), the trainer/hand-written
ratio, and cluster start-up time (launch to the last trainer ready to train). Rates are steady
state: the first step of every trainer (which also opens its reader) is left out of both.

    python benchmarks/bench_tf_ps.py [--rows 300000] [--repeats 2] [--batch-size 512]

The same file is the job script: with TF_CONFIG set it runs one process of a job.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- job side
def _model():
    from kubeai_train import tf as ktf

    return ktf.DeepFM(features=ktf.CtrFeatures(hash_buckets=10000), embedding_dim=8, learning_rate=0.2)


def _job_trainer(args: argparse.Namespace, out: Path) -> None:
    from kubeai_train import tf as ktf

    cfg = ktf.TrainConfig(
        model_dir=str(out / "model"),
        train_data=args.train_data,
        batch_size=args.batch_size,
        num_epochs=1,
        shuffle=True,
        log_steps=100,
        save_checkpoint_steps=500,
    )
    res = ktf.run(_model(), cfg)
    if res.role != "ps":
        _write(
            out,
            res.role,
            res.rank,
            res.examples - res.first_step_examples,
            res.train_seconds - res.first_step_seconds,
            res.ready_at,
        )


def _job_handwritten(args: argparse.Namespace, out: Path) -> None:
    import tensorflow as tf

    from kubeai_train import cluster, data

    info = cluster.current()
    spec = tf.train.ClusterSpec(info.cluster_spec())
    server = tf.distribute.Server(spec, job_name=info.role, task_index=info.index, start=True)
    if info.role == "ps":
        server.join()  # the launcher stops the PS once the chief has succeeded
        return
    model = _model()
    kinds = dict(model.raw_features())
    cols = [*kinds, "label"]
    fill = {c: math.nan for c, k in kinds.items() if k == "float32"}
    num_ps = len(info.cluster["ps"])
    g = tf.Graph()
    with g.as_default():
        setter = tf.compat.v1.train.replica_device_setter(
            cluster=spec, worker_device=f"/job:{info.role}/task:{info.index}"
        )
        with tf.compat.v1.device(setter):
            ds = data.read(
                args.train_data,
                columns=cols,
                batch_size=args.batch_size,
                shuffle=True,
                seed=0,
                num_epochs=1,
                rank=info.rank,
                world_size=info.world_size,
                fill_null=fill,
            ).to_tf()
            it = tf.compat.v1.data.make_initializable_iterator(ds)
            feats = it.get_next()
            logits = model.logits(feats, num_ps=num_ps, training=True)
            labels = tf.cast(feats["label"], tf.float32)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
            gs = tf.compat.v1.train.get_or_create_global_step()
            train_op = model.optimizer().minimize(loss, global_step=gs)
            rows = tf.shape(labels)[0]
            init = tf.compat.v1.global_variables_initializer()
            uninit = tf.compat.v1.report_uninitialized_variables()
    cfg = tf.compat.v1.ConfigProto(device_filters=["/job:ps", f"/job:{info.role}/task:{info.index}"])
    sess = tf.compat.v1.Session(server.target, graph=g, config=cfg)
    if info.is_chief:
        sess.run(init)
    else:
        while len(sess.run(uninit)):
            time.sleep(0.1)
    ready_at = time.time()
    sess.run(it.initializer)
    examples = 0
    sess.run([train_op, loss, rows])  # the first step (opens the reader) is not timed, as in the trainer
    t0 = time.perf_counter()
    while True:
        try:
            _, _, n = sess.run([train_op, loss, rows])
        except tf.errors.OutOfRangeError:
            break
        examples += int(n)
    _write(out, info.role, info.rank, examples, time.perf_counter() - t0, ready_at)
    if info.is_chief:  # keep the PS up until every worker has finished
        deadline = time.monotonic() + 600
        while len(list(out.glob("result-*.json"))) < info.world_size and time.monotonic() < deadline:
            time.sleep(0.2)


def _write(out: Path, role: str, rank: int, examples: int, seconds: float, ready_at: float) -> None:
    (out / f"result-{rank}.json").write_text(
        json.dumps(
            {"role": role, "rank": rank, "examples": examples, "seconds": seconds, "ready_at": ready_at}
        )
    )


def job_main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("trainer", "handwritten"), required=True)
    p.add_argument("--train-data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=512)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (_job_trainer if args.mode == "trainer" else _job_handwritten)(args, out)
    return 0


# ------------------------------------------------------------------------------------------- driver
def launch(mode: str, workers: int, train: str, work: Path, batch_size: int) -> dict[str, float]:
    out = work / f"{mode}-w{workers}-{time.time_ns()}"
    cmd = [
        sys.executable,
        "-m",
        "kubeai_train.launch",
        "--framework",
        "tf",
        "--ps",
        "2",
        "--workers",
        str(workers),
        "--env",
        "TF_CPP_MIN_LOG_LEVEL=2",
        "--timeout",
        "900",
        __file__,
        "--mode",
        mode,
        "--train-data",
        train,
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
    ]
    t0 = time.time()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=960,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} with {workers} workers failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = [json.loads(f.read_text()) for f in sorted(out.glob("result-*.json"))]
    examples = sum(r["examples"] for r in results)
    seconds = max(r["seconds"] for r in results)
    return {
        "examples_per_s": examples / seconds,
        "examples": examples,
        "train_s": seconds,
        "startup_s": max(r["ready_at"] for r in results) - t0,
        "wall_s": wall,
    }


def driver_main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", default="1,2")
    args = p.parse_args()
    from kubeai_train.testing import ctr

    work = Path(tempfile.mkdtemp(prefix="bench_tf_ps-"))
    ctr.generate(args.rows, work / "data", seed=0, files=8)
    train = str(work / "data")
    rows: list[tuple[str, int, dict[str, float]]] = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for _ in range(args.repeats):
            for mode in ("trainer", "handwritten"):
                r = launch(mode, workers, train, work, args.batch_size)
                rows.append((mode, workers, r))
                print(
                    f"  {mode:11s} workers={workers} {r['examples_per_s']:9.0f} ex/s  start-up {r['startup_s']:5.1f} s"
                    f"  wall {r['wall_s']:5.1f} s",
                    flush=True,
                )
    print(
        f"\nrows={args.rows} batch={args.batch_size} ps=2 chief=1, machine cores={os.cpu_count()}, "
        f"load average at end {os.getloadavg()[0]:.1f}"
    )
    print(
        "| workers | trainer ex/s | hand-written ex/s | trainer / hand-written | start-up trainer s | start-up hand-written s |"
    )
    print("|---|---|---|---|---|---|")
    for workers in sorted({w for _, w, _ in rows}):
        t = [r for m, w, r in rows if m == "trainer" and w == workers]
        h = [r for m, w, r in rows if m == "handwritten" and w == workers]
        te = statistics.median(r["examples_per_s"] for r in t)
        he = statistics.median(r["examples_per_s"] for r in h)
        ts = statistics.median(r["startup_s"] for r in t)
        hs = statistics.median(r["startup_s"] for r in h)
        print(f"| {workers} | {te:.0f} | {he:.0f} | {te / he:.3f} | {ts:.1f} | {hs:.1f} |")
    return 0


if __name__ == "__main__":
    if os.environ.get("TF_CONFIG"):
        code = job_main()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(driver_main())
