"""The job of test_straggler.py: synchronous training with adaptive local batches, one replica
slowed 2x in a window of global steps.

``python _straggler_job.py DATA MODEL_DIR SLOW_FROM SLOW_UNTIL PER_ROW_S`` on a local
between-graph cluster (chief + 1 worker + 1 PS). Every replica's forward sleeps ``PER_ROW_S``
per row of its local batch (a deterministic cost proportional to the rows, not CPU
contention); worker 0's sleeps twice that while the global step is in ``[SLOW_FROM,
SLOW_UNTIL)``. Each trainer writes its RunResult to ``MODEL_DIR/result-<role>-<index>.json``.
The model has an embedding table (IndexedSlices gradients) and a dense layer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

import kubeai_train.tf as ktf
from kubeai_train import cluster
from kubeai_train.tf.types import AdaptiveBatching

ROWS, DIM, MICRO, UNITS, R, MAX_STEPS = 1000, 8, 32, 4, 4, 60


class Slowed(ktf.Model):
    def __init__(self, slowed: bool, slow_from: int, slow_until: int, per_row: float) -> None:
        self.slowed, self.slow_from, self.slow_until, self.per_row = slowed, slow_from, slow_until, per_row

    def raw_features(self) -> dict[str, str]:
        return {"c0": "float32", "x0": "float32"}

    def logits(self, features: Any, *, num_ps: int, training: bool) -> Any:
        table = tf.compat.v1.get_variable("t", [ROWS, DIM], initializer=tf.compat.v1.zeros_initializer())
        w = tf.compat.v1.get_variable("w", [DIM], initializer=tf.compat.v1.ones_initializer())
        ids = tf.cast(features["c0"], tf.int64)
        emb = tf.nn.embedding_lookup(table, ids) + tf.expand_dims(features["x0"], 1)
        out = tf.reduce_sum(emb * w, axis=1)
        if not training:
            return out
        step = tf.compat.v1.train.get_or_create_global_step()

        def sleep(rows: np.ndarray, gstep: np.ndarray) -> np.ndarray:
            slow = self.slowed and self.slow_from <= int(gstep) < self.slow_until
            time.sleep((2 if slow else 1) * self.per_row * int(rows))
            return np.float32(0)

        done = tf.compat.v1.py_func(sleep, [tf.shape(ids)[0], step.read_value()], tf.float32, stateful=True)
        with tf.control_dependencies([done]):
            return tf.identity(out)

    def optimizer(self) -> Any:
        return tf.compat.v1.train.AdagradOptimizer(0.05)


def main() -> int:
    data, model_dir = sys.argv[1], sys.argv[2]
    slow_from, slow_until, per_row = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    info = cluster.current()
    role = "chief" if info.role == "master" else info.role
    config = ktf.TrainConfig(
        model_dir=model_dir,
        train_data=data,
        batch_size=MICRO,
        num_epochs=5,
        shuffle=False,
        sync=True,
        max_steps=MAX_STEPS,
        straggler="adaptive",
        adaptive=AdaptiveBatching(micro_batches=UNITS, replan_every=R, slow_factor=1.5, slow_steps=2),
        log_steps=10,
        save_checkpoint_steps=10_000,
        ready_timeout=120.0,
    )
    model = Slowed(role == "worker" and info.index == 0, slow_from, slow_until, per_row)
    result = ktf.run(model, config)
    if role != "ps":
        out = Path(model_dir) / f"result-{role}-{info.index}.json"
        out.write_text(json.dumps(result.__dict__, default=str))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    import os

    os._exit(code)  # TF's gRPC server threads can keep a finished process from exiting
