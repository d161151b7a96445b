"""load_predictor on torch exports: a small DLRM trained in this process, exported, published.

The reference is the training path: the eval set read by ``data.read`` (strings hashed in the
reader), ``CTRFeatures.transform``, the live model; the predictor gets the raw Parquet rows.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from kubeai_train import data
from kubeai_train.repository import AliasNotFoundError, ModelRepository
from kubeai_train.serving import (
    ColumnTypeError,
    ExportFormatError,
    MissingColumnError,
    ServingError,
    load_predictor,
)
from kubeai_train.serving.torch_export import TorchPredictor
from kubeai_train.torch import metrics
from kubeai_train.torch.exporter import ServingModule, export, publish
from kubeai_train.torch.features import CTRFeatures
from kubeai_train.torch.model import DLRM

FEATURES = CTRFeatures(buckets=500)


def _read(uri: str, batch_size: int, **kw):
    opts = FEATURES.read_options()
    opts["columns"] = [*opts["columns"], "row_id"]
    return data.read(uri, batch_size=batch_size, rank=0, world_size=1, **kw, **opts)


@pytest.fixture(scope="module")
def trained(ctr_split, tmp_path_factory):
    """A DLRM trained 12 steps, its live eval predictions by row_id, published as ctr/1 (alias
    ``production``) with the eval AUC computed as the trainer does."""
    root, _ = ctr_split
    torch.manual_seed(0)
    model = DLRM(FEATURES.sizes, len(FEATURES.dense), dim=8, bottom=(16,), top=(16,), sparse=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step, raw in enumerate(_read(str(root / "train"), 512, shuffle=True, seed=0)):
        b = FEATURES.transform(raw)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(torch.from_numpy(b["ids"]), torch.from_numpy(b["dense"])), torch.from_numpy(b["label"])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 11:
            break
    live = ServingModule(model).eval()
    row_id, labels, preds, ids = [], [], [], []
    with torch.no_grad():
        for raw in _read(str(root / "eval"), 1024, shuffle=False):
            b = FEATURES.transform(raw)
            preds.append(live(torch.from_numpy(b["ids"]), torch.from_numpy(b["dense"])).numpy())
            row_id.append(raw["row_id"])
            labels.append(b["label"])
            ids.append(b["ids"])
    order = np.argsort(np.concatenate(row_id))
    ref = {
        "pred": np.concatenate(preds)[order],
        "label": np.concatenate(labels)[order],
        "ids": np.concatenate(ids)[order],
    }
    eval_metrics = metrics.summarize(ref["label"], ref["pred"])
    tmp = tmp_path_factory.mktemp("torch_export")
    out = export(model, FEATURES, tmp / "export")
    repo_root = tmp / "repo"
    mv = publish(
        str(repo_root),
        "ctr",
        out,
        metrics={"auc": eval_metrics["auc"], "logloss": eval_metrics["logloss"]},
        dataset=str(root / "train"),
    )
    ModelRepository(str(repo_root)).set_alias("ctr", "production", mv.version)
    return {"repo": repo_root, "export": out, "version": mv, "ref": ref, "model": live}


def _by_row_id(table: pa.Table) -> pa.Table:
    return table.sort_by("row_id")


def test_raw_rows_score_as_the_live_model_and_reproduce_the_reported_auc(trained, eval_table):
    p = load_predictor(trained["repo"], "ctr", "production")
    assert isinstance(p, TorchPredictor) and p.signature.framework == "torch"
    assert p.signature.preprocessing["name"] == "ctr-fnv1a" and p.signature.preprocessing["version"] == 1
    assert p.inputs == {
        **dict.fromkeys(FEATURES.dense, "float32"),
        **dict.fromkeys(FEATURES.categorical, "string"),
    }
    rows = _by_row_id(eval_table)
    scores = p.predict(rows)
    assert scores.dtype == np.float32 and scores.shape == (rows.num_rows,)
    np.testing.assert_allclose(scores, trained["ref"]["pred"], rtol=0, atol=1e-6)
    reported = p.metadata["metrics"]["auc"]
    assert reported == trained["version"].metrics["auc"]
    assert round(metrics.auc(rows.column("label").to_numpy(), scores), 4) == round(reported, 4)
    # the ids the predictor fed the program are the reader's, bit for bit
    ids, _ = p.features.model_inputs({c: rows.column(c) for c in p.inputs})
    assert np.array_equal(ids, trained["ref"]["ids"])


def test_by_path_by_number_and_newest_give_the_same_scores(trained, eval_table):
    rows = _by_row_id(eval_table).slice(0, 300)
    want = load_predictor(trained["repo"], "ctr", 1).predict(rows)
    version_dir = trained["version"].uri
    for p in (
        load_predictor(version_dir),
        load_predictor(trained["export"]),  # what the exporter wrote, no repository record
        load_predictor(trained["repo"], "ctr"),
        load_predictor(trained["repo"], "ctr", "latest", verify=True),
        load_predictor(trained["repo"], "ctr", "1", batch_size=7),
    ):
        np.testing.assert_allclose(p.predict(rows), want, rtol=0, atol=1e-7)
    assert load_predictor(version_dir).metadata["metrics"] == trained["version"].metrics
    assert load_predictor(trained["export"]).metadata == {}


def test_every_row_form_gives_the_same_scores(trained, eval_table):
    p = load_predictor(trained["export"])
    rows = _by_row_id(eval_table).slice(0, 200)
    want = p.predict(rows)
    as_lists = {c: rows.column(c).to_pylist() for c in rows.column_names}  # None for nulls
    # numpy: strings as objects with None, floats with NaN
    as_numpy = {c: rows.column(c).to_numpy(zero_copy_only=False) for c in p.inputs}
    encoded = rows.set_column(
        rows.schema.get_field_index("C3"), "C3", rows.column("C3").combine_chunks().dictionary_encode()
    )
    for form in (as_lists, as_numpy, rows.to_batches(max_chunksize=64)[0], encoded):
        got = p.predict(form)
        np.testing.assert_allclose(got, want[: len(got)], rtol=0, atol=1e-6)
    assert p.predict(rows.slice(0, 0)).shape == (0,)


def test_a_missing_or_mistyped_column_is_one_clear_line(trained, eval_table):
    p = load_predictor(trained["export"])
    rows = eval_table.slice(0, 10)
    with pytest.raises(MissingColumnError) as e:
        p.predict(rows.drop_columns(["C7"]))
    assert "\n" not in str(e.value) and "lack column 'C7' (string)" in str(e.value)
    hashed = rows.set_column(rows.schema.get_field_index("C1"), "C1", pa.array(np.arange(10)))
    with pytest.raises(ColumnTypeError, match=r"column 'C1' has type int64; expected string: raw strings"):
        p.predict(hashed)


def test_an_undeclared_or_unknown_preprocessing_step_is_refused_by_name(trained, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(trained["export"], d)
    spec = json.loads((d / "features.json").read_text())
    # an export from before the step was declared by name reads as ctr-fnv1a version 1
    legacy = {k: v for k, v in spec.items() if k != "preprocessing"}
    (d / "features.json").write_text(json.dumps(legacy))
    assert load_predictor(d).signature.preprocessing["version"] == 1
    (d / "features.json").write_text(
        json.dumps({**spec, "preprocessing": {"name": "ctr-fnv1a", "version": 2}})
    )
    with pytest.raises(
        ExportFormatError,
        match=r"declares preprocessing 'ctr-fnv1a' version 2; .* implements ctr-fnv1a version 1",
    ):
        load_predictor(d)


def test_resolution_errors_name_what_exists(trained):
    with pytest.raises(AliasNotFoundError, match="staging"):
        load_predictor(trained["repo"], "ctr", "staging")
    with pytest.raises(ServingError, match=r"version=3 needs name="):
        load_predictor(trained["export"], version=3)
    with pytest.raises(ServingError, match=r"batch_size must be an integer >= 1, got 0"):
        load_predictor(trained["export"], batch_size=0)


def test_a_remote_repository_is_downloaded_verified_and_scores_the_same(trained, eval_table):
    import uuid

    import fsspec

    root = f"memory://serving-{uuid.uuid4().hex[:8]}"
    remote = ModelRepository(root)
    try:
        remote.publish("ctr", trained["export"], metadata={"framework": "torch", "metrics": {"auc": 0.5}})
        rows = eval_table.slice(0, 100)
        got = load_predictor(root, "ctr", 1).predict(rows)
        np.testing.assert_array_equal(got, load_predictor(trained["export"]).predict(rows))
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
