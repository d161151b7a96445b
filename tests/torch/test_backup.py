"""``straggler="backup"``: the controller on hand-made gathered values, and a real two-rank
gloo job with rank 1 slowed 3x for a while."""

from __future__ import annotations

import pytest

from kubeai_train.launch import run_processes
from kubeai_train.torch import AdaptiveBatching, ConfigError, TrainConfig
from kubeai_train.torch.adaptive import timing_slots
from kubeai_train.torch.backup import BackupController

from ._helpers import ctr_columns, write_parquet

ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
SLOW_FROM, SLOW_UNTIL = 4, 16
ROWS, BATCH = 2048, 64


def _sum(*vs: list[float]) -> list[float]:
    return [sum(x) for x in zip(*vs, strict=True)]


def test_a_flagged_rank_sits_out_and_the_others_are_weighted_to_the_kept_mean():
    c = BackupController(AdaptiveBatching(slow_factor=1.5, slow_steps=2), world=3, rank=0, backup=1, batch=10)
    assert not c.sit_out and c.loss_scale == pytest.approx(3 / 30)
    fast = [timing_slots(3, r, 10, 0.1) for r in (0, 1)]
    slow = timing_slots(3, 2, 10, 0.4)
    holding = [0.0, 0.0, 0.0]
    c.observe(0, _sum(*fast, slow), holding, 2)
    assert not c.sit_out  # one slow step is not m = 2
    c.observe(1, _sum(*fast, slow), holding, 3)
    assert c.sit_out == {2} and c.loss_scale == pytest.approx(3 / 20)  # two kept ranks' rows
    assert c.report.changes == [{"step": 3, "sit_out": [2]}]
    # a probe of 3 rows at normal speed: after m of them the flag clears and rank 2 trains again
    probe = timing_slots(3, 2, 3, 0.03)
    c.observe(2, _sum(*fast, probe), holding, 4)
    assert c.sit_out == {2}
    c.observe(3, _sum(*fast, probe), holding, 5)
    assert not c.sit_out and c.report.changes[-1] == {"step": 5, "sit_out": []}
    # ranks 0 and 1 ran out: the flagged rank 2 is the last holder and must train
    c.observe(4, _sum(*fast, slow), holding, 6)
    c.observe(5, _sum(*fast, slow), [1.0, 1.0, 0.0], 7)
    assert c.report.flagged == [2] and not c.sit_out and c.loss_scale == pytest.approx(3 / 10)


def test_bad_configuration_names_the_value():
    with pytest.raises(ConfigError, match=r"backup_workers must be an integer >= 1, got 0"):
        TrainConfig(straggler="backup", backup_workers=0)
    with pytest.raises(ConfigError, match=r"backup workers must be an integer in \[0, 1\] for 2 replicas"):
        BackupController(AdaptiveBatching(), world=2, rank=0, backup=2, batch=10)


@pytest.mark.integration
def test_a_slowed_rank_sits_out_after_detection_and_replicas_stay_identical(tmp_path):
    for r in range(2):
        write_parquet(tmp_path / f"rank{r}", ctr_columns(ROWS, seed=20 + r), files=2, row_group=256)
    kw = {"data_root": str(tmp_path), "per_row_s": 0.001, "slow_from": SLOW_FROM, "slow_until": SLOW_UNTIL}
    res = run_processes("tests.torch._jobs:backup_slowed", workers=2, kwargs=kw, env=ENV, timeout=120).results
    r0, r1 = res["master:0"], res["worker:0"]
    st = r0["straggler"]
    print("changes", st["changes"], "sat out", st["sat_out"], "detections", st["detections"])
    assert st == r1["straggler"]  # every rank decided the same from the same numbers
    # rank 1 sits out from within m + 2 steps of its slowdown (timings travel one step late and a
    # decision applies to the step after the one it is made in) until it recovers
    assert st["changes"][0]["sit_out"] == [1] and SLOW_FROM < st["changes"][0]["step"] <= SLOW_FROM + 4
    assert st["changes"][1]["sit_out"] == [] and SLOW_UNTIL < st["changes"][1]["step"] <= SLOW_UNTIL + 4
    assert st["sat_out"][0] == 0 and st["sat_out"][1] >= SLOW_UNTIL - SLOW_FROM - 4
    assert st["flagged"] == []
    # no row is lost: rank 1 trains in every step it does not sit out, until its shard is done
    assert r0["steps"] == ROWS // BATCH + st["sat_out"][1]
    assert r0["rows_per_rank"] == r1["rows_per_rank"] == [ROWS, ROWS]
    assert r0["exactly_once"] and r1["exactly_once"] and r0["trained"] == r1["trained"] == ROWS
    assert r0["model"] == r1["model"] and r0["optimizer"] == r1["optimizer"]
