"""The TF PS example (between-graph) trains with ``--assignment dynamic`` on the local cluster:
every training row applied exactly once across the trainers, and the eval AUC of a static run
of the same data, model and epochs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.tf._cluster import EXAMPLES, launch, tail

EXAMPLE = EXAMPLES["between_graph"]

pytestmark = pytest.mark.integration


def _audit(model_dir: Path) -> dict[int, np.ndarray]:
    out: dict[int, list[np.ndarray]] = {}
    for f in sorted((model_dir / "audit").glob("rank*.npy")):
        m = re.match(r"rank(\d+)-", f.name)
        assert m is not None, f.name
        out.setdefault(int(m.group(1)), []).append(np.load(f))
    return {r: np.concatenate(v) for r, v in out.items()}


def _run(root: Path, out: Path, assignment: str) -> dict:
    model_dir = out / assignment
    args = [
        "--train-data", str(root / "train"), "--eval-data", str(root / "eval"),
        "--batch-size", "512", "--epochs", "1", "--log-steps", "50", "--checkpoint-steps", "100",
        "--model-repo", str(out / f"repo-{assignment}"), "--model-dir", str(model_dir),
        "--audit-column", "row_id", "--result-json", str(out / f"{assignment}.json"),
        "--assignment", assignment,
    ]  # fmt: skip
    res = launch(EXAMPLE, args, timeout=200)
    assert res.returncode == 0, tail(res.output)
    return {"result": json.loads((out / f"{assignment}.json").read_text()), "audit": _audit(model_dir)}


def test_example_with_dynamic_assignment_reads_every_row_once_and_matches_static_auc(ctr_data, tmp_path):
    root, report = ctr_data
    static = _run(root, tmp_path, "static")
    dynamic = _run(root, tmp_path, "dynamic")
    audit = dynamic["audit"]
    assert sorted(audit) == [0, 1, 2]  # chief and both workers trained
    every = np.concatenate(list(audit.values()))
    assert len(every) == 150_000, "rows lost or applied twice with dynamic dispatch"
    assert sorted(every.tolist()) == list(range(150_000))
    a_static, a_dyn = static["result"]["metrics"]["auc"], dynamic["result"]["metrics"]["auc"]
    print(f"eval AUC: static {a_static:.4f}, dynamic {a_dyn:.4f}, ceiling {report['eval']['true_auc']:.4f}")
    assert abs(a_dyn - a_static) <= 0.01
    assert a_dyn > 0.6
