"""Runtime re-placement on a real local between-graph cluster (chief + 1 worker + 2 PS).

``_rebalance_job.py``: four equal tables, two per PS; from global step 40 the two tables on one
PS look up a single row, so the other PS moves about twice its bytes (max/mean ~1.3). The chief
measures it window by window, re-places (a swap of whole tables), checkpoints with the worker
parked, clears the PS and restores into the new placement; training goes on there. ``recut``:
one hot table that no whole-table move can fix is re-cut into two even shards (TensorFlow
restores the whole-table checkpoint into the partitioned variable). Checked:
the decision and the pause are recorded, the tables sit where the new plan says, the measured
traffic after it is even, and every row is trained exactly once (row-id audit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.tf._cluster import HERE, run_cluster, tail

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

JOB = HERE / "between_graph" / "_rebalance_job.py"
ROWS = 56_320  # 220 steps of 256


def _data(root: Path) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    ids = np.arange(ROWS, dtype=np.int64)
    for f in range(4):
        part = ids[f * ROWS // 4 : (f + 1) * ROWS // 4]
        cols = {"row_id": part, "label": (rng.random(len(part)) < 0.3).astype(np.int64)}
        for i in range(4):
            cols[f"c{i}"] = rng.integers(0, 2000, len(part)).astype(np.float32)
        pq.write_table(pa.table(cols), root / f"part-{f}.parquet", row_group_size=2048)


@pytest.mark.parametrize("mode", ["swap", "recut"])
def test_a_hot_ps_is_rebalanced_mid_run_and_no_update_is_lost(tmp_path, mode):
    import tensorflow as tf

    _data(tmp_path / "data")
    model_dir = tmp_path / "m"
    res = run_cluster(
        JOB,
        [str(tmp_path / "data"), str(model_dir), "40", mode],
        ps=2,
        workers=1,
        timeout=300,
        log_dir=tmp_path / "logs",
    )
    out = "\n".join(res.log(e.label) for e in res.exits)
    report = json.loads((model_dir / "placement.json").read_text())
    history = report.get("rebalances") or []
    assert len(history) == 1, tail(out)
    entry = history[0]
    assert entry["before"]["traffic"] > 1.10 and entry["after"]["traffic"] <= 1.05, entry
    assert entry["bytes_moved"] > 0 and entry["min_bytes"] <= entry["bytes_moved"], entry
    assert entry["pause_s"] > 0 and entry["global_step"] >= 40, entry
    assert len(entry["moved"]) >= 1 and "re-placement 1 applied: pause" in out, tail(out)
    assert "parked for re-placement 1" in res.log("worker:0"), tail(res.log("worker:0"))

    # the final graph's tables sit where the new plan says
    plan = json.loads((model_dir / "placement_plan.json").read_text())
    counts: dict[str, int] = {}
    for s in plan["plan"]["shards"]:
        counts[s["variable"]] = counts.get(s["variable"], 0) + 1
    planned = {
        (f"{s['variable']}/part_{s['index']}" if counts[s["variable"]] > 1 else s["variable"]): s["ps"]
        for s in plan["plan"]["shards"]
    }
    checked = [name for name in report["devices"] if name in planned]
    assert len(checked) == len(planned), (sorted(planned), sorted(report["devices"]))
    for name in checked:
        assert tf.DeviceSpec.from_string(report["devices"][name]).task == planned[name], name
    if mode == "recut":  # the hot table now has two even shards, one on each PS
        assert counts["t0"] == 2 and {planned["t0/part_0"], planned["t0/part_1"]} == {0, 1}, plan
    # measured after the re-placement (the new chief's own steps): even traffic again
    assert report["measured"]["steps"] >= 20
    assert report["max_over_mean"]["measured"]["traffic"] <= 1.08, report["max_over_mean"]

    # every row trained exactly once across the re-placement
    audit = np.concatenate([np.load(f) for f in sorted((model_dir / "audit").glob("rank*.npy"))])
    assert len(audit) == ROWS, "rows lost or trained twice across the re-placement"
    np.testing.assert_array_equal(np.sort(audit), np.arange(ROWS))
