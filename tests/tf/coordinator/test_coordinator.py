"""Unit tests of the coordinator mode without a cluster: options, placement planning and its
creator, the Adagrad update, the chief readers, the native worker datasets, a local run."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import tensorflow as tf

from kubeai_train.testing import ctr
from kubeai_train.tf import CtrFeatures, GreedyBytesPlacement, RoundRobinPlacement, TrainConfig, TrainError
from kubeai_train.tf import coordinator as coord
from kubeai_train.tf.coordinator.input import ChiefReader, native_counts, worker_dataset_fn, write_native
from kubeai_train.tf.coordinator.optim import Adagrad
from kubeai_train.tf.coordinator.placement import PlanApplier, infos, snapshot_build, verify
from kubeai_train.tf.reading import default_read_fn

FEATS = CtrFeatures(hash_buckets=2000)


def _model(**kw):
    return coord.DeepFMModuleModel(features=FEATS, **kw)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("coord_small")
    ctr.generate_split(3000, 1000, root, seed=3, files=3, eval_files=1)
    return root


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"input": "ps"}, "input must be one of chief, workers"),
        ({"input": "workers"}, "needs native_data"),
        ({"native_format": "parquet"}, "native_format must be one of"),
        ({"reader_threads": 0}, "reader_threads must be an integer >= 1"),
        ({"fixed_shards": 0}, "fixed_shards must be an integer >= 1"),
        ({"connect_timeout": 0}, "connect_timeout must be > 0"),
    ],
)
def test_options_reject_bad_values(kwargs, needle):
    with pytest.raises(TrainError, match=needle):
        coord.CoordinatorOptions(**kwargs)


def test_run_rejects_between_graph_only_options(tmp_path):
    cfg = TrainConfig(model_dir=str(tmp_path), train_data="x", sync=True, max_steps=5)
    with pytest.raises(TrainError, match="between-graph options"):
        coord.run(_model(), cfg)


def test_evaluator_role_is_rejected(tmp_path, clean_cluster_env):
    clean_cluster_env.setenv(
        "TF_CONFIG",
        json.dumps(
            {
                "cluster": {
                    "chief": ["127.0.0.1:1"],
                    "ps": ["127.0.0.1:2"],
                    "worker": ["127.0.0.1:3"],
                    "evaluator": ["127.0.0.1:4"],
                },
                "task": {"type": "evaluator", "index": 0},
            }
        ),
    )
    with pytest.raises(TrainError, match="evaluator role is not used in coordinator mode"):
        coord.run(_model(), TrainConfig(model_dir=str(tmp_path), train_data="x"))


# ----------------------------------------------------------------------------- placement
def _partitioner():
    return tf.distribute.experimental.partitioners.MinSizePartitioner(min_shard_bytes=256 << 10, max_shards=2)


def test_snapshot_sees_every_variable_and_the_shards_the_strategy_cuts():
    planned = snapshot_build(_model().build, _partitioner())
    names = [p.name for p in planned]
    rows = FEATS.table_rows
    # emb_v (rows x 8 floats = 1.66 MB) is cut in two "div" shards; emb_w (208 KB) is not
    assert names[:4] == ["bias", "emb_w", "emb_v/part_0", "emb_v/part_1"]
    assert [p.shape for p in planned[2:4]] == [(rows // 2, 8), (rows - rows // 2, 8)]
    assert [p.raw_name for p in planned[2:4]] == ["emb_v/part_0", "emb_v/part_1"]
    assert "mlp_0/kernel" in names and "mlp_out/kernel" in names  # Keras 3 layers, full names
    view = {v.name: v for v in infos(planned, batch_size=512)}
    assert view["emb_v/part_0"].kind == "embedding" and view["mlp_0/kernel"].kind == "dense"
    # Adagrad's accumulator is counted with its variable
    assert view["emb_w"].nbytes == rows * 4 * 2
    assert view["emb_v/part_0"].group == "emb_v"


def test_plan_applier_places_each_variable_where_the_plan_says():
    planned = snapshot_build(_model().build, None)
    snap = infos(planned, 512)
    plan = GreedyBytesPlacement().plan(snap, 3)
    applier = PlanApplier(planned, plan)
    with tf.Graph().as_default():
        with tf.variable_creator_scope(applier):
            _model().build()
            with applier.pinned(2):
                pinned = tf.Variable(0, name="global_step")
        applier.finish()
        report = verify(applier)
    assert report["applied"] and not report["mismatched"]
    assert {n: tf.DeviceSpec.from_string(d).task for n, d in report["devices"].items()} == dict(
        plan.assignment
    )
    assert tf.DeviceSpec.from_string(pinned.device).task == 2
    assert len({tf.DeviceSpec.from_string(d).task for d in report["devices"].values()}) == 3


def test_plan_applier_falls_back_with_one_warning_when_creation_differs(caplog):
    planned = snapshot_build(_model().build, None)
    plan = RoundRobinPlacement().plan(infos(planned, 512), 2)
    applier = PlanApplier(planned, plan)
    with caplog.at_level(logging.WARNING, logger="kubeai_train.tf"), tf.Graph().as_default():
        with tf.variable_creator_scope(applier):
            tf.Variable(1.0, name="something_else")
            _model().build()
        applier.finish()
        report = verify(applier)
    assert not report["applied"]
    assert "variable #0 is 'something_else'" in report["warning"]
    warnings = [r for r in caplog.records if "cannot be applied" in r.getMessage()]
    assert len(warnings) == 1 and "round-robin" in warnings[0].getMessage()


def test_plan_applier_warns_when_never_called(caplog):
    planned = snapshot_build(_model().build, None)
    applier = PlanApplier(planned, RoundRobinPlacement().plan(infos(planned, 512), 2))
    with caplog.at_level(logging.WARNING, logger="kubeai_train.tf"):
        applier.finish()
    assert "did not call a variable creator below its own" in applier.broken
    assert not verify(applier)["applied"]


# ----------------------------------------------------------------------------- optimizer
def test_adagrad_matches_tf1_adagrad_dense_and_sparse():
    rng = np.random.default_rng(0)
    table0 = rng.normal(size=(10, 3)).astype(np.float32)
    w0 = rng.normal(size=(3,)).astype(np.float32)
    ids = tf.constant([1, 4, 1, 7])
    x = tf.constant(rng.normal(size=(4, 3)).astype(np.float32))

    def loss_fn(table, w):
        return tf.reduce_sum(tf.nn.embedding_lookup(table, ids) * x * w)

    ours_t, ours_w = tf.Variable(table0), tf.Variable(w0)
    opt = Adagrad([ours_t, ours_w], learning_rate=0.3)
    ref_t, ref_w = tf.Variable(table0), tf.Variable(w0)
    ref = tf.compat.v1.train.AdagradOptimizer(0.3, initial_accumulator_value=0.1)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = loss_fn(ours_t, ours_w)
        grads = tape.gradient(loss, [ours_t, ours_w])
        assert isinstance(grads[0], tf.IndexedSlices)
        opt.apply(grads, [ours_t, ours_w])
        with tf.GradientTape() as tape:
            loss = loss_fn(ref_t, ref_w)
        ref.apply_gradients(zip(tape.gradient(loss, [ref_t, ref_w]), [ref_t, ref_w], strict=True))
    np.testing.assert_allclose(ours_t.numpy(), ref_t.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_w.numpy(), ref_w.numpy(), rtol=1e-5, atol=1e-6)
    untouched = [r for r in range(10) if r not in (1, 4, 7)]
    np.testing.assert_array_equal(ours_t.numpy()[untouched], table0[untouched])


# ----------------------------------------------------------------------------- input
KINDS = {"C1": "string", "I1": "float32", "label": "int64", "row_id": "int64"}


def _chief_reader(small, *, batch_size: int, shuffle: bool, seed: int, threads: int, state=None):
    """One epoch of the small training data through ``ChiefReader``."""
    return ChiefReader(
        default_read_fn,
        str(small / "train"),
        KINDS,
        batch_size=batch_size,
        num_epochs=1,
        shuffle=shuffle,
        seed=seed,
        options={},
        threads=threads,
        state=state,
    )


def test_chief_readers_read_every_row_once_and_resume_exactly(small):
    def reader(state=None):
        return _chief_reader(small, batch_size=128, shuffle=True, seed=1, threads=3, state=state)

    first = reader()
    seen = []
    for n, (k, tensors, _rows, pos) in enumerate(first, start=1):
        assert set(tensors) == set(KINDS) and tensors["C1"].dtype == tf.string
        seen.append(tensors["row_id"].numpy())
        first.mark(k, pos)
        if n == 7:
            break
    state = json.loads(json.dumps(first.state()))
    rest = reader(state)
    for k, tensors, _rows, pos in rest:
        seen.append(tensors["row_id"].numpy())
        rest.mark(k, pos)
    ids = np.concatenate(seen)
    assert sorted(ids.tolist()) == list(range(3000))
    assert rest.state()["done"] == [True, True, True]
    with pytest.raises(TrainError, match="reader_threads=3"):
        _chief_reader(small, batch_size=128, shuffle=False, seed=0, threads=2, state=state)


@pytest.mark.parametrize("fmt", ["tfrecord", "csv"])
def test_worker_datasets_split_files_by_worker_skip_and_pad(small, tmp_path, fmt):
    paths = write_native(str(small / "train"), str(tmp_path / fmt), KINDS, fmt=fmt, files=3)
    assert native_counts(paths, fmt) == [1000, 1000, 1000]
    batches = {}
    for w in range(2):
        fn = worker_dataset_fn(
            paths,
            fmt,
            KINDS,
            batch_size=256,
            num_workers=2,
            num_epochs=1,
            shuffle=False,
            seed=0,
            skip_rows=[0, 300],
            worker_index=lambda w=w: tf.constant(w, tf.int64),
        )
        out = []
        for b in fn():
            if int(tf.size(b["label"])) == 0:
                break
            out.append(b)
        batches[w] = out
    ids0 = np.concatenate([b["row_id"].numpy() for b in batches[0]])
    ids1 = np.concatenate([b["row_id"].numpy() for b in batches[1]])
    # worker 0 reads files 0 and 2 (interleaved), worker 1 file 1 minus the 300 rows it applied before
    assert sorted(ids0.tolist()) == list(range(0, 1000)) + list(range(2000, 3000))
    assert ids1.tolist() == list(range(1300, 2000))
    assert batches[0][0]["C1"].dtype == tf.string and batches[0][0]["I1"].dtype == tf.float32
    # nulls arrive as "" and NaN, as from the chief's reader
    src = _chief_reader(small, batch_size=3000, shuffle=False, seed=0, threads=1)
    whole = next(iter(src))[1]
    i1 = np.concatenate([b["I1"].numpy() for b in batches[0]])
    np.testing.assert_array_equal(np.isnan(i1), np.isnan(whole["I1"].numpy()[ids0]))
    c1 = np.concatenate([b["C1"].numpy() for b in batches[0]])
    np.testing.assert_array_equal(c1, whole["C1"].numpy()[ids0])


# ----------------------------------------------------------------------------- local run
def test_local_run_trains_exports_and_evaluates(small, tmp_path, clean_cluster_env):
    cfg = TrainConfig(
        model_dir=str(tmp_path / "m"),
        train_data=str(small / "train"),
        eval_data=str(small / "eval"),
        batch_size=256,
        log_steps=4,
        save_checkpoint_steps=5,
        model_repo=str(tmp_path / "repo"),
        eval_predictions=100,
    )
    steps = []
    cfg.hooks = [steps.append]
    res = coord.run(_model(learning_rate=0.2), cfg)
    assert res.role == "local" and res.examples == 3000 and res.global_step == res.local_steps == 12
    assert [s.local_step for s in steps] == [4, 8, 12]
    assert 0.5 < res.metrics["auc"] <= 1 and res.metrics["rows"] == 1000
    assert res.version == 1
    sample = np.load(tmp_path / "m" / "eval_sample.npz", allow_pickle=True)
    fn = coord.load_serving(res.export_dir)
    feats = {n: tf.constant(sample[n]) for n in FEATS.raw_features()}
    np.testing.assert_array_equal(fn(**feats)["probability"].numpy(), sample["__prediction__"])
    # a second run on a finished model_dir goes straight to export, same checkpoint, no new version
    again = coord.run(_model(learning_rate=0.2), cfg)
    assert again.checkpoint == res.checkpoint and again.version == 1 and again.local_steps == 0


def test_cluster_loss_classification():
    from kubeai_train.tf.coordinator.trainer import _is_cluster_loss

    assert _is_cluster_loss(tf.errors.UnavailableError(None, None, "ps gone"))
    assert _is_cluster_loss(tf.errors.NotFoundError(None, None, "Resource does not exist"))
    assert _is_cluster_loss(
        tf.errors.InvalidArgumentError(None, None, "Unknown device /job:ps/replica:0/task:1/device:CPU:0")
    )
    assert not _is_cluster_loss(tf.errors.InvalidArgumentError(None, None, "shape mismatch [3] vs [4]"))
    assert not _is_cluster_loss(tf.errors.ResourceExhaustedError(None, None, "OOM"))


def test_encoded_examples_parse_to_the_protos_tensorflow_builds():
    from kubeai_train.tf.coordinator.input import encode_examples

    cols = {
        "C1": np.array(["a", "", "ü€x" * 50], dtype=object),
        "I1": np.array([1.5, np.nan, -3e38], dtype=np.float32),
        "label": np.array([0, 1, -5], dtype=np.int64),
    }
    kinds = {"C1": "string", "I1": "float32", "label": "int64"}
    for i, raw in enumerate(encode_examples(cols, kinds, 3)):
        ex = tf.train.Example.FromString(raw)
        f = ex.features.feature
        assert f["C1"].bytes_list.value == [cols["C1"][i].encode()]
        np.testing.assert_array_equal(np.float32(f["I1"].float_list.value[0]), cols["I1"][i])
        assert f["label"].int64_list.value == [cols["label"][i]]
        want = tf.train.Example(features=tf.train.Features(feature={
            "C1": tf.train.Feature(bytes_list=tf.train.BytesList(value=[cols["C1"][i].encode()])),
            "I1": tf.train.Feature(float_list=tf.train.FloatList(value=[cols["I1"][i]])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[cols["label"][i]])),
        }))  # fmt: skip
        assert ex == want or (np.isnan(cols["I1"][i]) and len(ex.features.feature) == 3)


# ----------------------------------------------------------------------------- fsspec model_dir
def test_local_run_on_an_fsspec_model_dir_trains_resumes_exports_and_publishes(
    small, tmp_path, clean_cluster_env
):
    """model_dir and repository on memory:// (TensorFlow cannot write there): checkpoints,
    markers, the eval sample and the export go through the store; a run that stops early is
    resumed from the store's checkpoint; a finished one goes straight to export."""
    import uuid

    import fsspec

    from kubeai_train.repository import ModelRepository
    from kubeai_train.tf.model_dir import ModelDir

    root = f"memory://coord-{uuid.uuid4().hex[:8]}"
    cfg = TrainConfig(
        model_dir=f"{root}/m",
        train_data=str(small / "train"),
        eval_data=str(small / "eval"),
        batch_size=256,
        log_steps=4,
        save_checkpoint_steps=4,
        max_steps=6,
        model_repo=f"{root}/repo",
        eval_predictions=100,
        staging_dir=str(tmp_path / "staging"),
    )
    try:
        first = coord.run(_model(learning_rate=0.2), cfg)
        assert first.global_step == 6 and first.checkpoint == f"{root}/m/ckpt/ckpt-6"
        d = ModelDir(cfg.model_dir)
        assert d.listdir("ckpt") == ["checkpoint", "ckpt-4.data-00000-of-00001", "ckpt-4.index",
                                     "ckpt-6.data-00000-of-00001", "ckpt-6.index"]  # fmt: skip
        # a new job in the same model_dir without the trained marker: resumes from ckpt-6
        d.remove(coord.TRAINED_MARKER)
        d.remove(coord.PUBLISHED_MARKER)
        cfg.max_steps = None
        res = coord.run(_model(learning_rate=0.2), cfg)
        assert res.global_step == 12 and res.local_steps == 6 and res.examples == 3000 - first.examples
        assert res.export_dir == f"{root}/m/export" and res.checkpoint == f"{root}/m/ckpt/ckpt-12"
        names = set(d.listdir())
        assert {"ckpt", "export", "eval_sample.npz", "_TRAINED.json", "_PUBLISHED.json"} <= names
        assert not any(n.startswith("_COORD_DONE") for n in names)  # single process: no servers to stop
        # the uploaded SavedModel predicts exactly the kept sample
        local = tmp_path / "export"
        fsspec.filesystem("memory").get(f"{root}/m/export", str(local), recursive=True)
        sample = np.load(io.BytesIO(d.read_bytes("eval_sample.npz")), allow_pickle=True)
        fn = coord.load_serving(str(local))
        feats = {n: tf.constant(sample[n]) for n in FEATS.raw_features()}
        np.testing.assert_array_equal(fn(**feats)["probability"].numpy(), sample["__prediction__"])
        mv = ModelRepository(cfg.model_repo).get("ctr")
        assert mv.version == res.version == 2 and mv.metadata["lineage"]["checkpoint"] == res.checkpoint
        again = coord.run(_model(learning_rate=0.2), cfg)
        assert again.checkpoint == res.checkpoint and again.version == 2 and again.local_steps == 0
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)


@pytest.mark.parametrize("role", ["chief", "ps"])
def test_a_model_dir_nobody_can_write_fails_in_one_line_before_the_cluster(role, clean_cluster_env):
    spec = {"chief": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"], "worker": ["127.0.0.1:3"]}
    clean_cluster_env.setenv("TF_CONFIG", json.dumps({"cluster": spec, "task": {"type": role, "index": 0}}))
    with pytest.raises(TrainError) as e:
        coord.run(_model(), TrainConfig(model_dir="nosuchscheme://user:pw@bucket/m", train_data="x"))
    msg = str(e.value)
    assert "nosuchscheme://" in msg and "neither TensorFlow nor fsspec" in msg
    assert "pw" not in msg and "\n" not in msg
    with pytest.raises(TrainError, match=r"^export_dir 'nosuchscheme://b/e': neither") as e:
        coord.run(
            _model(), TrainConfig(model_dir="memory://x/m", train_data="x", export_dir="nosuchscheme://b/e")
        )
    assert "\n" not in str(e.value)
