"""DeepFM CTR model trained with TensorFlow parameter servers (between-graph), end to end.

Every process of the job runs this same script; ``kubeai_train.tf.run`` does the role's part
(PS serve; chief and workers read their own share of the data and train; the chief exports a
SavedModel taking raw Criteo features and publishes it with its eval AUC / log loss).

    python -m kubeai_train.testing.ctr --rows 200000 --eval-rows 50000 --out /tmp/ctr
    python -m kubeai_train.launch --framework tf --ps 2 --workers 2 --restart-policy ExitCode \\
        examples/tf_ps_ctr.py --train-data /tmp/ctr/train --eval-data /tmp/ctr/eval \\
        --model-repo /tmp/models --model-dir /tmp/ctr_model

Without a launcher (no TF_CONFIG) it trains in one process: the single-process baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from kubeai_train import tf as ktf
from kubeai_train.tf import cli


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_common_args(p)
    p.add_argument("--sync", action="store_true", help="synchronous updates (needs --max-steps)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a worker waits for the chief")
    p.add_argument("--audit-column", default=None, help="record this int64 column of every applied batch")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, hooks: Sequence[Callable[[ktf.StepInfo], None]] = ()) -> int:
    """Run this process's role; ``hooks`` see a StepInfo every ``--log-steps`` steps."""
    args = parse(argv)
    model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), f"tf_ps_ctr-{args.model_name}")
    model = ktf.DeepFM(
        features=ktf.CtrFeatures(hash_buckets=args.hash_buckets),
        embedding_dim=args.embedding_dim,
        learning_rate=args.learning_rate,
    )
    config = ktf.TrainConfig(
        model_dir=model_dir,
        train_data=args.train_data,
        eval_data=args.eval_data,
        batch_size=args.batch_size,
        num_epochs=args.epochs,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        save_checkpoint_steps=args.checkpoint_steps,
        log_steps=args.log_steps,
        sync=args.sync,
        max_steps=args.max_steps,
        model_repo=args.model_repo,
        model_name=args.model_name,
        params={"example": "tf_ps_ctr"},
        hooks=hooks,
        audit_column=args.audit_column,
        ready_timeout=args.ready_timeout,
    )
    policy = cli.placement_from_args(args)
    result = ktf.run(model, config, placement=policy)
    if result.version is not None:
        print(
            json.dumps(
                {
                    "model": args.model_name,
                    "version": result.version,
                    "uri": result.model_uri,
                    "metrics": {k: result.metrics[k] for k in ("auc", "logloss")},
                }
            )
        )
    if args.result_json and result.role in ("chief", "local"):
        with open(args.result_json, "w") as f:
            json.dump({k: v for k, v in result.__dict__.items() if k != "placement"}, f, default=str)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # TF's gRPC server threads can keep a finished process from exiting
