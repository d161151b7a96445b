"""Two-rank jobs through the real launcher, reader and repository (one cluster at a time)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from kubeai_train.launch import run_processes
from kubeai_train.repository import ModelRepository
from kubeai_train.testing import ctr
from kubeai_train.torch.checkpoint import CheckpointStore
from kubeai_train.torch.types import RETRYABLE_EXIT_CODE

from ._helpers import ctr_columns, write_parquet

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "torch_ddp_ctr.py"
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ctr_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctr")
    report = ctr.generate_split(16000, 4000, out, seed=3, files=4)
    return {"train": str(out / "train"), "eval": str(out / "eval"), "report": report}


def example_args(d, repo, model_dir, batch_size, *extra):
    return [
        "--train-data", d["train"], "--eval-data", d["eval"], "--model-repo", str(repo),
        "--model-dir", str(model_dir), "--epochs", "2", "--batch-size", str(batch_size),
        "--hash-buckets", "2000", "--embedding-dim", "8", "--dense-lr", "0.01", "--sparse-lr", "0.003",
        "--checkpoint-steps", "20", "--log-steps", "10", "--timeout", "60", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_rank_run(ctr_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    args = example_args(
        ctr_data, tmp / "repo", tmp / "model", 256,
        "--result-json", str(tmp / "result.json"), "--predictions-out", str(tmp / "live.npz"),
    )  # fmt: skip
    res = run_processes(EXAMPLE, framework="torch", workers=2, args=args, env=ENV, timeout=240)
    assert res.exit_code == 0
    return {"tmp": tmp, "result": json.loads((tmp / "result.json").read_text()), "job": res}


def test_two_ranks_match_one_process_auc(ctr_data, two_rank_run, tmp_path):
    # the same global batch (2 x 256 = 512), data, epochs and initial weights in one process
    args = example_args(
        ctr_data, tmp_path / "repo", tmp_path / "model", 512, "--result-json", str(tmp_path / "r.json")
    )
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "r.json").read_text())
    two = two_rank_run["result"]
    print(f"AUC one process {one['metrics']['auc']:.4f}, two ranks {two['metrics']['auc']:.4f}, "
          f"true {ctr_data['report']['eval']['true_auc']:.4f}")  # fmt: skip
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["rows"] == one["rows"] == 2 * 16000 and two["eval_rows"] == one["eval_rows"] == 4000
    assert one["metrics"]["auc"] > 0.68  # the true probabilities score about 0.82
    assert abs(two["metrics"]["auc"] - one["metrics"]["auc"]) <= 0.01


def test_published_version_has_metrics_and_lineage(ctr_data, two_rank_run):
    result = two_rank_run["result"]
    mv = ModelRepository(str(two_rank_run["tmp"] / "repo")).get("ctr")
    assert mv.version == result["version"] == 1
    meta = mv.metadata
    assert meta["framework"] == "torch"
    assert meta["metrics"]["auc"] == pytest.approx(result["metrics"]["auc"])
    assert math.isfinite(meta["metrics"]["logloss"])
    assert meta["lineage"]["world_size"] == 2 and meta["lineage"]["eval_data"] == ctr_data["eval"]
    assert meta["features"]["hash"] == "fnv1a64-utf8" and meta["signature"]["format"] == "torchscript"
    tb = two_rank_run["tmp"] / "model" / "tensorboard"
    assert list(tb.glob("events.out.tfevents.*"))
    tags = {json.loads(line)["tag"] for line in (tb / "metrics.jsonl").read_text().splitlines()}
    assert {"train/loss", "eval/auc"} <= tags


def test_exported_model_in_fresh_process_predicts_exactly_the_live_model(two_rank_run):
    model_dir = ModelRepository(str(two_rank_run["tmp"] / "repo")).get("ctr").uri
    code = textwrap.dedent(
        f"""
        import sys, numpy as np, torch
        d = np.load({str(two_rank_run["tmp"] / "live.npz")!r})
        program = torch.jit.load({str(Path(model_dir) / "model.pt")!r})
        with torch.no_grad():
            p = program(torch.from_numpy(d["ids"]), torch.from_numpy(d["dense"])).numpy()
        assert not [m for m in sys.modules if m.startswith("kubeai_train")], "training code imported"
        print(len(p), int((p == d["predictions"]).sum()))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **ENV}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, equal = map(int, proc.stdout.split())
    assert n == 256 and equal == 256


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    write_parquet(root / "rank0", ctr_columns(3000, seed=5), files=3, row_group=128)
    write_parquet(root / "rank1", ctr_columns(730, seed=6), files=2, row_group=128)
    return root


def test_uneven_shards_finish_in_sync_without_lost_rows(uneven_data, tmp_path):
    # rank 0: 30 batches an epoch, rank 1: 8 (the last one short). Stopped at step 12 (rank 1
    # already past its share of epoch 0, in shadow steps), then resumed to the end.
    kw = {
        "data_root": str(uneven_data),
        "epochs": 2,
        "num_workers": 0,
        "checkpoint_dir": str(tmp_path / "ck"),
    }
    first = run_processes(
        "tests.torch._jobs:uneven", kwargs={**kw, "max_steps": 12}, env=ENV, timeout=180
    ).results
    assert first["master:0"]["rows_per_rank"] == [1200, 730]
    assert first["master:0"]["model"] == first["worker:0"]["model"]
    second = run_processes(
        "tests.torch._jobs:uneven", kwargs={**kw, "max_steps": None}, env=ENV, timeout=180
    ).results
    r0, r1 = second["master:0"], second["worker:0"]
    assert r0["resumed_from"] == r1["resumed_from"] == 12
    # nothing dropped, nothing repeated, nobody hung: both epochs of both shards
    assert r0["rows_per_rank"] == r1["rows_per_rank"] == [6000, 1460]
    assert r0["steps"] == r1["steps"] == 60
    # replicas and optimizer states identical: shadow steps keep the finished rank in lockstep
    assert r0["model"] == r1["model"] and r0["optimizer"] == r1["optimizer"]


def test_hung_peer_is_an_error_on_the_survivor(tmp_path):
    t0 = time.monotonic()
    res = run_processes(
        "tests.torch._jobs:hung_peer", kwargs={"timeout_s": 4}, env=ENV, timeout=120, check=False
    )
    took = time.monotonic() - t0
    master = next(e for e in res.exits if e.label == "master:0")
    assert master.exit_code == RETRYABLE_EXIT_CODE
    assert res.exit_code == RETRYABLE_EXIT_CODE
    log = res.log("master:0")
    assert "second all_reduce failed, a peer died or hangs" in log and "retryable code 143" in log
    assert took < 90


def _kill_rank_when_checkpointed(model_dir: Path, rank: int, min_step: int, killed: dict) -> None:
    store_dir = model_dir / "checkpoints"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        latest = store_dir / "LATEST"
        if latest.exists() and int(latest.read_text().removeprefix("step-")) >= min_step:
            for p in psutil.Process().children(recursive=True):
                try:
                    if "torch_ddp_ctr.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                        killed["step"] = int(latest.read_text().removeprefix("step-"))
                        p.send_signal(signal.SIGKILL)
                        killed["pid"] = p.pid
                        return
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        time.sleep(0.05)


@pytest.mark.parametrize("assignment", ["static", "dynamic"])
def test_killed_rank_restarts_job_which_resumes_from_checkpoint(ctr_data, tmp_path, assignment):
    model_dir = tmp_path / "model"
    args = example_args(
        ctr_data, tmp_path / "repo", model_dir, 64, "--result-json", str(tmp_path / "r.json"),
        "--assignment", assignment,
    )  # fmt: skip
    args[args.index("--checkpoint-steps") + 1] = "25"
    killed: dict = {}
    killer = threading.Thread(
        target=_kill_rank_when_checkpointed, args=(model_dir, 1, 50, killed), daemon=True
    )
    killer.start()
    res = run_processes(
        EXAMPLE, framework="torch", workers=2, args=args, env=ENV, timeout=300,
        restart_policy="ExitCode", backoff_limit=4,
    )  # fmt: skip
    killer.join(timeout=5)
    assert "pid" in killed, "the job ended before a checkpoint at step >= 50 was written"
    exits = {e.label: e for e in res.exits}
    assert exits["worker:0"].restarts >= 1  # killed by SIGKILL (137): retryable
    assert exits["master:0"].restarts >= 1  # its peer vanished: exit 143, retryable
    assert "retryable code 143" in res.log("master:0")
    result = json.loads((tmp_path / "r.json").read_text())
    # resumed from a checkpoint at or after the kill point, and every row trained exactly
    # once counting from that checkpoint: 2 epochs x 16000 rows, 250 steps of 2 x 64 rows
    assert result["resumed_from"] is not None and result["resumed_from"] >= killed["step"]
    assert result["rows"] == 32000
    if assignment == "static":
        assert result["steps"] == 250
    else:  # shares follow the ranks' speed: as many steps as the larger share's batches
        assert 250 <= result["steps"] <= 270
    assert CheckpointStore(str(model_dir / "checkpoints")).latest_step() == result["steps"]
    assert result["metrics"]["auc"] > 0.65


def test_plain_torchrun(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(Path(__file__).with_name("_torchrun_job.py")), str(tmp_path)],
        env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert results == [
        {"rank": 0, "world": 2, "local_rank": 0, "sum": 3.0},
        {"rank": 1, "world": 2, "local_rank": 1, "sum": 3.0},
    ]
