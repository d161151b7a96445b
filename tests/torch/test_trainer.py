from __future__ import annotations

import json

import pytest
import torch

from kubeai_train import data
from kubeai_train.torch import group
from kubeai_train.torch.features import CTRFeatures
from kubeai_train.torch.model import DLRM
from kubeai_train.torch.trainer import Trainer
from kubeai_train.torch.types import ConfigError, TrainConfig

from ._helpers import ctr_columns, write_parquet

FEATURES = CTRFeatures(buckets=64)


@pytest.fixture
def ctx(clean_cluster_env):
    with group.process_group() as c:
        yield c


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctr")
    return {
        "train": str(write_parquet(root / "train", ctr_columns(3000, seed=1), files=3)),
        "eval": str(write_parquet(root / "eval", ctr_columns(1000, seed=2))),
    }


def read(uri, batch_size=100, **kw):
    return data.read(uri, batch_size=batch_size, **FEATURES.read_options(), **kw)


def make(ctx, **cfg):
    torch.manual_seed(0)
    return Trainer(DLRM(FEATURES.sizes, len(FEATURES.dense), dim=8), FEATURES, TrainConfig(**cfg), ctx)


def test_fit_trains_every_row_and_learns(ctx, parquet, tmp_path):
    t = make(ctx, dense_lr=0.01, sparse_lr=0.05, log_dir=str(tmp_path / "tb"), log_every=10)
    before = t.evaluate(read(parquet["eval"], 500))
    res = t.fit(read(parquet["train"]), epochs=2)
    after = t.evaluate(read(parquet["eval"], 500))
    t.close()
    assert res.steps == 60 and res.rows == 6000 and res.rows_per_rank == [6000]
    assert after["rows"] == 1000 and after["auc"] > before["auc"] + 0.05 and after["auc"] > 0.65
    tags = {json.loads(line)["tag"] for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()}
    assert {"train/loss", "train/examples_per_s", "eval/auc", "eval/logloss"} <= tags


@pytest.mark.parametrize("stop_at", [4, 33])  # mid first epoch; mid second epoch
def test_resume_continues_exactly_where_it_stopped(ctx, parquet, tmp_path, stop_at):
    ck = str(tmp_path / "ck")
    full = make(ctx)
    full.fit(read(parquet["train"]), epochs=2)

    first = make(ctx, checkpoint_dir=ck, checkpoint_every=3, max_steps=stop_at)
    r1 = first.fit(read(parquet["train"]), epochs=2)
    assert (r1.steps, r1.rows) == (stop_at, 100 * stop_at)
    second = make(ctx, checkpoint_dir=ck, checkpoint_every=3)
    r2 = second.fit(read(parquet["train"]), epochs=2)
    assert r2.resumed_from == stop_at and r2.steps == 60 and r2.rows == 6000
    # same batches, same order, same optimizer state: the same model as the uninterrupted run
    for a, b in zip(full.module.state_dict().values(), second.module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # a finished job restarted (e.g. a pod recreated after success) trains nothing more
    third = make(ctx, checkpoint_dir=ck)
    r3 = third.fit(read(parquet["train"]), epochs=2)
    assert (r3.resumed_from, r3.steps, r3.rows) == (60, 60, 6000)


def test_dynamic_assignment_resumes_exactly(ctx, parquet, tmp_path):
    # one reader takes the pieces in order: an interrupted run continues with the batches the
    # uninterrupted one trained on (the data position, with the dispatcher's state, is exact)
    full = make(ctx)
    full.fit(read(parquet["train"], assignment="dynamic"), epochs=2)
    ck = str(tmp_path / "ck")
    first = make(ctx, checkpoint_dir=ck, checkpoint_every=4, max_steps=37)
    assert first.fit(read(parquet["train"], assignment="dynamic"), epochs=2).rows == 3700
    second = make(ctx, checkpoint_dir=ck, checkpoint_every=4)
    r2 = second.fit(read(parquet["train"], assignment="dynamic"), epochs=2)
    assert r2.resumed_from == 37 and r2.rows == 6000
    for a, b in zip(full.module.state_dict().values(), second.module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ConfigError, match=r"assignment='dynamic' need num_workers=0 \(got 2\)"):
        make(ctx, checkpoint_dir=ck, num_workers=2).fit(read(parquet["train"], assignment="dynamic"))


def test_loader_workers_resume(ctx, parquet, tmp_path):
    ck = str(tmp_path / "ck")
    first = make(ctx, checkpoint_dir=ck, checkpoint_every=5, max_steps=7, num_workers=2)
    assert first.fit(read(parquet["train"])).rows == 700
    second = make(ctx, checkpoint_dir=ck, checkpoint_every=5, num_workers=2)
    res = second.fit(read(parquet["train"]))
    assert res.resumed_from == 7 and res.rows == 3000


def test_bad_arguments(ctx, parquet, tmp_path):
    t = make(ctx, checkpoint_dir=str(tmp_path / "ck"))
    with pytest.raises(ConfigError, match="epochs must be an integer >= 1, got 0"):
        t.fit(read(parquet["train"]), epochs=0)
    with pytest.raises(ConfigError, match=r"read the data with num_epochs=1 \(got 2\)"):
        t.fit(read(parquet["train"], num_epochs=2))


def test_predict_is_probability(ctx):
    t = make(ctx)
    out = FEATURES.transform(ctr_columns(5))
    p = t.predict(torch.from_numpy(out["ids"]), torch.from_numpy(out["dense"]))
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()
