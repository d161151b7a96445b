"""Contracts: VariableInfo / PlacementPlan / TrainConfig validation and the plan report."""

from __future__ import annotations

import pickle

import pytest

from kubeai_train.tf.types import (
    AdaptiveBatching,
    ClusterUnavailableError,
    PlacementError,
    PlacementPlan,
    ReadyTimeoutError,
    TrainConfig,
    TrainError,
    VariableInfo,
)


def test_variable_info_validates():
    with pytest.raises(PlacementError, match="nbytes must be >= 0"):
        VariableInfo("a", (1,), "float32", -1)
    with pytest.raises(PlacementError, match="name must not be empty"):
        VariableInfo("", (1,), "float32", 4)
    with pytest.raises(PlacementError, match="traffic must be >= 0"):
        VariableInfo("a", (1,), "float32", 4, traffic=-2.0)


def test_plan_validates_tasks_and_coverage():
    with pytest.raises(PlacementError, match="valid tasks are 0..1"):
        PlacementPlan({"a": 2}, num_ps=2)
    with pytest.raises(PlacementError, match="num_ps must be >= 1"):
        PlacementPlan({}, num_ps=0)
    plan = PlacementPlan({"a": 0}, num_ps=2, policy="p")
    with pytest.raises(PlacementError, match="leaves 1 variables unplaced"):
        plan.validate([VariableInfo("a", (1,), "float32", 4), VariableInfo("b", (1,), "float32", 4)])


def test_plan_report_bytes_per_ps():
    vs = [
        VariableInfo("a", (10,), "float32", 40, traffic=80),
        VariableInfo("b", (5,), "float32", 20, traffic=8),
        VariableInfo("c", (5,), "float32", 20),
    ]
    rep = PlacementPlan({"a": 0, "b": 1, "c": 1}, 2, "x").report(vs)
    assert [p["bytes"] for p in rep["ps"]] == [40, 40]
    assert rep["ps"][0]["traffic"] == 80 and rep["ps"][1]["variables"] == ["b", "c"]
    assert rep["bytes_max_over_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"sync": True}, "sync=True needs max_steps"),
        ({"backup_workers": 1}, "only applies with sync"),
        ({"ready_timeout": 0}, "ready_timeout must be > 0"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"train_data": ""}, "train_data must be set"),
        ({"straggler": "fast"}, "straggler must be one of none, adaptive, backup, got 'fast'"),
        ({"straggler": "adaptive"}, "straggler='adaptive' .* set sync=True"),
        ({"straggler": "backup"}, "straggler='backup' .* set sync=True"),
        (
            {"straggler": "adaptive", "sync": True, "max_steps": 5, "backup_workers": 1},
            "aggregates every replica's gradient; got backup_workers=1",
        ),
        ({"backup_workers": -1, "sync": True, "max_steps": 5}, "backup_workers must be >= 0, got -1"),
        ({"adaptive": {"micro_batches": 4}}, "adaptive must be an AdaptiveBatching, got dict"),
    ],
)
def test_config_validation(kwargs, match):
    base = {"model_dir": "/tmp/x", "train_data": "/tmp/d"}
    base.update(kwargs)
    with pytest.raises(TrainError, match=match):
        TrainConfig(**base)


def test_config_describe_and_errors_pickle():
    cfg = TrainConfig(model_dir="/m", train_data="/d", hooks=[print])
    assert cfg.describe()["hooks"] == 1 and cfg.describe()["train_data"] == "/d"
    secret = TrainConfig(
        model_dir="/m",
        train_data="oss://ak:sk@bucket/d",
        reader_options={"storage_options": {"key": "AK", "secret": "SK"}, "prefetch": 2},
    )
    text = str(secret.describe())
    assert (
        "SK" not in text
        and "sk@" not in text
        and "'key'" in text
        and secret.describe()["reader_options"]["prefetch"] == 2
    )
    for err in (ClusterUnavailableError("x"), ReadyTimeoutError("y"), PlacementError("z")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)
    assert ClusterUnavailableError.exit_code >= 128


def test_straggler_modes_and_backup_workers_agree():
    base = {"model_dir": "/tmp/x", "train_data": "/tmp/d", "sync": True, "max_steps": 5}
    assert TrainConfig(**base).straggler == "none"
    backup = TrainConfig(**base, straggler="backup")
    assert (backup.straggler, backup.backup_workers) == ("backup", 1)
    two = TrainConfig(**base, straggler="backup", backup_workers=2)
    assert (two.straggler, two.backup_workers) == ("backup", 2)
    implied = TrainConfig(**base, backup_workers=1)
    assert implied.straggler == "backup"
    adaptive = TrainConfig(**base, straggler="adaptive", adaptive=AdaptiveBatching(micro_batches=4))
    assert adaptive.describe()["adaptive"]["micro_batches"] == 4 and adaptive.backup_workers == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"micro_batches": 0}, "adaptive.micro_batches must be an integer >= 1, got 0"),
        ({"replan_every": 1.5}, "adaptive.replan_every must be an integer >= 1, got 1.5"),
        ({"slow_steps": 0}, "adaptive.slow_steps"),
        ({"hysteresis": 1.0}, "adaptive.hysteresis must be a fraction in \\[0, 1\\), got 1.0"),
        ({"smoothing": 0}, "adaptive.smoothing must be in \\(0, 1\\], got 0"),
        ({"slow_factor": 1.0}, "adaptive.slow_factor must be a finite number > 1"),
    ],
)
def test_adaptive_batching_validation(kwargs, match):
    with pytest.raises(TrainError, match=match):
        AdaptiveBatching(**kwargs)
