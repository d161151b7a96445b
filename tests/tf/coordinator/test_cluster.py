"""Coordinator mode on real local clusters (chief + 2 PS + 2 workers) through the launcher.

The job is ``coordinator/_job.py``: ``examples/tf_coord_ctr.py`` with real fault injection
(``KT_KILL``, ``KT_STEP_SLEEP``) and a step log in ``<state>/steps.jsonl``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tf._cluster import (
    EXAMPLES,
    JOBS,
    assert_loss_continued,
    launch_on_oss,
    read_jsonl,
    run_cluster,
    runs_by_pid,
    single_process_env,
    tail,
)

EXAMPLE, JOB = EXAMPLES["coordinator"], JOBS["coordinator"]
ROWS, EVAL_ROWS, BUCKETS = 30000, 8000, 2000

pytestmark = [pytest.mark.integration, pytest.mark.timeout(320)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from kubeai_train.testing import ctr

    root = tmp_path_factory.mktemp("coord_cluster")
    ctr.generate_split(ROWS, EVAL_ROWS, root, seed=21, files=4, eval_files=2)
    return root


def _args(data: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "--train-data", str(data / "train"), "--eval-data", str(data / "eval"),
        "--model-repo", str(model_dir.parent / "repo"), "--model-dir", str(model_dir),
        "--result-json", str(model_dir.parent / f"{model_dir.name}.json"),
        "--hash-buckets", str(BUCKETS), "--log-steps", "5", *extra,  # a later --log-steps wins
    ]  # fmt: skip


def _cluster(data: Path, model_dir: Path, *extra: str, env=None, timeout: float = 200):
    res = run_cluster(
        JOB,
        _args(data, model_dir, *extra),
        env=env,
        timeout=timeout,
        restart_policy="ExitCode",
        backoff_limit=4,
        log_dir=model_dir.parent / f"{model_dir.name}-logs",
    )
    result = json.loads((model_dir.parent / f"{model_dir.name}.json").read_text())
    return res, result


def _steps(model_dir: Path) -> list[dict]:
    return read_jsonl(model_dir / "steps.jsonl")


def test_cluster_matches_single_process_places_by_policy_and_exports_exactly(data, tmp_path):
    from kubeai_train.repository import ModelRepository
    from kubeai_train.tf import CtrFeatures, GreedyBytesPlacement
    from kubeai_train.tf.coordinator.models import DeepFMModuleModel
    from kubeai_train.tf.coordinator.placement import infos, snapshot_build

    # the single-process baseline: the same script without a cluster, in its own process
    env = single_process_env()
    base = subprocess.run(
        [sys.executable, str(EXAMPLE), *_args(data, tmp_path / "single")],
        env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert base.returncode == 0, base.stderr[-3000:]
    single = json.loads((tmp_path / "single.json").read_text())

    res, result = _cluster(data, tmp_path / "m", "--placement", "greedy_bytes")
    assert result["role"] == "chief" and result["examples"] == ROWS
    assert abs(result["metrics"]["auc"] - single["metrics"]["auc"]) <= 0.01, (
        result["metrics"],
        single["metrics"],
    )

    # placement: every variable / shard sits on the PS the policy's plan names, and the slots
    # sit with their variables
    placement = json.loads((tmp_path / "m" / "placement.json").read_text())
    assert placement["applied"] and not placement["mismatched"] and placement["warning"] is None
    model = DeepFMModuleModel(features=CtrFeatures(hash_buckets=BUCKETS), learning_rate=0.2)
    partitioner = __import__("tensorflow").distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=256 << 10, max_shards=2
    )
    snap = infos(snapshot_build(model.build, partitioner), 512)
    plan = GreedyBytesPlacement().plan(snap, 2)
    devices = placement["devices"]
    assert set(devices) == set(plan.assignment) and len(placement["slots"]) == len(devices)
    for name, task in plan.assignment.items():
        assert devices[name].startswith(f"/job:ps/replica:0/task:{task}/"), (name, task, devices[name])
    shards = [n for n in devices if n.startswith("emb_v/part_")]
    assert len(shards) == 2 and {devices[n].split("task:")[1][0] for n in shards} == {"0", "1"}
    for var_name, dev in placement["slots"].items():
        assert dev == devices[var_name.split(":")[0]], (var_name, dev)

    # the export, loaded in a fresh process without the training code, predicts exactly
    check = (
        "import sys, numpy as np, tensorflow as tf\n"
        "s = np.load(sys.argv[1], allow_pickle=True)\n"
        "fn = tf.saved_model.load(sys.argv[2]).signatures['serving_default']\n"
        "names = [n for n in s.files if n[0] in 'IC']\n"
        "p = fn(**{n: tf.constant(s[n]) for n in names})['probability'].numpy()\n"
        "assert len(names) == 39 and p.shape == s['__prediction__'].shape, (names, p.shape)\n"
        "print(int(np.array_equal(p, s['__prediction__'])), len(p))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "m" / "eval_sample.npz"), result["export_dir"]],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    same, n = out.stdout.split()[-2:]
    assert same == "1" and int(n) == 2048
    mv = ModelRepository(str(tmp_path / "repo")).get("ctr")
    assert mv.version == result["version"] and mv.metadata["mode"] == "coordinator"
    assert mv.metadata["metrics"]["auc"] == pytest.approx(result["metrics"]["auc"])


def test_worker_killed_mid_run_is_absorbed(data, tmp_path):
    res, result = _cluster(data, tmp_path / "m", env={"KT_KILL": "worker:1:10", "KT_STEP_SLEEP": "0.2"})
    assert (tmp_path / "m" / "killed-worker-1").exists()
    steps = _steps(tmp_path / "m")
    assert max(s["local_step"] for s in steps) > 10  # training went on after the kill
    # every batch completed once (closures lost with the worker ran on the other one); the one
    # step running on the worker when it died may have updated the PS before it died and is run
    # again (ClusterCoordinator re-runs a failed closure: at-least-once for that step)
    assert result["examples"] == ROWS
    assert 0 <= result["global_step"] - result["local_steps"] <= 1, result
    worker1 = next(e for e in res.exits if e.label == "worker:1")
    assert worker1.restarts >= 1
    assert next(e for e in res.exits if e.label == "chief:0").restarts == 0


def test_ps_killed_makes_the_job_restore_from_its_checkpoint(data, tmp_path):
    res, result = _cluster(
        data,
        tmp_path / "m",
        "--checkpoint-steps",
        "20",
        "--log-steps",
        "2",
        env={"KT_KILL": "ps:0:30", "KT_STEP_SLEEP": "0.08"},
        timeout=260,
    )
    chief = next(e for e in res.exits if e.label == "chief:0")
    assert chief.restarts >= 1
    log_text = res.log("chief:0")
    assert "exiting with 138" in log_text
    restored = [int(line.rsplit("global step ", 1)[1].rstrip(")")) for line in log_text.splitlines()
                if " restored " in line and "ckpt-" in line]  # fmt: skip
    assert restored and restored[-1] >= 20
    steps = _steps(tmp_path / "m")
    runs = runs_by_pid(steps)
    assert len(runs) >= 2
    after = runs[-1]
    # the restarted chief continued from the checkpoint's step with a trained model's loss
    assert after[0]["global_step"] == restored[-1] + after[0]["local_step"]
    assert_loss_continued(runs[0], after)
    # and read exactly the rows the checkpoint had not seen: 512-row batches before it
    assert result["examples"] + 512 * restored[-1] == ROWS
    assert result["global_step"] == restored[-1] + result["local_steps"]


def test_native_files_are_read_on_the_workers(data, tmp_path):
    from kubeai_train.tf import CtrFeatures
    from kubeai_train.tf.coordinator.input import write_native
    from kubeai_train.tf.coordinator.models import DeepFMModuleModel

    model = DeepFMModuleModel(features=CtrFeatures(hash_buckets=BUCKETS))
    kinds = {**model.raw_features(), "label": "int64"}
    write_native(str(data / "train"), str(tmp_path / "tfr"), kinds, fmt="tfrecord", files=4)
    res, result = _cluster(data, tmp_path / "m", "--input", "workers", "--native-data", str(tmp_path / "tfr"))
    assert result["examples"] == ROWS and result["global_step"] == result["local_steps"]
    assert result["metrics"]["auc"] > 0.6
    log_text = res.log("chief:0")
    assert "native input: 4 tfrecord files, rows per worker [15000, 15000]" in log_text


def test_model_dir_on_oss_ps_killed_restores_from_the_object_store(data, tmp_path, monkeypatch):
    """model_dir and the repository on oss:// (the local OSS server), which TensorFlow cannot
    write: the chief checkpoints through its staging; a PS is killed, the chief exits 138, the job
    restores from the object store, finishes, exports and publishes there."""
    import fsspec
    import tensorflow as tf

    from kubeai_train.repository import ModelRepository
    from kubeai_train.testing.oss_server import OSSServer

    state = tmp_path / "state"
    with OSSServer(tmp_path / "oss", buckets=["jobs"]) as server:
        args = [
            "--train-data", str(data / "train"), "--eval-data", str(data / "eval"),
            "--model-repo", "oss://jobs/repo", "--model-dir", "oss://jobs/ctr",
            "--result-json", str(tmp_path / "result.json"), "--hash-buckets", str(BUCKETS),
            "--log-steps", "2", "--checkpoint-steps", "20",
        ]  # fmt: skip
        res, env = launch_on_oss(
            server,
            monkeypatch,
            JOB,
            args,
            env={"KT_STATE_DIR": str(state), "KT_KILL": "ps:0:30", "KT_STEP_SLEEP": "0.04"},
            timeout=150,
        )
        assert res.returncode == 0, tail(res.output)
        assert env["OSS_ACCESS_KEY_SECRET"] not in res.output
        assert "ps:0 exited with code 137; restarting" in res.output, tail(res.output)
        assert "chief:0 exited with code 138; restarting" in res.output, tail(res.output)
        restored = re.findall(
            r"\[chief 0\] restored oss://jobs/ctr/ckpt/ckpt-(\d+) \(global step (\d+)\)", res.output
        )
        assert restored and restored[-1][0] == restored[-1][1], tail(res.output)
        ckpt_step = int(restored[-1][0])
        assert ckpt_step >= 20
        result = json.loads((tmp_path / "result.json").read_text())
        # the restarted chief read exactly the rows its checkpoint had not seen
        assert result["examples"] + 512 * ckpt_step == ROWS
        assert result["global_step"] == ckpt_step + result["local_steps"]
        steps = _steps(state)
        runs = runs_by_pid(steps)
        assert len(runs) >= 2
        assert_loss_continued(runs[0], runs[-1])

        fs = fsspec.filesystem("oss", **server.storage_options())  # this server (instances are cached)
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls("jobs/ctr", detail=False)}
        assert {"ckpt", "export", "_TRAINED.json", "_PUBLISHED.json", "_COORD_DONE.json", "placement.json",
                "eval_sample.npz"} <= names  # fmt: skip
        assert fs.exists("jobs/ctr/export/saved_model.pb")
        # the final checkpoint: one data file per task holding variables (2 PS and the chief),
        # all written by the chief; a downloaded copy is an ordinary CheckpointManager directory
        final = result["checkpoint"].rsplit("/", 1)[-1]
        ckpt_files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("jobs/ctr/ckpt", detail=False))
        mine = [n for n in ckpt_files if n.startswith(final + ".")]
        assert mine == [f"{final}.data-0000{i}-of-00003" for i in range(3)] + [f"{final}.index"]
        assert len([n for n in ckpt_files if n.endswith(".index")]) <= 3  # max_to_keep
        local = tmp_path / "ckpt"
        fs.get("jobs/ctr/ckpt", str(local), recursive=True)
        assert tf.train.latest_checkpoint(str(local)) == str(local / final)
        keys = {k for k, _ in tf.train.list_variables(str(local / final))}
        assert {"step/.ATTRIBUTES/VARIABLE_VALUE", "data/.ATTRIBUTES/VARIABLE_VALUE"} <= keys
        mv = ModelRepository("oss://jobs/repo").get("ctr")
        assert (
            mv.version == result["version"] == 1
            and mv.metadata["lineage"]["checkpoint"] == result["checkpoint"]
        )
        assert env["OSS_ACCESS_KEY_SECRET"] not in json.dumps(mv.metadata)
