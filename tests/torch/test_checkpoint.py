from __future__ import annotations

import pytest
import torch

from kubeai_train.torch.checkpoint import CheckpointStore
from kubeai_train.torch.types import CheckpointError


def commit(store, step, world=2):
    for r in range(world):
        store.write_data_state(step, r, {"pos": step * 10 + r})
    return store.commit(step, world, {"w": torch.full((2,), float(step))}, {"dense": None}, {})


def test_commit_load_and_gc(tmp_path):
    store = CheckpointStore(str(tmp_path / "ck"), keep=2)
    assert store.load(0, 2) is None
    for s in (5, 10, 15):
        commit(store, s)
    ck = store.load(1, 2)
    assert ck.step == 15 and ck.data == {"pos": 151} and ck.model["w"].tolist() == [15.0, 15.0]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "LATEST",
        "step-000000000010",
        "step-000000000015",
    ]
    assert store.load(0, 2, step=10).data == {"pos": 100}


def test_uncommitted_step_is_ignored(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=3)
    commit(store, 5)
    # a job killed between writing data states and the commit leaves a step dir without LATEST
    store.write_data_state(10, 0, {"pos": 999})
    assert store.latest_step() == 5 and store.load(0, 2).data == {"pos": 50}
    assert not list(tmp_path.glob("**/*.tmp-*"))


def test_world_size_mismatch_and_incomplete(tmp_path):
    store = CheckpointStore(str(tmp_path))
    commit(store, 5, world=2)
    with pytest.raises(CheckpointError, match="written by 2 ranks, this job has 3"):
        store.load(0, 3)
    (tmp_path / "step-000000000005" / "data-00001.json").unlink()
    with pytest.raises(CheckpointError, match="is incomplete"):
        store.load(1, 2)


def test_memory_filesystem():
    store = CheckpointStore("memory://kubeai-torch-test/ck")
    commit(store, 3, world=1)
    assert store.load(0, 1).step == 3
