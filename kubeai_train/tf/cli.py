"""Command-line arguments shared by the TF training scripts of both modes.

``add_common_args(parser)`` adds what every DeepFM / CTR script takes (data, repository, model
directory, training loop, model size, placement, seed, result file); each script adds its mode's
own flags (``--sync`` for between-graph, ``--input`` for the coordinator, ...)::

    p = argparse.ArgumentParser()
    kubeai_train.tf.cli.add_common_args(p)
    p.add_argument("--sync", action="store_true")
    args = p.parse_args()
    model = kubeai_train.tf.cli.deepfm_from_args(kubeai_train.tf.DeepFM, args)
    config = kubeai_train.tf.cli.config_from_args(args, name="my_job", sync=args.sync)
    result = kubeai_train.tf.run(model, config, placement=kubeai_train.tf.cli.placement_from_args(args))
    kubeai_train.tf.cli.report_result(args, result)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from kubeai_train import cluster
from kubeai_train.tf.balanced import POLICIES, BalancedPlacement, placement_policy
from kubeai_train.tf.features import CtrFeatures
from kubeai_train.tf.types import STRAGGLER_MODES, AdaptiveBatching, PlacementPolicy, StepInfo, TrainConfig

__all__ = [
    "ASSIGNMENTS",
    "PLACEMENTS",
    "STRAGGLERS",
    "add_common_args",
    "add_straggler_args",
    "config_from_args",
    "deepfm_from_args",
    "placement_from_args",
    "report_result",
    "straggler_from_args",
]

M = TypeVar("M")

#: ``--placement`` choices.
PLACEMENTS = POLICIES
#: ``--assignment`` choices (``kubeai_train.data.read(assignment=...)``).
ASSIGNMENTS = ("static", "dynamic")
#: ``--straggler`` choices (``TrainConfig.straggler``).
STRAGGLERS = STRAGGLER_MODES


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments both TF modes' scripts take to ``parser``.

    ``--train-data``, ``--eval-data``, ``--model-repo`` (required), ``--model-name`` (ctr),
    ``--model-dir``, ``--epochs`` (1), ``--batch-size`` (512), ``--learning-rate`` (0.2),
    ``--embedding-dim`` (8), ``--hash-buckets`` (10000), ``--checkpoint-steps`` (500),
    ``--log-steps`` (100), ``--max-steps``, ``--placement`` (round_robin | greedy_bytes | balanced),
    ``--no-shuffle``, ``--seed`` (0), ``--assignment`` (static | dynamic), ``--result-json``.

    Args:
        parser: the script's parser.

    Returns:
        The same parser, for chaining.
    """
    p = parser
    p.add_argument("--train-data", required=True, help="training data URI (kubeai_train.data)")
    p.add_argument("--eval-data", required=True, help="eval data URI")
    p.add_argument("--model-repo", required=True, help="model repository URI to publish to")
    p.add_argument("--model-name", default="ctr")
    p.add_argument(
        "--model-dir",
        default=None,
        help="checkpoints + summaries: a path shared by all processes, gs://, or any fsspec URL "
        "such as oss://bucket/dir (default: a new directory for this job, printed by the chief)",
    )
    p.add_argument(
        "--staging-dir",
        default=None,
        help="local scratch for files bound for an fsspec --model-dir (default: the temp dir)",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=0.2)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--hash-buckets", type=int, default=10000, help="embedding rows per categorical column")
    p.add_argument("--checkpoint-steps", type=int, default=500)
    p.add_argument("--log-steps", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="balanced",
        help="how variables are cut and placed on the PS (default balanced: measured better than "
        "round_robin, the library's run() default, which keeps the model's own partitioners)",
    )
    p.add_argument(
        "--rebalance",
        action="store_true",
        help="with --placement balanced (between-graph, async): move shards off a PS that stays hot while training",
    )
    p.add_argument(
        "--rebalance-window", type=int, default=50, help="the chief's steps per measured load window"
    )
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--assignment",
        choices=ASSIGNMENTS,
        default="static",
        help="how readers share the data: static (fixed shares by rank) or dynamic (a dispatcher on "
        "the chief hands the next piece to whichever reader asks, so slow workers read less)",
    )
    p.add_argument("--result-json", default=None, help="the chief writes its RunResult here")
    return p


def add_straggler_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the slow-worker mitigation flags of synchronous training to ``parser``:
    ``--straggler`` (none | adaptive | backup), ``--micro-batches`` (8: micro-batches of
    ``--batch-size`` rows per replica at equal shares) and ``--replan-every`` (10 steps)."""
    parser.add_argument(
        "--straggler",
        choices=STRAGGLERS,
        default="none",
        help="with --sync: adaptive (a fixed global batch of workers x micro-batches x batch-size rows, "
        "local batches following each replica's speed) or backup (do not wait for --backup-workers, "
        "default 1, replicas per step)",
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=AdaptiveBatching.micro_batches,
        help="--straggler adaptive: micro-batches (of --batch-size rows) per replica at equal shares",
    )
    parser.add_argument(
        "--replan-every",
        type=int,
        default=AdaptiveBatching.replan_every,
        help="--straggler adaptive: steps between re-plans of the local batches",
    )
    return parser


def straggler_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields ``--straggler`` and its options describe (exits with one line
    naming the flag when they do not fit ``--sync`` / ``--backup-workers``)."""
    mode = str(getattr(args, "straggler", "none"))
    backup = int(getattr(args, "backup_workers", 0) or 0)
    if mode != "none" and not getattr(args, "sync", False):
        raise SystemExit(
            f"--straggler {mode} needs --sync (asynchronous training does not wait for slow workers)"
        )
    if mode == "adaptive" and backup:
        raise SystemExit(f"--straggler adaptive aggregates every replica; drop --backup-workers {backup}")
    out: dict[str, Any] = {"straggler": mode}
    if mode == "adaptive":
        out["adaptive"] = AdaptiveBatching(micro_batches=args.micro_batches, replan_every=args.replan_every)
    return out


def placement_from_args(args: argparse.Namespace) -> PlacementPolicy:
    """The placement policy ``--placement`` names (``balanced``: see :mod:`kubeai_train.tf.balanced`)."""
    if getattr(args, "rebalance", False):
        if args.placement != "balanced":
            raise SystemExit(f"--rebalance needs --placement balanced, got --placement {args.placement}")
        return BalancedPlacement(rebalance=True, window_steps=args.rebalance_window)
    return placement_policy(args.placement)


def deepfm_from_args(cls: Callable[..., M], args: argparse.Namespace) -> M:
    """``cls`` (``DeepFM`` or ``coordinator.DeepFMModuleModel``) sized by ``--hash-buckets``,
    ``--embedding-dim`` and ``--learning-rate``."""
    return cls(
        features=CtrFeatures(hash_buckets=args.hash_buckets),
        embedding_dim=args.embedding_dim,
        learning_rate=args.learning_rate,
    )


def config_from_args(
    args: argparse.Namespace,
    *,
    name: str,
    hooks: Sequence[Callable[[StepInfo], None]] = (),
    **extra: Any,
) -> TrainConfig:
    """The TrainConfig the common arguments describe.

    Args:
        args: parsed arguments (see :func:`add_common_args`).
        name: the script's name: recorded as ``params["example"]``; the default ``--model-dir``
            is a directory of this job's own (``cluster.default_job_dir("<name>-<model name>")``).
        hooks: step callbacks (``TrainConfig.hooks``).
        **extra: the mode's own ``TrainConfig`` fields (``sync=``, ``ready_timeout=``, ...).

    Returns:
        The configuration (validated by ``TrainConfig``).
    """
    return TrainConfig(
        model_dir=args.model_dir or cluster.default_job_dir(f"{name}-{args.model_name}"),
        train_data=args.train_data,
        eval_data=args.eval_data,
        batch_size=args.batch_size,
        num_epochs=args.epochs,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        save_checkpoint_steps=args.checkpoint_steps,
        log_steps=args.log_steps,
        max_steps=args.max_steps,
        model_repo=args.model_repo,
        model_name=args.model_name,
        staging_dir=getattr(args, "staging_dir", None),
        # the assignment is recorded (in the published lineage) when it is not the default
        params={
            "example": name,
            **({} if _assignment(args) == "static" else {"assignment": _assignment(args)}),
        },
        hooks=hooks,
        **_with_assignment(args, extra),
    )


def _assignment(args: argparse.Namespace) -> str:
    return str(getattr(args, "assignment", "static"))


def _with_assignment(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` with ``--assignment dynamic`` added to the reader options (static is the default)."""
    if _assignment(args) == "static":
        return extra
    out = dict(extra)
    out["reader_options"] = {**dict(out.get("reader_options") or {}), "assignment": args.assignment}
    return out


def report_result(args: argparse.Namespace, result: Any, *, drop: Collection[str] = ()) -> None:
    """Print the published version as one JSON line, and (chief / local) write ``--result-json``.

    Args:
        args: parsed arguments (``--model-name``, ``--result-json``).
        result: this process's ``RunResult``.
        drop: RunResult fields left out of the ``--result-json`` file.
    """
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
            json.dump({k: v for k, v in result.__dict__.items() if k not in drop}, f, default=str)
