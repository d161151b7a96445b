"""Unit tests of the arguments both TF modes' scripts share (``kubeai_train.tf.cli``)."""

from __future__ import annotations

import argparse
import json
import tempfile

import pytest

from kubeai_train.tf import (
    BalancedPlacement,
    DeepFM,
    GreedyBytesPlacement,
    RoundRobinPlacement,
    RunResult,
    cli,
)
from kubeai_train.tf import coordinator as coord

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
    assert args.sync and isinstance(cli.placement_from_args(args), BalancedPlacement)  # the examples' default
    rr = _parser().parse_args([*REQUIRED, "--placement", "round_robin"])
    assert isinstance(cli.placement_from_args(rr), RoundRobinPlacement)
    greedy = _parser().parse_args([*REQUIRED, "--placement", "greedy_bytes"])
    assert isinstance(cli.placement_from_args(greedy), GreedyBytesPlacement)


def test_bad_placement_and_missing_data_are_rejected(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args([*REQUIRED, "--placement", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--eval-data", "/d/eval", "--model-repo", "/repo"])
    assert "--train-data" in capsys.readouterr().err


def test_model_config_and_report_from_the_common_args(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default model_dir goes there
    out = tmp_path / "result.json"
    args = _parser().parse_args(
        [
            *REQUIRED,
            "--max-steps",
            "5",
            "--hash-buckets",
            "300",
            "--embedding-dim",
            "4",
            "--no-shuffle",
            "--staging-dir",
            "/scratch",
            "--result-json",
            str(out),
        ]
    )
    for cls in (DeepFM, coord.DeepFMModuleModel):
        model = cli.deepfm_from_args(cls, args)
        assert isinstance(model, cls) and model.hparams.embedding_dim == 4
        assert model.features.hash_buckets == 300 and model.hparams.learning_rate == 0.2
    cfg = cli.config_from_args(args, name="job", sync=True)
    # without --model-dir: a new directory of this job's own, named after it (cluster.default_job_dir)
    assert cfg.model_dir.startswith(str(tmp_path / "kubeai_train" / "job-ctr-")) and cfg.params == {
        "example": "job"
    }
    assert cfg.sync and not cfg.shuffle and cfg.batch_size == 512 and cfg.train_data == "/d/train"
    assert cfg.staging_dir == "/scratch"
    res = RunResult(
        role="chief", rank=0, version=3, model_uri="file:///repo/ctr/3", placement={"policy": "x"}
    )
    res.metrics = {"auc": 0.75, "logloss": 0.5, "rows": 9}
    cli.report_result(args, res, drop=("placement",))
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "model": "ctr",
        "version": 3,
        "uri": "file:///repo/ctr/3",
        "metrics": {"auc": 0.75, "logloss": 0.5},
    }
    written = json.loads(out.read_text())
    assert written["version"] == 3 and "placement" not in written and written["role"] == "chief"


def test_straggler_flags_become_config_fields():
    p = cli.add_straggler_args(_parser())
    p.add_argument("--backup-workers", type=int, default=0)
    none = p.parse_args(REQUIRED)
    assert cli.straggler_from_args(none) == {"straggler": "none"}
    args = p.parse_args(
        [*REQUIRED, "--sync", "--straggler", "adaptive", "--micro-batches", "4", "--replan-every", "5"]
    )
    got = cli.straggler_from_args(args)
    assert got["straggler"] == "adaptive"
    assert (got["adaptive"].micro_batches, got["adaptive"].replan_every) == (4, 5)
    assert cli.straggler_from_args(p.parse_args([*REQUIRED, "--sync", "--straggler", "backup"])) == {
        "straggler": "backup"
    }
    with pytest.raises(SystemExit, match="--straggler adaptive needs --sync"):
        cli.straggler_from_args(p.parse_args([*REQUIRED, "--straggler", "adaptive"]))
    with pytest.raises(SystemExit, match="drop --backup-workers 1"):
        cli.straggler_from_args(
            p.parse_args([*REQUIRED, "--sync", "--straggler", "adaptive", "--backup-workers", "1"])
        )
    with pytest.raises(SystemExit):
        p.parse_args([*REQUIRED, "--straggler", "fast"])
