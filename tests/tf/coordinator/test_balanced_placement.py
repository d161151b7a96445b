"""``--placement balanced`` on a real local coordinator-mode cluster (chief + 2 workers + 2 PS).

Run as a script, this file is the job: a :class:`~kubeai_train.tf.coordinator.TablesModel` with
four tables of unequal sizes (the shape that makes round-robin unbalanced) trained by
``kubeai_train.tf.coordinator.run`` with the placement policy ``--placement`` names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import pytest

TABLES = {"C1": 8000, "C2": 3000, "C3": 600, "C4": 120}
ROWS, EVAL_ROWS, BATCH = 6000, 1000, 256


def _job_main(argv: list[str]) -> int:
    from kubeai_train import tf as ktf
    from kubeai_train.tf import coordinator

    p = argparse.ArgumentParser()
    for name in ("--train-data", "--eval-data", "--model-repo", "--model-dir", "--result-json"):
        p.add_argument(name, required=True)
    p.add_argument("--placement", default="balanced")
    args = p.parse_args(argv)
    config = ktf.TrainConfig(
        model_dir=args.model_dir,
        train_data=args.train_data,
        eval_data=args.eval_data,
        batch_size=BATCH,
        log_steps=5,
        shuffle=False,
        model_repo=args.model_repo,
        model_name="tables",
        eval_predictions=16,
    )
    model = coordinator.TablesModel(TABLES, learning_rate=0.1)
    result = coordinator.run(model, config, placement=args.placement)
    if result.role == "chief":
        with open(args.result_json, "w") as f:
            json.dump(result.__dict__, f, default=str)
    return 0


pytestmark = [pytest.mark.integration, pytest.mark.timeout(500)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from kubeai_train.testing import ctr

    root = tmp_path_factory.mktemp("balanced")
    ctr.generate_split(ROWS, EVAL_ROWS, root, seed=5, files=2, eval_files=1)
    return root


def _cluster(data: Path, out: Path, placement: str) -> dict:
    from kubeai_train.launch import run_processes

    model_dir = out / placement
    result_json = out / f"{placement}.json"
    args = [
        "--train-data", str(data / "train"), "--eval-data", str(data / "eval"),
        "--model-repo", str(out / f"repo-{placement}"), "--model-dir", str(model_dir),
        "--result-json", str(result_json), "--placement", placement,
    ]  # fmt: skip
    run_processes(
        Path(__file__),
        framework="tf",
        workers=2,
        ps=2,
        args=args,
        env={"TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=220,
        log_dir=out / f"{placement}-logs",
    )
    return json.loads(result_json.read_text())


def _ratio(values: list[float]) -> float:
    return max(values) / (sum(values) / len(values))


def test_balanced_plan_is_applied_measured_and_beats_round_robin(data, tmp_path):
    import tensorflow as tf

    from kubeai_train.repository import ModelRepository
    from kubeai_train.tf.balanced import BalancedPlacement
    from kubeai_train.tf.coordinator import TablesModel
    from kubeai_train.tf.coordinator.balanced import PlanPartitioner, plan_build

    balanced = _cluster(data, tmp_path, "balanced")
    assert balanced["role"] == "chief" and balanced["examples"] == ROWS
    assert math.isfinite(balanced["metrics"]["logloss"]), balanced["metrics"]  # it trained, no NaN
    report = json.loads((tmp_path / "balanced" / "placement.json").read_text())
    assert report["policy"] == "balanced" and report["num_ps"] == 2
    assert report["applied"] and not report["mismatched"] and report["warning"] is None

    # the plan this process computes for the same model is the one the chief applied
    # (deterministic), and every variable / shard really sits on the PS the plan names
    planned, plan, bplan = plan_build(
        TablesModel(TABLES).build, BalancedPlacement(), PlanPartitioner(), 2, BATCH
    )
    assert report["shard_counts"] == bplan.shard_counts()
    assert bplan.shard_counts()["emb_C1"] == 2  # the big table is cut; round-robin would not cut it
    devices = report["devices"]
    assert set(devices) == set(plan.assignment)
    for name, task in plan.assignment.items():
        spec = tf.DeviceSpec.from_string(devices[name])
        assert (spec.job, spec.task) == ("ps", task), (name, task, devices[name])
    shapes = {p.name: p.shape for p in planned}
    assert shapes["emb_C1/part_0"] == (4000, 8) and shapes["emb_C1/part_1"] == (4000, 8)
    for var, dev in report["slots"].items():  # optimizer slots sit with their variables
        assert dev == devices[var.split(":")[0]], (var, dev)

    # measured per-PS load: resident bytes of the real variables (slots and step counter
    # included) add up to the model's, and the per-step traffic was counted over every step
    ps = report["ps"]
    assert [e["task"] for e in ps] == [0, 1]
    total = sum(r * 8 * 4 * 2 for r in TABLES.values())  # tables + their Adagrad accumulators
    total += 2 * 4 * (33 * 64 + 64 + 64 + 1) + 8  # MLP (+ accumulators) and the step counter
    assert sum(e["measured_bytes"] for e in ps) == total
    assert report["measured"]["steps"] == balanced["local_steps"] > 0
    assert all(e["measured_traffic"] > 0 and e["planned_traffic"] > 0 for e in ps)

    # the same model and data under round-robin: balanced is no worse in either dimension
    rr = _cluster(data, tmp_path, "round_robin")
    rr_report = json.loads((tmp_path / "round_robin" / "placement.json").read_text())
    assert rr["examples"] == ROWS and rr_report["applied"]
    assert sum(e["measured_bytes"] for e in rr_report["ps"]) == total
    got = {k: _ratio([e[f"measured_{k}"] for e in ps]) for k in ("bytes", "traffic")}
    base = {k: _ratio([e[f"measured_{k}"] for e in rr_report["ps"]]) for k in ("bytes", "traffic")}
    print("max/mean measured: balanced", got, "round_robin", base)
    assert got["bytes"] <= base["bytes"] and got["traffic"] <= base["traffic"], (got, base)
    assert got["bytes"] <= 1.05, got

    # the published version carries the report under "placement"
    mv = ModelRepository(str(tmp_path / "repo-balanced")).get("tables")
    meta = mv.metadata["placement"]
    assert meta["policy"] == "balanced" and meta["num_ps"] == 2
    assert [set(e) for e in meta["ps"]] == [
        {"task", "planned_bytes", "planned_traffic", "measured_bytes", "measured_traffic"}
    ] * 2
    assert [e["measured_bytes"] for e in meta["ps"]] == [e["measured_bytes"] for e in ps]


if __name__ == "__main__":
    code = _job_main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
