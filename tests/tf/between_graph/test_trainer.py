"""Between-graph PS training on real local clusters (chief, 2 PS, 2 workers) under the launcher.

One cluster at a time, each with a hard timeout. Faults are real SIGKILLs (see between_graph/_job.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kubeai_train import data
from kubeai_train.repository import ModelRepository
from tests.tf._cluster import (
    EXAMPLES,
    JOBS,
    RESTART,
    ROOT,
    ROUNDS,
    assert_loss_continued,
    free_port,
    launch,
    launch_on_oss,
    read_jsonl,
    runs_by_pid,
    single_process_env,
    small_args,
    tail,
)

EXAMPLE, JOB = EXAMPLES["between_graph"], JOBS["between_graph"]

pytestmark = pytest.mark.integration

FRESH_PREDICT = r"""
import sys, numpy as np, tensorflow as tf
export, sample = sys.argv[1], sys.argv[2]
d = np.load(sample, allow_pickle=True)
with tf.compat.v1.Session(graph=tf.Graph()) as s:
    meta = tf.compat.v1.saved_model.loader.load(s, ["serve"], export)
    sig = meta.signature_def["serving_default"]
    feed = {sig.inputs[k].name: d[k] for k in sig.inputs}
    p = s.run(sig.outputs["probability"].name, feed)
np.save(sys.argv[3], p)
print("modules", sorted(m for m in sys.modules if m.startswith("kubeai")))
"""


def _audit(model_dir: Path) -> dict[int, np.ndarray]:
    out: dict[int, list[np.ndarray]] = {}
    for f in sorted((model_dir / "audit").glob("rank*.npy")):
        rank = int(re.match(r"rank(\d+)-", f.name).group(1))
        out.setdefault(rank, []).append(np.load(f))
    return {r: np.concatenate(v) for r, v in out.items()}


def _rank_rows(uri: str, rank: int, world: int, seed: int = 0) -> set[int]:
    ds = data.read(
        uri, columns=["row_id"], batch_size=8192, rank=rank, world_size=world, shuffle=True, seed=seed
    )
    return set(np.concatenate([b["row_id"] for b in ds]).tolist())


def _faulted(root: Path, model_dir: Path, env: dict[str, str], *extra: str):
    """The fault-injection job (``JOB``) on the small data, restarts on, the repository beside
    ``model_dir``."""
    return launch(
        JOB,
        small_args(root, model_dir.parent / "repo", model_dir, *extra),
        env=env,
        launcher_args=RESTART,
        timeout=240,
    )


def _dies_at_step_20(root: Path, model_dir: Path, who: str, *extra: str):
    """:func:`_faulted` in which process ``who`` (``role:index``) SIGKILLs itself at its 20th
    local step (checkpoints every 20 steps); every trainer audits the rows it reads."""
    return _faulted(
        root,
        model_dir,
        {"KT_DIE": f"{who}:20", "KT_STEP_SLEEP": "0.2"},
        *("--log-steps", "10", "--checkpoint-steps", "20", "--audit-column", "row_id", *extra),
    )


def test_example_end_to_end_matches_single_process(ctr_data, tmp_path):
    root, report = ctr_data
    train, ev = str(root / "train"), str(root / "eval")
    common = [
        "--train-data",
        train,
        "--eval-data",
        ev,
        "--batch-size",
        "512",
        "--epochs",
        "1",
        "--log-steps",
        "50",
        "--checkpoint-steps",
        "100",
    ]
    dist_dir, repo = tmp_path / "dist", tmp_path / "repo"
    res = launch(
        EXAMPLE,
        [
            *common,
            "--model-repo",
            str(repo),
            "--model-dir",
            str(dist_dir),
            "--audit-column",
            "row_id",
            "--result-json",
            str(tmp_path / "dist.json"),
        ],
        timeout=240,
    )
    assert res.returncode == 0, tail(res.output)
    dist = json.loads((tmp_path / "dist.json").read_text())

    # the same model, data and epochs in one process (no TF_CONFIG)
    local = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            *common,
            "--model-repo",
            str(tmp_path / "repo_local"),
            "--model-dir",
            str(tmp_path / "local"),
            "--result-json",
            str(tmp_path / "local.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=single_process_env(),
    )
    assert local.returncode == 0, tail(local.stdout + local.stderr)
    single = json.loads((tmp_path / "local.json").read_text())
    print(
        f"eval AUC: distributed {dist['metrics']['auc']:.4f}, single process {single['metrics']['auc']:.4f}, "
        f"true-probability ceiling {report['eval']['true_auc']:.4f}"
    )
    assert abs(dist["metrics"]["auc"] - single["metrics"]["auc"]) <= 0.01
    assert dist["metrics"]["auc"] > 0.65

    # published with metrics and lineage
    mv = ModelRepository(str(repo)).get("ctr")
    assert mv.version == dist["version"] == 1
    assert mv.metadata["metrics"]["auc"] == pytest.approx(dist["metrics"]["auc"])
    assert set(mv.metadata["metrics"]) == {"auc", "logloss"}
    lineage = mv.metadata["lineage"]
    assert lineage["train_data"] == train and lineage["checkpoint"] == dist["checkpoint"]
    assert lineage["params"]["model"] == "DeepFM" and lineage["cluster"] == {"chief": 1, "worker": 2, "ps": 2}
    assert mv.metadata["dataset"]["uri"] == train and mv.metadata["params"]["model"] == "DeepFM"
    assert (
        mv.metadata["signature"]["inputs"]["C1"] == "string"
        and mv.metadata["signature"]["inputs"]["I1"] == "float32"
    )

    # embeddings spread over both PS (the example's default balanced placement decides which
    # table or shard goes where), as the placement report and the graph devices say
    placement = json.loads((dist_dir / "placement.json").read_text())
    assert placement["policy"] == "balanced", placement["policy"]
    used = set()
    for table in ("deepfm/emb_v", "deepfm/emb_w"):
        shards = placement["groups"][table]["shards"]
        used |= set(shards.values())
        for name, task in shards.items():
            assert placement["devices"][name].endswith(f"/job:ps/task:{task}")
    assert used == {0, 1}, placement["groups"]
    assert all(p["bytes"] > 0 for p in placement["ps"])

    # every trainer read its own rows, each exactly once in the epoch, and together all rows
    audit = _audit(dist_dir)
    assert sorted(audit) == [0, 1, 2]
    for rank, rows in audit.items():
        assert len(rows) == len(set(rows.tolist())), f"rank {rank} read a row twice"
        assert set(rows.tolist()) == _rank_rows(train, rank, 3)
    assert sorted(np.concatenate(list(audit.values())).tolist()) == list(range(150_000))
    trained = json.loads((dist_dir / "_TRAINED.json").read_text())
    assert trained["global_step"] == sum(math.ceil(len(r) / 512) for r in audit.values())

    # the SavedModel, loaded in a fresh process without the training code, predicts exactly the same
    out = tmp_path / "fresh.npy"
    check = subprocess.run(
        [sys.executable, "-c", FRESH_PREDICT, str(mv.uri), str(dist_dir / "eval_sample.npz"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert "modules []" in check.stdout
    expected = np.load(dist_dir / "eval_sample.npz", allow_pickle=True)["__prediction__"]
    assert len(expected) == 2048
    np.testing.assert_array_equal(np.load(out), expected)


def test_worker_killed_mid_run_rejoins_and_the_job_finishes(ctr_small, tmp_path):
    root, _ = ctr_small
    model_dir = tmp_path / "m"
    res = _dies_at_step_20(root, model_dir, "worker:0")
    assert res.returncode == 0, tail(res.output)
    assert "worker:0 exited with code 137; restarting" in res.output
    assert (model_dir / "died-worker-0").exists()
    # the restarted worker resumed after its last applied batch: 20 steps x 256 rows
    assert re.search(
        r'\[worker 0\] ready in [\d.]+ s \(chief initialised\); position \{"data": \{[^}]*"rows": 5120',
        res.output,
    ), tail(res.output)
    # the chief finished its own share first and waited for the late worker
    assert re.search(r"\[chief 0\] all workers done \(waited", res.output)
    audit = _audit(model_dir)
    allrows = np.concatenate(list(audit.values()))
    assert sorted(allrows.tolist()) == list(range(40_000)), "rows lost or read twice across the kill"
    trained = json.loads((model_dir / "_TRAINED.json").read_text())
    assert trained["global_step"] == sum(math.ceil(len(r) / 256) for r in audit.values())


def test_chief_killed_restarts_on_the_live_model_and_the_job_finishes(ctr_small, tmp_path):
    root, _ = ctr_small
    model_dir = tmp_path / "m"
    res = _dies_at_step_20(root, model_dir, "chief:0")
    assert res.returncode == 0, tail(res.output)
    assert "chief:0 exited with code 137; restarting" in res.output
    # the PS still hold the model, fresher than any checkpoint: the new chief keeps it
    assert re.search(
        r'\[chief 0\] ready in [\d.]+ s \(live\); position \{"data": \{[^}]*"rows": 5120', res.output
    ), tail(res.output)
    allrows = np.concatenate(list(_audit(model_dir).values()))
    assert sorted(allrows.tolist()) == list(range(40_000))


@pytest.mark.parametrize("who", ["worker:0", "chief:0"])
def test_dynamic_assignment_survives_a_killed_worker_or_chief(ctr_small, tmp_path, who):
    # the chief hosts the dispatcher: killed, it comes back from its position (which holds the
    # dispatcher's state of its last step) under workers that read on; a killed worker comes
    # back from its position to a live dispatcher. Either way every row is trained once
    root, _ = ctr_small
    model_dir = tmp_path / "m"
    res = _dies_at_step_20(root, model_dir, who, "--assignment", "dynamic")
    assert res.returncode == 0, tail(res.output)
    assert f"{who} exited with code 137; restarting" in res.output
    if who == "chief:0":  # the live worker told the restored dispatcher what it holds
        assert "was restored (its chief restarted)" in res.output, tail(res.output)
    allrows = np.concatenate(list(_audit(model_dir).values()))
    assert len(allrows) == 40_000, "rows lost or read twice across the kill"
    assert sorted(allrows.tolist()) == list(range(40_000))


def test_ps_killed_job_restores_checkpoint_and_loss_continues(ctr_small, tmp_path):
    root, _ = ctr_small
    model_dir = tmp_path / "m"
    res = _faulted(
        root,
        model_dir,
        {"KT_KILL_PS": "1:30", "KT_STEP_SLEEP": "0.04"},
        "--log-steps",
        "2",
        "--checkpoint-steps",
        "20",
    )
    assert res.returncode == 0, tail(res.output)
    assert "ps:1 exited with code 137; restarting" in res.output
    assert "chief:0 exited with code 138; restarting" in res.output
    restored = re.search(r"\[chief 0\] restored \S+model\.ckpt-(\d+)", res.output)
    assert restored, tail(res.output)
    ckpt_step = int(restored.group(1))
    assert ckpt_step >= 20
    steps = read_jsonl(model_dir / "steps.jsonl")
    chief = [s for s in steps if s["role"] == "chief"]
    runs = runs_by_pid(chief)
    assert len(runs) == 2, "the chief should have run twice (before and after the PS loss)"
    before, after = runs
    # training continued from the checkpoint: global steps past it, losses below the first run's
    assert after[0]["global_step"] > ckpt_step
    assert_loss_continued(before, after)
    assert json.loads((model_dir / "_PUBLISHED.json").read_text())["version"] == 1


def test_model_dir_on_oss_ps_killed_restores_from_the_object_store(ctr_small, tmp_path, monkeypatch):
    """model_dir and the repository on oss:// (the local OSS server): TensorFlow cannot write
    there, so the chief checkpoints part by part through staging; a PS is killed and the job
    restores from the object store and finishes."""
    import fsspec

    from kubeai_train.testing.oss_server import OSSServer

    root, _ = ctr_small
    state = tmp_path / "state"
    with OSSServer(tmp_path / "oss", buckets=["jobs"]) as server:
        res, env = launch_on_oss(
            server,
            monkeypatch,
            JOB,
            small_args(
                root, "oss://jobs/repo", "oss://jobs/ctr", "--log-steps", "2", "--checkpoint-steps", "20"
            ),
            env={"KT_STATE_DIR": str(state), "KT_KILL_PS": "1:30", "KT_STEP_SLEEP": "0.04"},
            timeout=240,
        )
        assert res.returncode == 0, tail(res.output)
        assert env["OSS_ACCESS_KEY_SECRET"] not in res.output
        assert "ps:1 exited with code 137; restarting" in res.output
        assert "chief:0 exited with code 138; restarting" in res.output
        restored = re.search(r"\[chief 0\] restored oss://jobs/ctr/model\.ckpt-(\d+)", res.output)
        assert restored, tail(res.output)
        ckpt_step = int(restored.group(1))
        steps = read_jsonl(state / "steps.jsonl")
        chief = [s for s in steps if s["role"] == "chief"]
        runs = runs_by_pid(chief)
        assert len(runs) == 2
        before, after = runs
        assert after[0]["global_step"] > ckpt_step >= 20
        assert_loss_continued(before, after)

        fs = fsspec.filesystem("oss")
        names = {p.rsplit("/", 1)[-1] for p in fs.ls("jobs/ctr", detail=False)}
        assert {
            "checkpoint",
            "_TRAINED.json",
            "_PUBLISHED.json",
            "placement.json",
            "eval_sample.npz",
        } <= names
        assert any(n.startswith("events.out.tfevents.") for n in names)
        assert fs.exists("jobs/ctr/export/saved_model.pb")
        # the final checkpoint is a standard TF checkpoint: one data file per PS, tables whole
        trained = json.loads(fs.cat_file("jobs/ctr/_TRAINED.json"))
        final = trained["checkpoint"].rsplit("/", 1)[-1]
        files = sorted(n for n in names if n.startswith(final + "."))
        assert files == [f"{final}.data-00000-of-00002", f"{final}.data-00001-of-00002", f"{final}.index"]
        local = tmp_path / "final"
        local.mkdir()
        for n in files:
            fs.get_file(f"jobs/ctr/{n}", str(local / n))
        shapes = dict(tf_list_variables(str(local / final)))
        assert shapes["deepfm/emb_v"][0] == shapes["deepfm/emb_w"][0] > 1000
        assert "kubeai/data_state_0" in shapes and "global_step" in shapes
        mv = ModelRepository("oss://jobs/repo").get("ctr")
        assert mv.version == 1 and mv.metadata["lineage"]["checkpoint"] == trained["checkpoint"]


def tf_list_variables(prefix: str) -> list[tuple[str, list[int]]]:
    import tensorflow as tf

    return tf.train.list_variables(prefix)


def test_twenty_startups_back_to_back_never_hang(tmp_path):
    """20 complete jobs in a row on one launched cluster (chief, 2 PS, 2 workers), each a full
    start-up and shutdown in its own PS resource container (see _rounds.py)."""
    from kubeai_train.testing import ctr

    ctr.generate(3000, tmp_path / "d", seed=3, files=2)
    n = int(os.environ.get("KT_STARTUPS", "20"))
    res = launch(
        ROUNDS,
        ["--train-data", str(tmp_path / "d"), "--root", str(tmp_path), "--rounds", str(n)],
        timeout=300,
    )
    assert res.returncode == 0, tail(res.output)
    rounds = read_jsonl(tmp_path / "rounds.jsonl")
    trainers = [r for r in rounds if r["role"] != "ps"]
    assert len(trainers) == 3 * n
    # every PS finished every round; in the last one the launcher may stop a PS (chief done = job
    # done, PS never exit on their own) before it has seen its done flag and written its line
    ps_rounds = {(r["index"], r["round"]) for r in rounds if r["role"] == "ps"}
    assert {(i, k) for i in (0, 1) for k in range(n - 1)} <= ps_rounds
    per_round = {}
    for r in trainers:
        per_round.setdefault(r["round"], []).append(r)
    for k in range(n):
        assert sorted(r["steps"] for r in per_round[k]) == [4, 4, 4], f"round {k}: {per_round[k]}"
        chief = next(r for r in per_round[k] if r["role"] == "chief")
        assert chief["global_step"] == 12  # every trainer's steps landed in this round's variables
    longest = max(r["seconds"] for r in rounds)
    print(
        f"{n} start-ups in {res.seconds:.1f} s (launch included); per round max {longest:.2f} s, "
        f"readiness wait max {max(r['ready'] for r in trainers):.2f} s"
    )
    assert max(r["ready"] for r in trainers) < 20, (
        "a trainer waited as long as SessionManager's 30 s interval"
    )


def test_sync_replicas_stop_together_at_max_steps(ctr_small, tmp_path):
    root, _ = ctr_small
    model_dir = tmp_path / "m"
    res = launch(
        EXAMPLE,
        [
            *small_args(root, tmp_path / "repo", model_dir),
            "--sync",
            "--max-steps",
            "30",
            "--epochs",
            "5",
            "--log-steps",
            "10",
        ],
        timeout=240,
    )
    assert res.returncode == 0, tail(res.output)
    trained = json.loads((model_dir / "_TRAINED.json").read_text())
    # one global step per aggregated update of all 3 replicas, stopped at max_steps
    assert 30 <= trained["global_step"] <= 32, (trained, tail(res.output))
    assert "Object was never used" not in res.output
    assert (model_dir / "_PUBLISHED.json").exists()


def test_sync_backup_worker_leaves_a_straggler_behind_and_every_process_exits(ctr_small, tmp_path):
    """sync + backup_workers=1: each step aggregates 2 of the 3 replicas, so a straggler (worker 1,
    1 s per step) does not hold the others back; at max_steps the chief closes the token queue and
    the straggler, waiting for a token, finishes by itself (the launcher stops nobody)."""
    root, _ = ctr_small
    model_dir = tmp_path / "m"
    res = launch(
        JOB,
        [
            *small_args(root, tmp_path / "repo", model_dir),
            "--sync",
            "--backup-workers",
            "1",
            "--max-steps",
            "30",
            "--epochs",
            "5",
            "--log-steps",
            "1",
        ],
        env={"KT_SLOW": "worker:1:1.0"},
        timeout=240,
    )
    assert res.returncode == 0, tail(res.output)
    assert "success grace period" not in res.output, tail(res.output)
    assert "[worker 1] done:" in res.output and "[worker 0] done:" in res.output
    trained = json.loads((model_dir / "_TRAINED.json").read_text())
    assert 30 <= trained["global_step"] <= 32, (trained, tail(res.output))
    steps = read_jsonl(model_dir / "steps.jsonl")
    last = {(s["role"], s["index"]): s["local_step"] for s in steps}
    fast = min(last[("chief", 0)], last[("worker", 0)])
    assert last[("worker", 1)] * 2 < fast, last


def test_worker_without_a_chief_fails_with_a_clear_timeout(ctr_small, tmp_path):
    root, _ = ctr_small
    cluster = {
        "chief": [f"127.0.0.1:{free_port()}"],
        "ps": [f"127.0.0.1:{free_port()}"],
        "worker": [f"127.0.0.1:{free_port()}"],
    }
    args = [
        sys.executable,
        str(EXAMPLE),
        "--train-data",
        str(root / "train"),
        "--eval-data",
        str(root / "eval"),
        "--model-repo",
        str(tmp_path / "repo"),
        "--model-dir",
        str(tmp_path / "m"),
        "--ready-timeout",
        "3",
    ]

    def env(role):
        return {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": role, "index": 0}}),
        }

    ps = subprocess.Popen(args, env=env("ps"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.perf_counter()
        worker = subprocess.run(args, env=env("worker"), capture_output=True, text=True, timeout=120)
        elapsed = time.perf_counter() - t0
    finally:
        ps.kill()
        ps.wait(timeout=30)
    assert worker.returncode != 0
    assert "ReadyTimeoutError" in worker.stderr and "waited ready_timeout=3.0s for the chief" in worker.stderr
    assert "Is the chief running?" in worker.stderr
    assert elapsed < 60
