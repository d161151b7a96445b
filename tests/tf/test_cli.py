"""Unit tests of the arguments both TF modes' scripts share (``kubeai_train.tf.cli``)."""

from __future__ import annotations

import argparse

import pytest

from kubeai_train.tf import GreedyBytesPlacement, RoundRobinPlacement, cli

REQUIRED = ["--train-data", "/d/train", "--eval-data", "/d/eval", "--model-repo", "/repo"]


def _parser():
    p = cli.add_common_args(argparse.ArgumentParser(prog="t"))
    p.add_argument("--sync", action="store_true")  # a mode's own flag next to the common ones
    return p


def test_common_args_defaults_and_mode_flags_together():
    args = _parser().parse_args([*REQUIRED, "--sync", "--max-steps", "7"])
    assert (args.train_data, args.eval_data, args.model_repo, args.model_name) == (
        "/d/train",
        "/d/eval",
        "/repo",
        "ctr",
    )
    assert (args.epochs, args.batch_size, args.learning_rate, args.embedding_dim) == (1, 512, 0.2, 8)
    assert (args.hash_buckets, args.checkpoint_steps, args.log_steps, args.max_steps) == (10000, 500, 100, 7)
    assert args.model_dir is None and args.result_json is None and not args.no_shuffle and args.seed == 0
    assert args.sync and isinstance(cli.placement_from_args(args), RoundRobinPlacement)
    greedy = _parser().parse_args([*REQUIRED, "--placement", "greedy_bytes"])
    assert isinstance(cli.placement_from_args(greedy), GreedyBytesPlacement)


def test_bad_placement_and_missing_data_are_rejected(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args([*REQUIRED, "--placement", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--eval-data", "/d/eval", "--model-repo", "/repo"])
    assert "--train-data" in capsys.readouterr().err
