"""Command-line arguments shared by the TF training scripts of both modes.

``add_common_args(parser)`` adds what every DeepFM / CTR script takes (data, repository, model
directory, training loop, model size, placement, seed, result file); each script adds its mode's
own flags (``--sync`` for between-graph, ``--input`` for the coordinator, ...)::

    p = argparse.ArgumentParser()
    kubeai_train.tf.cli.add_common_args(p)
    p.add_argument("--sync", action="store_true")
    args = p.parse_args()
    policy = kubeai_train.tf.cli.placement_from_args(args)
"""

from __future__ import annotations

import argparse

from kubeai_train.tf.placement import GreedyBytesPlacement, RoundRobinPlacement
from kubeai_train.tf.types import PlacementPolicy

__all__ = ["PLACEMENTS", "add_common_args", "placement_from_args"]

#: ``--placement`` choices.
PLACEMENTS = ("round_robin", "greedy_bytes")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments both TF modes' scripts take to ``parser``.

    ``--train-data``, ``--eval-data``, ``--model-repo`` (required), ``--model-name`` (ctr),
    ``--model-dir``, ``--epochs`` (1), ``--batch-size`` (512), ``--learning-rate`` (0.2),
    ``--embedding-dim`` (8), ``--hash-buckets`` (10000), ``--checkpoint-steps`` (500),
    ``--log-steps`` (100), ``--max-steps``, ``--placement`` (round_robin | greedy_bytes),
    ``--no-shuffle``, ``--seed`` (0), ``--result-json``.

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
        help="checkpoints + summaries (shared by all processes; "
        "default: a directory named after the job under the temp dir)",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=0.2)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--hash-buckets", type=int, default=10000, help="embedding rows per categorical column")
    p.add_argument("--checkpoint-steps", type=int, default=500)
    p.add_argument("--log-steps", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--placement", choices=PLACEMENTS, default="round_robin")
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None, help="the chief writes its RunResult here")
    return p


def placement_from_args(args: argparse.Namespace) -> PlacementPolicy:
    """The placement policy ``--placement`` names."""
    return GreedyBytesPlacement() if args.placement == "greedy_bytes" else RoundRobinPlacement()
