"""``--placement balanced`` on a real local between-graph cluster (chief + 2 workers + 2 PS).

``examples/tf_ps_ctr.py`` (DeepFM: two shared embedding tables and an MLP, created with
``get_variable``) under the launcher: the tables are cut at the plan's shard counts, every shard
and its slots sit where the plan says, and the chief reports measured per-PS load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "tf_ps_ctr.py"
ROWS, EVAL_ROWS, BUCKETS, BATCH = 6000, 1000, 500, 256

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def test_balanced_plan_is_applied_and_measured_in_between_graph_mode(tmp_path):
    import tensorflow as tf

    from kubeai_train.launch import run_processes
    from kubeai_train.repository import ModelRepository
    from kubeai_train.testing import ctr

    ctr.generate_split(ROWS, EVAL_ROWS, tmp_path / "data", seed=7, files=3, eval_files=1)
    model_dir = tmp_path / "m"
    args = [
        "--train-data", str(tmp_path / "data" / "train"), "--eval-data", str(tmp_path / "data" / "eval"),
        "--model-repo", str(tmp_path / "repo"), "--model-dir", str(model_dir),
        "--result-json", str(tmp_path / "result.json"), "--hash-buckets", str(BUCKETS),
        "--batch-size", str(BATCH), "--log-steps", "5", "--placement", "balanced",
    ]  # fmt: skip
    run_processes(
        EXAMPLE,
        framework="tf",
        workers=2,
        ps=2,
        args=args,
        env={"TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
        log_dir=tmp_path / "logs",
    )
    result = json.loads((tmp_path / "result.json").read_text())
    report = json.loads((model_dir / "placement.json").read_text())
    assert report["policy"] == "balanced" and report["num_ps"] == 2

    # the plan cut the tables (the model asked for fixed_size_partitioner(2) itself; the plan's
    # counts won) and every shard, slot and dense variable is on the PS the plan names
    counts = report["shard_counts"]
    assert counts["deepfm/emb_v"] == 2 and all(c == 1 for n, c in counts.items() if "emb" not in n)
    devices = report["devices"]
    for task, entry in enumerate(report["ps"]):
        for name in entry["variables"]:
            spec = tf.DeviceSpec.from_string(devices[name])
            assert (spec.job, spec.task) == ("ps", task), (name, task, devices[name])
    for name, dev in devices.items():
        if name.endswith("/Adagrad"):
            assert dev == devices[name[: -len("/Adagrad")]], name
    for i in range(2):
        assert f"deepfm/emb_v/part_{i}" in devices

    # measured: resident bytes of every PS variable by its device, traffic counted per step
    ps = report["ps"]
    assert report["measured"]["steps"] > 0
    assert all(e["measured_bytes"] > 0 and e["measured_traffic"] > 0 for e in ps)
    rows = 26 * BUCKETS
    assert sum(e["measured_bytes"] for e in ps) >= 2 * 4 * rows * (8 + 1)  # tables + Adagrad slots
    measured = [e["measured_bytes"] for e in ps]
    assert max(measured) / (sum(measured) / 2) <= 1.10, measured

    mv = ModelRepository(str(tmp_path / "repo")).get("ctr")
    assert mv.version == result["version"]
    meta = mv.metadata["placement"]
    assert meta["policy"] == "balanced"
    assert [e["measured_bytes"] for e in meta["ps"]] == measured
