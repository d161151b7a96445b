"""Between-graph checkpoints: TF-native sharded saver vs staged (fsspec-only model_dir), side by side.

One run starts 2 PS processes (``tf.distribute.Server(...).join()``), a local OSS server process
and, in this process, a chief graph holding an embedding table of ``--rows`` x ``--dim`` float32
sharded 8 ways over the 2 PS. It then saves and restores, alternating, ``--repeats`` times:

* ``native``: ``NativeCheckpoints`` on a local directory (each PS writes its own shard; the
  sharded saver as TensorFlow ships it);
* ``staged <N> MiB``: ``StagedCheckpoints`` on ``oss://`` through the local OSS server, with
  ``checkpoint_part_bytes`` N MiB (the chief reads each part, uploads it, then the index, then
  the state file);

and reports median seconds, the ratio to native, and the chief's peak RSS growth during a
staged save (sampled every 5 ms), which is what ``checkpoint_part_bytes`` bounds.

    python benchmarks/bench_tf_checkpoint.py [--rows 2000000] [--dim 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

PS_SCRIPT = """
import sys, tensorflow as tf
spec = {"ps": sys.argv[1].split(","), "chief": [sys.argv[2]]}
tf.distribute.Server(tf.train.ClusterSpec(spec), job_name="ps", task_index=int(sys.argv[3]),
                     protocol="grpc").join()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Peak:
    """Peak RSS of this process above its level at start, sampled in a thread."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return (self.peak - self.base) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts-mib", default="16,256", help="checkpoint_part_bytes values, MiB")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import tensorflow as tf

    from kubeai_train.tf.between_graph import checkpoints as ck
    from kubeai_train.tf.model_dir import ModelDir

    work = tempfile.mkdtemp(prefix="bench-ckpt-")
    ps = [f"127.0.0.1:{_port()}" for _ in range(2)]
    chief = f"127.0.0.1:{_port()}"
    oss_port = _port()
    procs = [
        subprocess.Popen([sys.executable, "-c", PS_SCRIPT, ",".join(ps), chief, str(i)]) for i in range(2)
    ]
    oss_root = os.path.join(work, "oss")
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "kubeai_train.testing.oss_server", "--root", oss_root,
             "--port", str(oss_port), "--bucket", "bench", "--anonymous"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    )  # fmt: skip
    os.environ.update(
        OSS_ENDPOINT=f"http://127.0.0.1:{oss_port}", OSS_ACCESS_KEY_ID="bench", OSS_ACCESS_KEY_SECRET="bench"
    )
    try:
        server = tf.distribute.Server(
            tf.train.ClusterSpec({"ps": ps, "chief": [chief]}),
            job_name="chief",
            task_index=0,
            protocol="grpc",
        )
        parts_mib = [int(x) for x in args.parts_mib.split(",")]
        kinds: dict[str, object] = {"native": ck.NativeCheckpoints(ModelDir(os.path.join(work, "native")))}
        for mib in parts_mib:
            kinds[f"staged {mib} MiB"] = ck.StagedCheckpoints(
                ModelDir(f"oss://bench/staged-{mib}", staging_dir=os.path.join(work, "staging")),
                part_bytes=mib << 20,
            )
        g = tf.Graph()
        with g.as_default():
            setter = tf.compat.v1.train.replica_device_setter(ps_tasks=2, worker_device="/job:chief/task:0")
            with tf.compat.v1.device(setter):
                tf.compat.v1.get_variable(
                    "emb", [args.rows, args.dim], partitioner=tf.compat.v1.fixed_size_partitioner(8),
                    initializer=tf.compat.v1.random_uniform_initializer(),
                )  # fmt: skip
                tf.compat.v1.get_variable("w", [args.dim])
                for c in kinds.values():
                    c.build(sharded=True)  # type: ignore[attr-defined]
            init = tf.compat.v1.global_variables_initializer()
        sess = tf.compat.v1.Session(
            server.target, graph=g, config=tf.compat.v1.ConfigProto(device_filters=["/job:ps", "/job:chief"])
        )
        deadline = time.time() + 120
        while True:
            try:
                sess.run(init)
                break
            except tf.errors.UnavailableError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        table_mib = args.rows * args.dim * 4 / 2**20
        print(f"table {args.rows} x {args.dim} float32 = {table_mib:.0f} MiB in 8 shards over 2 PS")
        save_t: dict[str, list[float]] = {k: [] for k in kinds}
        restore_t: dict[str, list[float]] = {k: [] for k in kinds}
        peak: dict[str, list[float]] = {k: [] for k in kinds}
        step = 0
        for _ in range(args.repeats):
            for name, c in kinds.items():
                step += 1
                p = _Peak()
                t0 = time.perf_counter()
                c.save(sess, step)  # type: ignore[attr-defined]
                save_t[name].append(time.perf_counter() - t0)
                peak[name].append(p.stop())
                t0 = time.perf_counter()
                c.restore_latest(sess)  # type: ignore[attr-defined]
                restore_t[name].append(time.perf_counter() - t0)
        base_s = statistics.median(save_t["native"])
        base_r = statistics.median(restore_t["native"])
        print("| kind | save s | vs native | restore s | vs native | chief peak RSS growth in save MiB |")
        print("|---|---|---|---|---|---|")
        for name in kinds:
            s, r = statistics.median(save_t[name]), statistics.median(restore_t[name])
            print(
                f"| {name} | {s:.2f} | {s / base_s:.2f} | {r:.2f} | {r / base_r:.2f} | "
                f"{statistics.median(peak[name]):.0f} |"
            )
        sess.close()
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # TF's gRPC server threads would block a normal exit
