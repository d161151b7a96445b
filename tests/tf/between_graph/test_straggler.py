"""``straggler="adaptive"`` in between-graph synchronous training on a real local cluster
(chief + 1 worker + 1 PS), with worker 0 slowed 2x in a window of global steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.tf._cluster import HERE, run_cluster, tail

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOB = HERE / "between_graph" / "_straggler_job.py"
SLOW_FROM, SLOW_UNTIL, R, UNITS, MICRO = 12, 36, 4, 4, 32
GLOBAL = 2 * UNITS * MICRO


def _data(root: Path, rows: int = 32_768) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for f in range(4):
        n = rows // 4
        cols = {
            "label": (rng.random(n) < 0.3).astype(np.int64),
            "c0": rng.integers(0, 1000, n).astype(np.float32),
            "x0": rng.normal(size=n).astype(np.float32),
        }
        pq.write_table(pa.table(cols), root / f"part-{f}.parquet", row_group_size=1024)


def test_slowed_worker_gets_a_smaller_batch_and_is_flagged_then_cleared(tmp_path):
    _data(tmp_path / "data")
    model_dir = tmp_path / "m"
    res = run_cluster(
        JOB,
        [str(tmp_path / "data"), str(model_dir), str(SLOW_FROM), str(SLOW_UNTIL), "0.001"],
        ps=1,
        workers=1,
        timeout=240,
        log_dir=tmp_path / "logs",
    )
    out = "\n".join(res.log(e.label) for e in res.exits)
    chief = json.loads((model_dir / "result-chief-0.json").read_text())
    worker = json.loads((model_dir / "result-worker-0.json").read_text())
    st = chief["straggler"]
    assert st is not None, tail(out)
    print("plans", st["plans"])
    print("detections", st["detections"])
    print("worker applied", worker["straggler"]["applied"])
    assert chief["global_step"] >= 60
    assert st["global_batch"] == GLOBAL and all(sum(p["sizes"]) == GLOBAL for p in st["plans"])
    # a smaller local batch for worker 0 (replica 1) within R steps of the first observation of
    # the slowdown: a step's timing travels with the replica's next step (+1) and a plan applies
    # from the step after the one it is made in (+1)
    smaller = [p for p in st["plans"] if p["sizes"][1] < p["sizes"][0]]
    assert smaller, (st["plans"], tail(out))
    assert SLOW_FROM < smaller[0]["step"] <= SLOW_FROM + R + 2, st["plans"]
    # ... and the worker applied it (fewer micro-batches than at equal shares)
    fewer = [a for a in worker["straggler"]["applied"] if a["units"] < UNITS]
    assert fewer and fewer[0]["global_step"] <= smaller[0]["step"] + 1, worker["straggler"]
    # shares back to equal after the slowdown
    assert st["plans"][-1]["step"] > SLOW_UNTIL and st["plans"][-1]["sizes"] == [GLOBAL // 2] * 2, st["plans"]
    # flagged within 3 steps of the slowdown, cleared within 3 steps of the recovery, never replica 0
    new = [d for d in st["detections"] if 1 in d["new"]]
    cleared = [d for d in st["detections"] if 1 in d["cleared"]]
    assert new and SLOW_FROM <= new[0]["reported_at"] <= SLOW_FROM + 3, st["detections"]
    assert cleared and SLOW_UNTIL <= cleared[0]["reported_at"] <= SLOW_UNTIL + 3, st["detections"]
    assert not any(0 in d["new"] for d in st["detections"]), st["detections"]
    print(
        f"detection latency: flagged {new[0]['reported_at'] - SLOW_FROM} steps after the 2x slowdown "
        f"began, cleared {cleared[0]['reported_at'] - SLOW_UNTIL} steps after it ended; smaller batch "
        f"from step {smaller[0]['step']} (slowdown at {SLOW_FROM}, R={R})"
    )
