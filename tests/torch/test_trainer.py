from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kubeai_train.torch import group
from kubeai_train.torch.features import CTRFeatures
from kubeai_train.torch.model import DLRM
from kubeai_train.torch.trainer import Trainer
from kubeai_train.torch.types import TrainConfig

from ._helpers import MemoryDataset, ctr_columns


@pytest.fixture
def ctx(clean_cluster_env):
    with group.process_group() as c:
        yield c


def make(ctx, **cfg):
    torch.manual_seed(0)
    f = CTRFeatures(buckets=64)
    return Trainer(DLRM(f.sizes, len(f.dense), dim=8), f, TrainConfig(**cfg), ctx)


def test_fit_trains_every_row_and_learns(ctx, tmp_path):
    cols = ctr_columns(3000, seed=1)
    t = make(ctx, dense_lr=0.01, sparse_lr=0.05, log_dir=str(tmp_path / "tb"), log_every=10)
    before = t.evaluate(MemoryDataset(ctr_columns(1000, seed=2), 500))
    res = t.fit(MemoryDataset(cols, 100))
    after = t.evaluate(MemoryDataset(ctr_columns(1000, seed=2), 500))
    t.close()
    assert res.steps == 30 and res.rows == 3000 and res.rows_per_rank == [3000]
    assert after["rows"] == 1000 and after["auc"] > before["auc"] + 0.05 and after["auc"] > 0.65
    tags = {json.loads(line)["tag"] for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()}
    assert {"train/loss", "train/examples_per_s", "eval/auc", "eval/logloss"} <= tags


def test_checkpoint_resume_continues_where_it_stopped(ctx, tmp_path):
    cols = ctr_columns(1000, seed=3)
    ck = str(tmp_path / "ck")
    full = make(ctx)
    full.fit(MemoryDataset(cols, 100))

    first = make(ctx, checkpoint_dir=ck, checkpoint_every=3, max_steps=4)
    r1 = first.fit(MemoryDataset(cols, 100))
    assert (r1.steps, r1.rows) == (4, 400)
    second = make(ctx, checkpoint_dir=ck, checkpoint_every=3)
    data = MemoryDataset(cols, 100)
    r2 = second.fit(data)
    # max_steps stopped the first run at step 4 and checkpointed there; the second starts at 4
    assert r2.resumed_from == 4 and r2.steps == 10 and r2.rows == 1000 and data.pos == 1000
    # same batches, same order, same optimizer state: identical to the uninterrupted run
    for a, b in zip(full.module.state_dict().values(), second.module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_predict_is_probability(ctx):
    t = make(ctx)
    f = t.features
    out = f.transform(ctr_columns(5))
    p = t.predict(torch.from_numpy(out["ids"]), torch.from_numpy(out["dense"]))
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()
    assert np.isfinite(p.numpy()).all()
