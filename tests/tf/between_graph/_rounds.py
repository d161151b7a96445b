"""Start-up stress: every process of one launched job runs ``--rounds`` complete jobs in a row.

Round k uses its own resource container on the long-lived PS (``TrainConfig.container``) and its
own model dir, so each round is a full start-up (chief initialises, workers poll for readiness,
training, done-marking, final checkpoint, PS stop flag, export) without paying the process and
TensorFlow import cost again. Every process appends one JSON line per round to
``<root>/rounds.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kubeai_train import cluster
from kubeai_train import tf as ktf
from tests.tf._cluster import append_jsonl, exit_now


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--train-data", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    info = cluster.current()
    root = Path(args.root)
    # a small model: the graph build is not what this measures
    features = ktf.CtrFeatures(categorical=("C1", "C2", "C3"), dense=("I1", "I2"), hash_buckets=100)
    model = ktf.DeepFM(features=features, embedding_dim=4, hidden=(8,))
    for k in range(args.rounds):
        t0 = time.perf_counter()
        cfg = ktf.TrainConfig(
            model_dir=str(root / f"round{k}"),
            train_data=args.train_data,
            batch_size=256,
            log_steps=1000,
            container=f"round{k}",
            ready_timeout=60,
            ready_poll=0.05,
        )
        res = ktf.run(model, cfg)
        append_jsonl(
            root / "rounds.jsonl",
            {
                "role": info.role,
                "index": info.index,
                "round": k,
                "steps": res.local_steps,
                "ready": res.ready_seconds,
                "seconds": time.perf_counter() - t0,
                "global_step": res.global_step,
            },
        )
    return 0


if __name__ == "__main__":
    exit_now(main())
