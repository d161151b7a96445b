"""DLRM-style CTR model trained with PyTorch DDP on CPU, end to end.

Every process of the job runs this script: it joins the process group the launcher (or
torchrun, or a PyTorchJob) describes, reads its own share of the training data through
``kubeai_train.data`` (strings hashed in the reader), trains with sparse embedding gradients in
lockstep over uneven shards, checkpoints every ``--checkpoint-steps`` steps (a restarted job
resumes there), evaluates exact AUC / log loss over all ranks, and on rank 0 exports a
TorchScript program and publishes it to the model repository with its metrics and lineage.

    python -m kubeai_train.testing.ctr --rows 200000 --eval-rows 50000 --out /tmp/ctr
    python -m kubeai_train.launch --framework torch --workers 2 --restart-policy ExitCode \\
        --env OMP_NUM_THREADS=1 examples/torch_ddp_ctr.py --train-data /tmp/ctr/train \\
        --eval-data /tmp/ctr/eval --model-repo /tmp/models --model-dir /tmp/torch_ctr

``--straggler adaptive`` keeps the global batch (ranks x ``--batch-size``) and gives each rank a
share of it that follows its measured speed, in steps of ``--batch-size / --micro-batches``
rows; slow ranks are logged and listed in the result's ``straggler`` entry. ``--straggler backup
--backup-workers B`` lets up to B ranks the detector flags slow sit steps out (they take no
batch; no row is lost); which ranks sat out how many steps is in the same entry. Both pay off
with ``--assignment dynamic``: with a static split a slow rank still owns its whole shard.

Without a launcher it trains in one process (a process group of one): the baseline.
``--model-dir`` holds checkpoints/ (and tensorboard/ when local); reuse it only to resume the
same job. On Kubernetes, print the PyTorchJob with ``--target k8s --image IMG --name NAME
--dry-run`` and give ``--model-dir`` a shared volume or an ``oss://`` URL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import Any

import numpy as np
import torch

from kubeai_train import cluster, data
from kubeai_train import torch as kt


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--train-data", required=True, help="training data URI (kubeai_train.data)")
    p.add_argument("--eval-data", required=True, help="eval data URI")
    p.add_argument("--model-repo", required=True, help="model repository URI to publish to")
    p.add_argument("--model-name", default="ctr")
    p.add_argument(
        "--model-dir",
        default=None,
        help="checkpoints (shared by all ranks: a shared volume or an fsspec URL such as oss://...; "
        "default: a new directory for this job, printed by rank 0)",
    )
    p.add_argument(
        "--tensorboard-dir",
        default=None,
        help="rank 0's TensorBoard summaries (a local path; default <model-dir>/tensorboard when that is local)",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024, help="rows per step per rank")
    p.add_argument("--dense-lr", type=float, default=1e-3)
    p.add_argument("--sparse-lr", type=float, default=1e-2)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--hash-buckets", type=int, default=10000, help="embedding rows per categorical column")
    p.add_argument("--checkpoint-steps", type=int, default=500)
    p.add_argument("--log-steps", type=int, default=100)
    p.add_argument(
        "--straggler",
        choices=kt.STRAGGLER_MODES,
        default="none",
        help="adaptive: local batches follow each rank's measured speed at a fixed global batch; "
        "backup: ranks flagged slow sit steps out",
    )
    p.add_argument(
        "--backup-workers",
        type=int,
        default=1,
        help="with --straggler backup: how many flagged ranks may sit a step out (< world size)",
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        default=8,
        help="with --straggler adaptive: --batch-size is cut into this many micro-batches (the share's resolution)",
    )
    p.add_argument(
        "--assignment",
        choices=("static", "dynamic"),
        default="static",
        help="dynamic: rank 0 hands out pieces of each epoch to whichever rank asks (a slow rank reads less)",
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent peer is an error")
    p.add_argument("--result-json", default=None, help="rank 0 writes the run's result here")
    p.add_argument(
        "--predictions-out",
        default=None,
        help="rank 0 saves ids, dense and the live model's predictions of the first eval rows (.npz)",
    )
    args = p.parse_args(argv)
    if args.straggler == "adaptive" and (args.micro_batches < 1 or args.batch_size % args.micro_batches):
        p.error(
            f"--batch-size {args.batch_size} must be a multiple of --micro-batches {args.micro_batches} "
            "(>= 1) with --straggler adaptive"
        )
    if args.backup_workers < 1:
        p.error(f"--backup-workers must be >= 1, got {args.backup_workers}")
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    """This rank's part of the job; returns the result (the same metrics on every rank)."""
    model_dir = args.model_dir or cluster.default_job_dir(f"torch_ddp_ctr-{args.model_name}")
    with kt.process_group(timeout_s=args.timeout) as ctx:
        torch.manual_seed(args.seed)  # DDP broadcasts rank 0's initial weights anyway
        features = kt.CTRFeatures(buckets=args.hash_buckets)
        model = kt.DLRM(features.sizes, len(features.dense), dim=args.embedding_dim)
        config = kt.TrainConfig(
            dense_lr=args.dense_lr,
            sparse_lr=args.sparse_lr,
            checkpoint_dir=model_dir.rstrip("/") + "/checkpoints",
            checkpoint_every=args.checkpoint_steps,
            log_dir=args.tensorboard_dir
            or (None if "://" in model_dir else os.path.join(model_dir, "tensorboard")),
            log_every=args.log_steps,
            num_workers=args.num_workers,
            max_steps=args.max_steps,
            straggler=args.straggler,
            adaptive=kt.AdaptiveBatching(micro_batches=args.micro_batches),
            backup_workers=args.backup_workers,
        )
        trainer = kt.Trainer(model, features, config, ctx)
        train_data = data.read(
            args.train_data,
            batch_size=args.batch_size,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            num_epochs=1,  # the trainer runs the epochs
            assignment=args.assignment,
            **features.read_options(),
        )
        fit = trainer.fit(train_data, epochs=args.epochs)
        eval_data = data.read(args.eval_data, batch_size=4096, **features.read_options())
        metrics = trainer.evaluate(eval_data)
        result: dict[str, Any] = {
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "steps": fit.steps,
            "rows": fit.rows,
            "rows_per_rank": fit.rows_per_rank,
            "train_loss": fit.loss,
            "examples_per_s": fit.examples_per_s,
            "resumed_from": fit.resumed_from,
            "metrics": {"auc": metrics["auc"], "logloss": metrics["logloss"]},
            "eval_rows": metrics["rows"],
        }
        if fit.straggler is not None:
            result["straggler"] = fit.straggler.as_dict()
        if ctx.is_chief:
            result.update(_export_and_publish(args, trainer, features, fit, metrics))
        trainer.close()
        ctx.barrier("end of job")  # nobody tears the group down while rank 0 publishes
    return result


def _export_and_publish(
    args: argparse.Namespace,
    trainer: kt.Trainer,
    features: kt.CTRFeatures,
    fit: kt.FitResult,
    metrics: dict[str, float],
) -> dict[str, Any]:
    # the first eval rows, exactly as the trainer sees them: the export check's sample
    first = next(
        iter(data.read(args.eval_data, batch_size=256, rank=0, world_size=1, **features.read_options()))
    )
    batch = features.transform(first)
    ids, dense = torch.from_numpy(batch["ids"]), torch.from_numpy(batch["dense"])
    live = trainer.predict(ids, dense)
    if args.predictions_out:
        np.savez(args.predictions_out, ids=batch["ids"], dense=batch["dense"], predictions=live.numpy())
    # a local staging directory: the repository copies it to wherever it lives
    export_dir = os.path.join(tempfile.mkdtemp(prefix="torch-ctr-export-"), "model")
    kt.export(trainer.module, features, export_dir, sample=(ids, dense))
    version = kt.publish(
        args.model_repo,
        args.model_name,
        export_dir,
        metrics={"auc": metrics["auc"], "logloss": metrics["logloss"]},
        dataset=args.train_data,
        params={
            "model": "DLRM",
            "embedding_dim": args.embedding_dim,
            "hash_buckets": args.hash_buckets,
            "batch_size": args.batch_size,
            "dense_lr": args.dense_lr,
            "sparse_lr": args.sparse_lr,
            "epochs": args.epochs,
            "seed": args.seed,
        },
        lineage={
            "example": "torch_ddp_ctr",
            "train_data": args.train_data,
            "eval_data": args.eval_data,
            "eval_rows": metrics["rows"],
            "world_size": trainer.ctx.world_size,
            "steps": fit.steps,
            "train_rows": fit.rows,
            "resumed_from_step": fit.resumed_from,
            "checkpoint_dir": trainer.config.checkpoint_dir,
            "torch_version": torch.__version__,
        },
    )
    print(
        json.dumps(
            {
                "model": args.model_name,
                "version": version.version,
                "uri": version.uri,
                "metrics": {k: metrics[k] for k in ("auc", "logloss")},
            }
        )
    )
    return {"version": version.version, "uri": version.uri, "export_dir": export_dir}


def main(argv: list[str] | None = None) -> int:
    chief = cluster.current().rank == 0
    logging.basicConfig(  # progress from rank 0 only; warnings from everyone
        level=logging.INFO if chief else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = parse(argv)
    result = kt.run(train, args)  # a dead or hung peer exits with kt.RETRYABLE_EXIT_CODE
    if args.result_json and result["rank"] == 0:
        with open(args.result_json, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
