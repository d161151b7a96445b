"""DeepFM CTR model trained in TF2 coordinator mode (ParameterServerStrategy), end to end.

Every process of the job runs this same script; ``kubeai_train.tf.run(..., mode="coordinator")``
does the role's part (PS and workers serve; the chief schedules steps onto the workers, checkpoints,
exports a SavedModel taking raw Criteo features and publishes it with its eval AUC / log loss).

    python -m kubeai_train.testing.ctr --rows 200000 --eval-rows 50000 --out /tmp/ctr
    python -m kubeai_train.launch --framework tf --ps 2 --workers 2 --restart-policy ExitCode \\
        examples/tf_coord_ctr.py --train-data /tmp/ctr/train --eval-data /tmp/ctr/eval \\
        --model-repo /tmp/models --model-dir /tmp/ctr_coord

Input read on the workers instead (TFRecord files, written once from the same data):

    python examples/tf_coord_ctr.py --write-native /tmp/ctr/train_tfrecord --train-data /tmp/ctr/train ...
    python -m kubeai_train.launch ... examples/tf_coord_ctr.py --input workers \\
        --native-data /tmp/ctr/train_tfrecord --train-data /tmp/ctr/train ...

Without a launcher (no TF_CONFIG) it trains in one process: the single-process baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from kubeai_train import tf as ktf
from kubeai_train.tf import cli, coordinator


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_common_args(p)
    p.add_argument("--input", choices=("chief", "workers"), default="chief")
    p.add_argument(
        "--native-data", default=None, help="TFRecord / CSV files the workers read (--input workers)"
    )
    p.add_argument("--native-format", choices=("tfrecord", "csv"), default="tfrecord")
    p.add_argument("--write-native", default=None, help="write --train-data as native files here and exit")
    p.add_argument("--reader-threads", type=int, default=2)
    p.add_argument(
        "--fixed-shards", type=int, default=None, help="FixedShardsPartitioner(N) instead of MinSize"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None, hooks: Sequence[Callable[[ktf.StepInfo], None]] = ()) -> int:
    """Run this process's role; ``hooks`` see a StepInfo every ``--log-steps`` steps (chief)."""
    args = parse(argv)
    model = cli.deepfm_from_args(coordinator.DeepFMModuleModel, args)
    if args.write_native:
        kinds = {**model.raw_features(), model.label: "int64"}
        paths = coordinator.write_native(args.train_data, args.write_native, kinds, fmt=args.native_format)
        print(json.dumps({"native_files": paths}))
        return 0
    config = cli.config_from_args(args, name="tf_coord_ctr", hooks=hooks)
    options = coordinator.CoordinatorOptions(
        input=args.input,
        native_data=args.native_data,
        native_format=args.native_format,
        reader_threads=args.reader_threads,
        fixed_shards=args.fixed_shards,
    )
    policy = cli.placement_from_args(args)
    result = ktf.run(model, config, mode="coordinator", options=options, placement=policy)
    cli.report_result(args, result)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # TF's gRPC server threads can keep a finished process from exiting
