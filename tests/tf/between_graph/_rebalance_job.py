"""The job of test_rebalance.py: four equal embedding tables whose lookups drift mid-run.

``python _rebalance_job.py DATA MODEL_DIR DRIFT_AT [swap|recut]`` on a local between-graph
cluster (2 PS).
Each table ``t<i>`` looks up the row ids in column ``c<i>`` (uniform over ``ROWS``), so the
balanced plan puts two tables on each PS and the traffic is even. From global step
``DRIFT_AT`` on, the two tables the plan put on the first PS look up row 0 only: their PS moves
about half the bytes of the other (each routed id is gathered and its gradient sent, but one row
instead of ~240 distinct ones), which only moving a table off the busy PS fixes. The pair is
chosen once per process from the devices the first graph gave the tables, so the drift stays
on those two tables after they are moved.

``recut``: from ``DRIFT_AT`` every table but the first looks up only 8 rows spread evenly over
it (ids mod 8 x ROWS / 8), so the first table's PS
moves about twice the mean and no move of whole tables can fix it; the policy (``cuts="even"``)
re-cuts the hot table (and a cold one, for memory) into two even shards, one per PS.
"""

from __future__ import annotations

import sys
from typing import Any

import tensorflow as tf

import kubeai_train.tf as ktf
from kubeai_train.balance import RebalancePolicy
from kubeai_train.tf.balanced import BalancedPlacement

TABLES, ROWS, DIM, BATCH = 4, 2000, 16, 256
_DRIFTED: list[int] | None = None  # the pair, fixed by this process's first graph


class DriftingTables(ktf.Model):
    def __init__(self, drift_at: int, mode: str) -> None:
        self.drift_at, self.mode = drift_at, mode

    def raw_features(self) -> dict[str, str]:
        return {f"c{i}": "float32" for i in range(TABLES)}

    def logits(self, features: Any, *, num_ps: int, training: bool) -> Any:
        global _DRIFTED
        tables = [
            tf.compat.v1.get_variable(f"t{i}", [ROWS, DIM], initializer=tf.compat.v1.zeros_initializer())
            for i in range(TABLES)
        ]
        devices = [getattr(t, "device", None) for t in tables]  # a partitioned table has none
        if self.mode == "recut":
            _DRIFTED = list(range(1, TABLES))
        elif _DRIFTED is None and all(devices):
            ps = [tf.DeviceSpec.from_string(d).task for d in devices if d]
            _DRIFTED = [i for i in range(TABLES) if ps[i] == ps[0]]
        drifted = set(_DRIFTED or ())
        step = tf.compat.v1.train.get_or_create_global_step()
        late = step >= self.drift_at
        out = tf.compat.v1.get_variable("bias", [], initializer=tf.compat.v1.zeros_initializer())
        for i, t in enumerate(tables):
            ids = tf.cast(features[f"c{i}"], tf.int64)
            if i in drifted and self.mode == "recut":
                # 8 rows spread over the table: each half of a re-cut still sees half of them
                ids = tf.where(late, (ids % 8) * (ROWS // 8), ids)
            elif i in drifted:
                ids = tf.where(late, tf.zeros_like(ids), ids)
            out = out + tf.reduce_sum(tf.nn.embedding_lookup(t, ids), axis=1)
        return out

    def optimizer(self) -> Any:
        return tf.compat.v1.train.AdagradOptimizer(0.05)


def main() -> int:
    data, model_dir, drift_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "swap"
    config = ktf.TrainConfig(
        model_dir=model_dir,
        train_data=data,
        batch_size=BATCH,
        shuffle=False,
        log_steps=5,
        save_checkpoint_steps=10_000,
        audit_column="row_id",
        ready_timeout=120.0,
    )
    cuts = "even" if mode == "recut" else "none"
    policy = BalancedPlacement(rebalance=RebalancePolicy(cuts=cuts), window_steps=10)
    ktf.run(DriftingTables(drift_at, mode), config, placement=policy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
