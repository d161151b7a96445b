"""DeepFM CTR model trained with TensorFlow parameter servers (between-graph), end to end.

Every process of the job runs this same script; ``kubeai_train.tf.run`` does the role's part
(PS serve; chief and workers read their own share of the data and train; the chief exports a
SavedModel taking raw Criteo features and publishes it with its eval AUC / log loss).

    python -m kubeai_train.testing.ctr --rows 200000 --eval-rows 50000 --out /tmp/ctr
    python -m kubeai_train.launch --framework tf --ps 2 --workers 2 --restart-policy ExitCode \\
        examples/tf_ps_ctr.py --train-data /tmp/ctr/train --eval-data /tmp/ctr/eval \\
        --model-repo /tmp/models --model-dir /tmp/ctr_model

Synchronous, with slow-worker mitigation: ``--sync --max-steps N --straggler adaptive``
(``--batch-size`` is then the micro-batch; see ``kubeai_train.tf.between_graph.adaptive``)
or ``--straggler backup`` (``--backup-workers``, default 1).

Without a launcher (no TF_CONFIG) it trains in one process: the single-process baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from kubeai_train import tf as ktf
from kubeai_train.tf import cli


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_common_args(p)
    p.add_argument("--sync", action="store_true", help="synchronous updates (needs --max-steps)")
    p.add_argument(
        "--backup-workers",
        type=int,
        default=0,
        help="with --sync: aggregate each step without waiting for this many replicas (slow workers)",
    )
    cli.add_straggler_args(p)
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a worker waits for the chief")
    p.add_argument("--audit-column", default=None, help="record this int64 column of every applied batch")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, hooks: Sequence[Callable[[ktf.StepInfo], None]] = ()) -> int:
    """Run this process's role; ``hooks`` see a StepInfo every ``--log-steps`` steps."""
    args = parse(argv)
    model = cli.deepfm_from_args(ktf.DeepFM, args)
    config = cli.config_from_args(
        args,
        name="tf_ps_ctr",
        hooks=hooks,
        sync=args.sync,
        backup_workers=args.backup_workers,
        **cli.straggler_from_args(args),
        audit_column=args.audit_column,
        ready_timeout=args.ready_timeout,
    )
    policy = cli.placement_from_args(args)
    result = ktf.run(model, config, placement=policy)
    cli.report_result(args, result, drop=("placement",))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # TF's gRPC server threads can keep a finished process from exiting
