"""Unit tests of what both modes share in ``kubeai_train.tf.export``: the published metadata and
the JSON markers in ``model_dir``."""

from __future__ import annotations

from kubeai_train.tf import CtrFeatures, DeepFM, TrainConfig, export
from kubeai_train.tf import coordinator as coord

FEATS = CtrFeatures(hash_buckets=100)
SPEC = {"chief": ["h:1"], "ps": ["h:2", "h:3"], "worker": ["h:4"]}


def _meta(mode, model, **kw):
    cfg = TrainConfig(
        model_dir="/m",
        train_data="oss://user:s3cret@bucket/train",
        eval_data="/data/eval",
        batch_size=32,
        params={"team": "ads"},
    )
    return export.model_metadata(
        mode=mode,
        model=model,
        config=cfg,
        metrics={"auc": 0.7, "logloss": 0.5, "rows": 10},
        checkpoint="oss://user:s3cret@bucket/m/ckpt-3",
        global_step=3,
        placement={"policy": "round_robin", "ps": [{"bytes": 8}, {"bytes": 4}], "applied": True},
        model_dir="oss://user:s3cret@bucket/m",
        cluster_spec=SPEC,
        **kw,
    )


def test_both_modes_publish_the_same_shape_without_secrets():
    bg = _meta("between_graph", DeepFM(features=FEATS), params={"sync": False})
    co = _meta(
        "coordinator",
        coord.DeepFMModuleModel(features=FEATS),
        params={"input": "chief"},
        lineage={"native_data": None},
    )
    assert (
        set(bg)
        == set(co)
        == {"metrics", "eval", "framework", "mode", "params", "signature", "dataset", "lineage"}
    )
    assert (bg["mode"], co["mode"]) == ("between_graph", "coordinator")
    assert bg["metrics"] == {"auc": 0.7, "logloss": 0.5} and bg["eval"]["rows"] == 10
    assert bg["signature"] == co["signature"] and bg["signature"]["inputs"]["C1"] == "string"
    assert (
        bg["params"]["sync"] is False and co["params"]["input"] == "chief" and co["params"]["team"] == "ads"
    )
    assert bg["lineage"]["params"]["seed"] == 0 and co["lineage"]["native_data"] is None
    assert co["lineage"]["cluster"] == {"chief": 1, "ps": 2, "worker": 1}
    assert co["lineage"]["placement"] == {"policy": "round_robin", "bytes_per_ps": [8, 4], "applied": True}
    for meta in (bg, co):
        assert "s3cret" not in repr(meta)
        assert meta["dataset"]["uri"] == meta["lineage"]["train_data"] == "oss://***@bucket/train"


def test_markers_round_trip_atomically(tmp_path):
    path = str(tmp_path / "_PUBLISHED.json")
    assert export.read_marker(path) is None
    export.write_marker(path, {"version": 2, "uri": "x"})
    export.write_marker(path, {"version": 3, "uri": "y"})
    assert export.read_marker(path) == {"uri": "y", "version": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_PUBLISHED.json"]
