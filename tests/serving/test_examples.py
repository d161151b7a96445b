"""The example jobs end to end: a distributed job trains, evaluates and publishes; the version it
published, loaded with load_predictor and fed the raw eval rows, reproduces the eval AUC the job
reported (to 4 decimals). One local cluster at a time, each under the launcher with a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubeai_train.serving import load_predictor

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JOBS = {
    # framework: (example, launcher arguments)
    "torch": (ROOT / "examples" / "torch_ddp_ctr.py", ["--framework", "torch", "--workers", "2"]),
    "tf": (ROOT / "examples" / "tf_ps_ctr.py", ["--framework", "tf", "--ps", "1", "--workers", "1"]),
}


def _auc(framework: str, labels, scores) -> float:
    # each trainer's own metric function
    if framework == "torch":
        from kubeai_train.torch import metrics
    else:
        from kubeai_train.tf import metrics
    return metrics.auc(labels, scores)


@pytest.mark.parametrize("framework", sorted(JOBS))
def test_the_published_version_reproduces_the_reported_auc_from_raw_rows(
    framework, ctr_split, eval_table, tmp_path
):
    root, _ = ctr_split
    script, launcher = JOBS[framework]
    result, repo = tmp_path / "result.json", tmp_path / "repo"
    cmd = [
        sys.executable, "-m", "kubeai_train.launch", *launcher, "--timeout", "230",
        "--env", "OMP_NUM_THREADS=1", "--env", "TF_CPP_MIN_LOG_LEVEL=2",
        str(script), "--train-data", str(root / "train"), "--eval-data", str(root / "eval"),
        "--model-repo", str(repo), "--model-dir", str(tmp_path / "model"), "--hash-buckets", "1000",
        "--batch-size", "256", "--max-steps", "30", "--checkpoint-steps", "100", "--result-json", str(result),
    ]  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    reported = json.loads(result.read_text())
    p = load_predictor(repo, "ctr", "latest")
    assert p.signature.framework == framework
    assert p.metadata["metrics"]["auc"] == pytest.approx(reported["metrics"]["auc"], abs=1e-12)
    scores = p.predict(eval_table)
    auc = _auc(framework, eval_table.column("label").to_numpy(), scores)
    print(f"{framework}: reported eval AUC {reported['metrics']['auc']:.6f}, predictor on raw rows {auc:.6f}")
    assert round(auc, 4) == round(reported["metrics"]["auc"], 4)
