"""Feature transforms (hashing, dense normalisation) and the DeepFM model."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kubeai_train.tf.features import CtrFeatures, partitioner
from kubeai_train.tf.models import DeepFM
from kubeai_train.tf.types import TrainError


def test_transform_hashes_per_column_ranges_and_normalises_dense():
    f = CtrFeatures(categorical=("C1", "C2"), dense=("I1",), hash_buckets=50)
    dense, ids = f.transform(
        {
            "C1": tf.constant(["a", "b", "a", ""]),
            "C2": tf.constant(["a", "a", "zz", ""]),
            "I1": tf.constant([0.0, np.e - 1, np.nan, -5.0], tf.float32),
        }
    )
    ids, dense = ids.numpy(), dense.numpy()
    assert ids.shape == (4, 2) and dense.shape == (4, 2)
    assert ((ids[:, 0] >= 0) & (ids[:, 0] < 50)).all() and ((ids[:, 1] >= 50) & (ids[:, 1] < 100)).all()
    assert ids[0, 0] == ids[2, 0] and ids[0, 0] != ids[1, 0]  # same string, same row
    assert ids[0, 1] - 50 == ids[0, 0]  # the same hash, shifted into column 2's range
    np.testing.assert_allclose(dense[:, 0], [0.0, 1.0, 0.0, 0.0], atol=1e-6)  # log1p(max(x,0)), NaN -> 0
    np.testing.assert_array_equal(dense[:, 1], [0, 0, 1, 0])  # missing indicator
    assert f.table_rows == 100 and f.dense_width == 2
    assert f.raw_features() == {"C1": "string", "C2": "string", "I1": "float32"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hash_buckets": 0}, "hash_buckets must be >= 1"),
        ({"categorical": (), "dense": ()}, "at least one"),
        ({"categorical": ("x",), "dense": ("x",)}, "both categorical and dense"),
    ],
)
def test_features_validation(kwargs, match):
    with pytest.raises(TrainError, match=match):
        CtrFeatures(**kwargs)


def test_deepfm_builds_sharded_and_unsharded_with_the_same_outputs_shape():
    for num_ps in (1, 2):
        g = tf.Graph()
        with g.as_default():
            m = DeepFM(features=CtrFeatures(hash_buckets=10), embedding_dim=3, hidden=(4,))
            feats = {
                n: tf.compat.v1.placeholder(tf.string if k == "string" else tf.float32, [None])
                for n, k in m.raw_features().items()
            }
            logits = m.logits(feats, num_ps=num_ps, training=False)
            names = [v.op.name for v in tf.compat.v1.global_variables()]
            with tf.compat.v1.Session() as s:
                s.run(tf.compat.v1.global_variables_initializer())
                out = s.run(
                    logits,
                    {p: (["x", "y"] if p.dtype == tf.string else [1.0, np.nan]) for p in feats.values()},
                )
        assert out.shape == (2,) and np.isfinite(out).all()
        assert ("deepfm/emb_v/part_1" in names) == (num_ps == 2)
    assert partitioner(1) is None


def test_deepfm_validation_and_params():
    with pytest.raises(TrainError, match="embedding_dim must be >= 1"):
        DeepFM(embedding_dim=0)
    with pytest.raises(TrainError, match="learning_rate must be > 0"):
        DeepFM(learning_rate=0)
    assert DeepFM().params()["model"] == "DeepFM"
