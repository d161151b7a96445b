"""A finished TF job run again on the same model_dir (an ExitCode restart, a re-run pipeline).

Both modes, under the launcher on a real local cluster (1 PS, 1 worker), three runs on one
model_dir: the first trains and publishes to repository A; the second, pointed at an empty
repository B, skips training, exports from the final checkpoint and publishes there (it crashed
restoring the checkpoint before); the third finds its version in B and says so in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeai_train.repository import ModelRepository
from tests.tf._cluster import EXAMPLES, launch, small_args, tail

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", sorted(EXAMPLES))
def test_a_finished_job_run_again_publishes_once_and_then_reports_the_version(mode, ctr_small, tmp_path):
    root, _ = ctr_small
    model_dir = tmp_path / "model"

    def run(repo: Path, n: int) -> tuple[str, dict]:
        result = tmp_path / f"result-{n}.json"
        res = launch(
            EXAMPLES[mode],
            small_args(
                root,
                repo,
                model_dir,
                "--max-steps",
                "40",
                "--checkpoint-steps",
                "20",
                "--result-json",
                str(result),
            ),
            ps=1,
            workers=1,
            timeout=200,
        )
        assert res.returncode == 0, f"run {n} failed:\n{tail(res.output)}"
        return res.output, json.loads(result.read_text())

    out1, first = run(tmp_path / "repo_a", 1)
    assert first["version"] == 1 and "already published" not in out1
    # legible: the resolved config once (the chief), one line for each other role, no TF noise
    lines = out1.splitlines()
    assert sum('"train_data":' in ln for ln in lines) == 1, tail(out1)
    assert sum("[ps 0] kubeai_train.tf" in ln for ln in lines) == 1
    assert sum("[worker 0] kubeai_train.tf" in ln for ln in lines) == 1
    assert not [ln for ln in lines if any(w in ln for w in ("cuda", "cuInit", "absl::InitializeLog"))]
    assert (
        lines[-1].startswith("[launch] job ")
        and f"; published ctr/1 (auc {first['metrics']['auc']:.4f}" in lines[-1]
    )
    trained = json.loads((model_dir / "_TRAINED.json").read_text())

    out2, second = run(tmp_path / "repo_b", 2)
    assert "exists" in out2 and "going to export" in out2  # it did not train again
    assert second["version"] == 1 and second["global_step"] == trained["global_step"]
    mv = ModelRepository(str(tmp_path / "repo_b")).get("ctr")
    assert mv.metadata["lineage"]["checkpoint"] == trained["checkpoint"]
    assert mv.metadata["metrics"]["auc"] == pytest.approx(first["metrics"]["auc"], abs=1e-6)

    out3, third = run(tmp_path / "repo_b", 3)
    line = f"ctr/1 already published from {model_dir} checkpoint {trained['global_step']}: {mv.uri}"
    assert [
        ln for ln in out3.splitlines() if "already published" in ln and not ln.startswith("[launch]")
    ] == [ln for ln in out3.splitlines() if ln.endswith(line)]
    assert sum(ln.endswith(line) for ln in out3.splitlines()) == 1, tail(out3)
    assert [v.version for v in ModelRepository(str(tmp_path / "repo_b")).versions("ctr")] == [1]
    assert third["version"] == 1 and third["model_uri"] == mv.uri
    assert out3.splitlines()[-1].endswith(f"; already published ctr/1 (auc {first['metrics']['auc']:.4f}, "
                                          f"logloss {first['metrics']['logloss']:.4f}) at {mv.uri}"), tail(out3)  # fmt: skip
    assert third["metrics"]["auc"] == pytest.approx(first["metrics"]["auc"], abs=1e-6)
