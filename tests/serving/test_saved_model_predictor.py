"""load_predictor on SavedModels: a small DeepFM trained a few steps in a local graph (no
cluster), then the TF trainers' own export path: ``export.Predictor`` restores the checkpoint,
``export.evaluate`` computes the eval metrics the chief reports, the SavedModel is written and
published with them. The predictor gets the raw Parquet rows."""

from __future__ import annotations

import numpy as np
import pytest

from kubeai_train import data
from kubeai_train.repository import ModelRepository
from kubeai_train.serving import ColumnTypeError, MissingColumnError, load_predictor
from kubeai_train.serving.saved_model import SavedModelPredictor
from kubeai_train.tf import CtrFeatures, DeepFM, export, metrics
from kubeai_train.tf._tf import tf
from kubeai_train.tf.reading import clean_batch, default_read_fn, reader_options

MODEL = DeepFM(features=CtrFeatures(hash_buckets=500), embedding_dim=4, hidden=(16,))


def _train_checkpoint(train_uri: str, path: str, steps: int = 15) -> str:
    kinds = {**MODEL.raw_features(), MODEL.label: "int64"}
    graph = tf.Graph()
    with graph.as_default():
        inputs = {
            n: tf.compat.v1.placeholder(tf.string if k == "string" else tf.float32, [None], name=n)
            for n, k in MODEL.raw_features().items()
        }
        label = tf.compat.v1.placeholder(tf.float32, [None])
        logits = MODEL.logits(inputs, num_ps=1, training=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=label, logits=logits))
        step = tf.compat.v1.train.get_or_create_global_step()
        train_op = MODEL.optimizer().minimize(loss, global_step=step)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as s:
            s.run(tf.compat.v1.global_variables_initializer())
            ds = data.read(train_uri, columns=list(kinds), batch_size=512, shuffle=True, seed=0,
                           **reader_options(kinds, {}))  # fmt: skip
            for i, raw in enumerate(ds):
                b = clean_batch(raw, kinds)
                feed = {inputs[n]: b[n] for n in inputs}
                s.run(train_op, {**feed, label: b[MODEL.label].astype(np.float32)})
                if i + 1 == steps:
                    break
            return saver.save(s, path, global_step=step)


@pytest.fixture(scope="module")
def published(ctr_split, tmp_path_factory):
    root, _ = ctr_split
    tmp = tmp_path_factory.mktemp("tf_export")
    ckpt = _train_checkpoint(str(root / "train"), str(tmp / "model.ckpt"))
    live = export.Predictor(MODEL, ckpt, num_ps=1)
    try:
        reported, _ = export.evaluate(live, default_read_fn, str(root / "eval"))
        saved = live.export(str(tmp / "export"))
        repo = tmp / "repo"
        mv = export.publish(
            str(repo),
            "ctr",
            saved,
            {"framework": "tf", "metrics": {k: reported[k] for k in ("auc", "logloss")},
             "signature": {"name": export.SIGNATURE, "inputs": MODEL.raw_features()}},
        )  # fmt: skip
        ModelRepository(str(repo)).set_alias("ctr", "production", mv.version)
        yield {"repo": repo, "export": saved, "version": mv, "reported": reported, "live": live}
    finally:
        live.close()


def test_raw_rows_score_as_the_live_graph_and_reproduce_the_reported_auc(published, eval_table):
    p = load_predictor(published["repo"], "ctr", "production")
    assert isinstance(p, SavedModelPredictor) and p.signature.format == "saved_model"
    assert p.signature.preprocessing is None  # hashing is inside the graph
    assert p.inputs == MODEL.raw_features()  # in the order the metadata lists
    scores = p.predict(eval_table)
    assert scores.dtype == np.float32 and scores.shape == (eval_table.num_rows,)
    kinds = MODEL.raw_features()
    raw = {c: eval_table.column(c).to_numpy(zero_copy_only=False) for c in kinds}
    np.testing.assert_allclose(scores, published["live"].predict(clean_batch(raw, kinds)), rtol=0, atol=1e-6)
    reported = p.metadata["metrics"]["auc"]
    assert reported == published["reported"]["auc"]
    assert round(metrics.auc(eval_table.column("label").to_numpy(), scores), 4) == round(reported, 4)


def test_by_path_and_row_forms_give_the_same_scores(published, eval_table):
    rows = eval_table.slice(0, 150)
    want = load_predictor(published["repo"], "ctr", 1).predict(rows)
    p = load_predictor(published["version"].uri, batch_size=40)
    np.testing.assert_allclose(p.predict(rows), want, rtol=0, atol=1e-7)
    by_path = load_predictor(published["export"])
    assert by_path.metadata == {} and set(by_path.inputs) == set(MODEL.raw_features())
    lists = {c: rows.column(c).to_pylist() for c in rows.column_names}
    np.testing.assert_allclose(by_path.predict(lists), want, rtol=0, atol=1e-6)


def test_a_missing_or_mistyped_column_is_one_clear_line(published, eval_table):
    p = load_predictor(published["export"])
    with pytest.raises(MissingColumnError, match=r"rows lack column 'I4' \(float32\);"):
        p.predict(eval_table.slice(0, 5).drop_columns(["I4"]))
    rows = {c: eval_table.column(c).slice(0, 5) for c in p.inputs}
    rows["C2"] = [1, 2, 3, 4, 5]
    with pytest.raises(ColumnTypeError, match=r"column 'C2' has type int64; expected string"):
        p.predict(rows)
