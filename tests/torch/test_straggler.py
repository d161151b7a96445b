"""``straggler="adaptive"`` on a real two-rank gloo job with one rank slowed 2x for a while."""

from __future__ import annotations

import pytest

from kubeai_train.launch import run_processes

from ._helpers import ctr_columns, write_parquet

pytestmark = pytest.mark.integration

ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
SLOW_FROM, SLOW_UNTIL, R = 6, 18, 4


def test_slowed_rank_gets_a_smaller_batch_and_replicas_stay_identical(tmp_path):
    for r in range(2):
        write_parquet(tmp_path / f"rank{r}", ctr_columns(4096, seed=10 + r), files=2, row_group=256)
    kw = {"data_root": str(tmp_path), "per_row_s": 0.002, "slow_from": SLOW_FROM, "slow_until": SLOW_UNTIL}
    res = run_processes("tests.torch._jobs:slowed", workers=2, kwargs=kw, env=ENV, timeout=180).results
    r0, r1 = res["master:0"], res["worker:0"]
    st = r0["straggler"]
    print("plans", st["plans"])
    print("detections", st["detections"])
    assert st == r1["straggler"]  # every rank made the same decisions from the same timings
    assert st["global_batch"] == 2 * 8 * 16
    assert all(sum(p["sizes"]) == 256 for p in st["plans"])
    # a smaller local batch for rank 1 within R steps of the slowdown (+1: timings travel in the
    # next step's input sync, so a plan made from step s applies from s + 2)
    smaller = [p for p in st["plans"] if p["sizes"][1] < p["sizes"][0]]
    assert smaller, st["plans"]
    assert SLOW_FROM < smaller[0]["step"] <= SLOW_FROM + R + 1
    # detection within 3 steps of the slowdown start, cleared within 3 steps of the recovery
    new = [d for d in st["detections"] if 1 in d["new"]]
    cleared = [d for d in st["detections"] if 1 in d["cleared"]]
    assert new and SLOW_FROM <= new[0]["reported_at"] <= SLOW_FROM + 3, st["detections"]
    assert cleared and SLOW_UNTIL <= cleared[0]["reported_at"] <= SLOW_UNTIL + 3, st["detections"]
    assert not any(0 in d["new"] for d in st["detections"])
    # every row trained once, replicas and optimizer states bit-identical
    assert r0["rows_per_rank"] == r1["rows_per_rank"] == [4096, 4096]
    assert r0["model"] == r1["model"] and r0["optimizer"] == r1["optimizer"]


def test_resume_mid_reader_batch_trains_every_row_once(tmp_path):
    # 1,000 rows per rank in reader batches of 96: rank 1 twice as slow, so a plan of 12-row
    # micro-batches near 2:1 (11 and 5 of them) cuts steps across reader batches
    for r in range(2):
        write_parquet(tmp_path / f"rank{r}", ctr_columns(1000, seed=20 + r), files=2, row_group=128)
    kw = {"data_root": str(tmp_path), "ckpt": str(tmp_path / "ckpt"), "per_row_s": 0.001, "stop_at": 9}
    res = run_processes(
        "tests.torch._jobs:adaptive_resume", workers=2, kwargs=kw, env=ENV, timeout=180
    ).results
    for out in res.values():
        print(out)
        assert out["first_steps"] == 9 and out["resumed_from"] == 9
        assert out["exactly_once"] and out["trained"] == out["rows"] == 1000
    assert any(len(set(p)) > 1 for p in res["master:0"]["plans"])  # the plan did move
    assert any(out["carry_rows"] > 0 for out in res.values())  # and a checkpoint held a carry
