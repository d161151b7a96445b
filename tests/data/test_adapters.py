"""to_tf() in eager and graph mode, to_torch() with DataLoader workers and resume."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubeai_train import data
from kubeai_train.data.adapters import worker_positions


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("adapters")
    n = 500
    ids = np.arange(n, dtype=np.int64)
    t = pa.table(
        {
            "id": ids,
            "label": (ids % 2).astype(np.float32),
            "c": pa.array([f"k{i % 17}" for i in ids]),
            "s": pa.array([f"s{i}" for i in ids]),
            "tags": pa.array([list(range(i % 3)) for i in ids], pa.list_(pa.int64())),
        }
    )
    pq.write_table(t.slice(0, 230), root / "a.parquet", row_group_size=100)
    pq.write_table(t.slice(230), root / "b.parquet", row_group_size=100)
    return str(root)


def test_to_tf_eager(small: str) -> None:
    import tensorflow as tf

    ds = data.read(small, batch_size=64, rank=0, world_size=1, hash_buckets={"c": 100})
    tfds = ds.to_tf()
    spec = tfds.element_spec
    assert spec["id"].dtype == tf.int64 and spec["c"].dtype == tf.int64 and spec["s"].dtype == tf.string
    assert spec["tags.offsets"].dtype == tf.int64
    ids, tags = [], 0
    for b in tfds:
        ids.append(b["id"].numpy())
        rt = tf.RaggedTensor.from_row_splits(b["tags"], b["tags.offsets"])
        assert rt.shape[0] == b["id"].shape[0]
        tags += int(tf.reduce_sum(rt.row_lengths()))
    np.testing.assert_array_equal(np.concatenate(ids), np.arange(500))
    assert tags == sum(i % 3 for i in range(500))
    assert b["s"].numpy()[-1] == b"s499"
    assert ds.state_dict()["epoch"] == 1  # the generator ran in this process, advancing the state


def test_to_tf_graph_mode(small: str) -> None:
    import tensorflow as tf

    ds = data.read(
        small,
        batch_size=64,
        rank=1,
        world_size=2,
        shuffle=True,
        seed=4,
        drop_last=True,
        columns=["id", "label"],
    )
    expected = np.concatenate(
        [
            b["id"]
            for b in data.read(
                small,
                batch_size=64,
                rank=1,
                world_size=2,
                shuffle=True,
                seed=4,
                drop_last=True,
                columns=["id"],
            )
        ]
    )
    graph = tf.Graph()
    with graph.as_default():
        tfds = ds.to_tf().map(lambda b: {"id": b["id"], "label2": b["label"] * 2})
        assert tfds.element_spec["id"].shape.as_list() == [64]  # static batch size with drop_last
        nxt = tf.compat.v1.data.make_one_shot_iterator(tfds).get_next()
        got = []
        with tf.compat.v1.Session(graph=graph) as sess:
            while True:
                try:
                    out = sess.run(nxt)
                except tf.errors.OutOfRangeError:
                    break
                got.append(out["id"])
                np.testing.assert_array_equal(out["label2"], (out["id"] % 2) * 2.0)
    np.testing.assert_array_equal(np.concatenate(got), expected)
    assert len(got) == 250 // 64


def test_to_tf_inside_tf_function(small: str) -> None:
    import tensorflow as tf

    ds = data.read(small, batch_size=100, rank=0, world_size=1, columns=["id"])

    @tf.function
    def total(d: tf.data.Dataset) -> tf.Tensor:
        s = tf.constant(0, tf.int64)
        for b in d:
            s += tf.reduce_sum(b["id"])
        return s

    assert int(total(ds.to_tf())) == sum(range(500))


def test_to_torch_workers_resume_exactly(small: str) -> None:
    import torch
    import torch.utils.data as tud

    kw = {"batch_size": 32, "rank": 0, "world_size": 1, "shuffle": True, "seed": 9, "columns": ["id", "tags"]}
    tds = data.read(small, **kw).to_torch()
    tds.set_epoch(3)
    loader = tud.DataLoader(tds, batch_size=None, num_workers=2, timeout=60)
    it = iter(loader)
    consumed = [next(it) for _ in range(5)]
    assert isinstance(consumed[0]["id"], torch.Tensor) and consumed[0]["tags.offsets"][0] == 0
    state = json.loads(json.dumps(tds.state_dict(num_batches=5, num_workers=2)))
    del it

    tds2 = data.read(small, **kw).to_torch()
    tds2.load_state_dict(state)
    assert tds2.epoch == 3
    rest = list(tud.DataLoader(tds2, batch_size=None, num_workers=2, timeout=60))
    got = np.concatenate([b["id"].numpy() for b in consumed + rest])
    assert len(got) == 500 and len(set(got.tolist())) == 500
    # the same set of rows per batch as an uninterrupted epoch 3
    full = data.read(small, **kw).to_torch()
    full.set_epoch(3)
    whole = [
        b["id"].numpy().tolist() for b in tud.DataLoader(full, batch_size=None, num_workers=2, timeout=60)
    ]
    assert sorted(map(sorted, whole)) == sorted(sorted(b["id"].numpy().tolist()) for b in consumed + rest)
    with pytest.raises(data.StateError, match="2 DataLoader workers"):
        list(tud.DataLoader(tds2, batch_size=None, num_workers=0))


def test_worker_positions_replay_round_robin() -> None:
    # worker 0 has 3 batches (rows 0..70), worker 1 one batch; batch size 32
    assert worker_positions([0, 0], [70, 20], 32, 0) == [0, 0]
    assert worker_positions([0, 0], [70, 20], 32, 2) == [32, 20]
    assert worker_positions([0, 0], [70, 20], 32, 3) == [64, 20]
    assert worker_positions([0, 0], [70, 20], 32, 4) == [70, 20]
    with pytest.raises(ValueError, match="more than the workers deliver"):
        worker_positions([0, 0], [70, 20], 32, 5)


def test_to_tf_with_state_is_exact_under_prefetch(small: str) -> None:
    import tensorflow as tf

    kw = {"batch_size": 32, "rank": 0, "world_size": 1, "shuffle": True, "seed": 2, "columns": ["id"]}
    whole = np.concatenate([b["id"] for b in data.read(small, **kw)])
    ds = data.read(small, **kw)
    consumed, positions, last = [], [], None
    for batch, state in ds.to_tf(with_state=True).prefetch(8).take(5):
        consumed.append(batch["id"].numpy())
        positions.append(data.state_from_tf(state)["rows"])
        last = state
    # each batch carries its own position, however far tf.data read ahead (the dataset's own
    # counter is at least there, and usually past it: how far depends on timing)
    assert positions == [32, 64, 96, 128, 160]
    assert ds.state_dict()["rows"] >= 5 * 32
    # the state carried by the last consumed batch is exactly the resume point
    resumed = data.read(small, **kw)
    resumed.load_state_dict(data.state_from_tf(last))
    assert resumed.state_dict()["rows"] == 5 * 32
    rest = [b["id"] for b in resumed]
    np.testing.assert_array_equal(np.concatenate(consumed + rest), whole)
    # graph mode: the state comes out of session.run as bytes
    graph = tf.Graph()
    with graph.as_default():
        elem = tf.compat.v1.data.make_one_shot_iterator(
            data.read(small, **kw).to_tf(with_state=True)
        ).get_next()
        with tf.compat.v1.Session(graph=graph) as sess:
            _, state_bytes = sess.run(elem)
    assert data.state_from_tf(state_bytes)["rows"] == 32
    with pytest.raises(data.StateError, match="with_state"):
        data.state_from_tf(b"not json")
