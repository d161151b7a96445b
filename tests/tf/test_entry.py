"""Unit tests of the one entry point ``kubeai_train.tf.run``: mode validation and dispatch."""

from __future__ import annotations

import pytest

import kubeai_train.tf as ktf
from kubeai_train.tf import coordinator as coord

FEATS = ktf.CtrFeatures(hash_buckets=2000)


def test_package_exports_run_and_the_coordinator_module():
    assert ktf.run is ktf.entry.run
    assert ktf.coordinator is coord and ktf.MODES == ("between_graph", "coordinator")


def test_bad_mode_names_the_value_and_the_choices(tmp_path):
    cfg = ktf.TrainConfig(model_dir=str(tmp_path), train_data="x")
    with pytest.raises(ktf.TrainError, match=r"mode must be one of between_graph, coordinator, got 'ps'"):
        ktf.run(ktf.DeepFM(features=FEATS), cfg, mode="ps")


def test_mode_coordinator_reaches_the_coordinator(tmp_path):
    # sync is rejected by the coordinator's run only (the between-graph mode accepts it)
    cfg = ktf.TrainConfig(model_dir=str(tmp_path), train_data="x", sync=True, max_steps=5)
    with pytest.raises(ktf.TrainError, match="between-graph options; the coordinator mode"):
        ktf.run(coord.DeepFMModuleModel(features=FEATS), cfg, mode="coordinator")


def test_coordinator_options_need_the_coordinator_mode(tmp_path):
    cfg = ktf.TrainConfig(model_dir=str(tmp_path), train_data="x")
    with pytest.raises(ktf.TrainError, match="apply to mode='coordinator' only"):
        ktf.run(ktf.DeepFM(features=FEATS), cfg, options=coord.CoordinatorOptions())
