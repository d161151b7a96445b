"""The trainer-side helpers of straggler="adaptive" (no process group)."""

from __future__ import annotations

import pytest
import torch

from kubeai_train.straggler import WorkerTiming, loss_weight
from kubeai_train.torch.adaptive import (
    AdaptiveController,
    RowSlicer,
    concat_batches,
    decode_carry,
    encode_carry,
    timing_slots,
    unpack_timings,
)
from kubeai_train.torch.types import AdaptiveBatching, ConfigError, TrainConfig


def test_summed_slots_gather_every_rank():
    total = [a + b for a, b in zip(timing_slots(2, 0, 96, 0.5), timing_slots(2, 1, 32, 0.25), strict=True)]
    assert unpack_timings(total) == [WorkerTiming(0, 96, 0.5), WorkerTiming(1, 32, 0.25)]


def test_concat_keeps_rows_in_order():
    a = {"ids": torch.arange(4).view(2, 2), "label": torch.tensor([0.0, 1.0])}
    b = {"ids": torch.arange(4, 6).view(1, 2), "label": torch.tensor([1.0])}
    out = concat_batches([a, b])
    assert out["ids"].tolist() == [[0, 1], [2, 3], [4, 5]] and out["label"].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        concat_batches([])


def _batches(sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    out, start = [], 0
    for n in sizes:
        ids = torch.arange(start, start + n)
        out.append({"ids": ids.view(n, 1).repeat(1, 2), "label": ids.to(torch.float32)})
        start += n
    return out


def test_slicer_cuts_planned_rows_in_order_and_counts_fetched_batches():
    batches = _batches([8, 8, 5])  # a shard's last batch is short
    sl = RowSlicer(iter(batches))
    first = sl.take(3)
    assert first is not None and first["label"].tolist() == [0, 1, 2] and sl.fetched == 1
    # a view of the reader's batch, not a copy, while the step fits in it
    assert first["ids"].untyped_storage().data_ptr() == batches[0]["ids"].untyped_storage().data_ptr()
    assert sl.take(8)["label"].tolist() == list(range(3, 11)) and sl.fetched == 2  # spans two
    assert sl.carry()["label"].tolist() == list(range(11, 16))
    whole = sl.take(5)
    assert whole["ids"] is not None and sl.carry() is None
    assert sl.take(8)["label"].tolist() == [16, 17, 18, 19, 20]  # fewer at the end
    assert sl.ended and sl.take(4) is None and sl.fetched == 3
    with pytest.raises(ValueError, match="at least one row"):
        sl.take(0)


def test_carry_survives_json_and_comes_first():
    import json

    sl = RowSlicer(iter(_batches([8])))
    sl.take(3)
    state = json.loads(json.dumps(encode_carry(sl.carry())))
    carry = decode_carry(state)
    assert carry is not None and carry["ids"].dtype == torch.int64 and carry["ids"].shape == (5, 2)
    resumed = RowSlicer(iter(_batches([8, 8])[1:]), carry)
    got = resumed.take(8)
    assert got["label"].tolist() == [3, 4, 5, 6, 7, 8, 9, 10] and resumed.fetched == 1
    assert encode_carry(None) is None and decode_carry(None) is None
    with pytest.raises(ConfigError, match="carried rows are unreadable"):
        decode_carry({"ids": {"dtype": "<i8", "shape": [5, 2], "data": "AAAA"}})
    with pytest.raises(ConfigError, match="tensor columns only; column 'name'"):
        encode_carry({"name": ["a", "b"]})  # type: ignore[dict-item]


def test_loss_scale_is_the_unbiased_weight_over_rows():
    ad = AdaptiveController(AdaptiveBatching(micro_batches=4), world=2, rank=1, micro_batch=16)
    assert ad.global_rows == 128 and ad.sizes() == [64, 64] and ad.units == 4
    # scale x summed loss == loss_weight x mean loss, for any local size
    for n in (16, 48, 64):
        assert ad.loss_scale * n == pytest.approx(loss_weight(n, 128, 2))


def test_slow_rank_is_flagged_replanned_and_cleared():
    opts = AdaptiveBatching(micro_batches=8, replan_every=2, slow_factor=1.5, slow_steps=2)
    ad = AdaptiveController(opts, world=2, rank=0, micro_batch=16)

    def step(s: int, slow: float) -> tuple[str, bool]:
        rows = ad.sizes()
        values = timing_slots(2, 0, rows[0], rows[0] * 1e-3)
        values = [
            a + b for a, b in zip(values, timing_slots(2, 1, rows[1], rows[1] * 1e-3 * slow), strict=True)
        ]
        return ad.observe(s, values, s + 2)

    assert step(0, 1.0) == ("", False)
    assert step(1, 2.0)[0] == ""
    line, changed = step(2, 2.0)
    assert "slow worker(s) 1" in line and ad.report.flagged == [1]
    for s in range(3, 7):
        step(s, 2.0)
    assert ad.sizes()[1] < ad.sizes()[0] and sum(ad.sizes()) == 256
    assert ad.report.plans[0] == {"step": 0, "sizes": [128, 128]}
    step(7, 1.0)
    line, _ = step(8, 1.0)
    assert "recovered 1" in line and ad.report.flagged == []
    # a step nobody trained in (first step of a pass) decides nothing
    assert ad.observe(9, [0.0] * 4, 11) == ("", False)


def test_state_round_trip_and_shape_check():
    opts = AdaptiveBatching(micro_batches=8, replan_every=1)
    a = AdaptiveController(opts, world=2, rank=0, micro_batch=16)
    a.observe(0, [128.0, 0.1, 128.0, 0.3], 2)  # rank 1 three times slower
    b = AdaptiveController(opts, world=2, rank=1, micro_batch=16)
    b.load_state_dict(a.state_dict(), step=5)
    assert b.sizes() == a.sizes() and b.report.plans == [{"step": 5, "sizes": a.sizes()}]
    with pytest.raises(ConfigError, match="micro-batches of 16 rows"):
        AdaptiveController(opts, world=2, rank=0, micro_batch=32).load_state_dict(a.state_dict(), 5)


def test_bad_config_names_the_value():
    with pytest.raises(ConfigError, match="straggler must be one of none, adaptive, backup, got 'fast'"):
        TrainConfig(straggler="fast")
    with pytest.raises(ConfigError, match="slow_factor must be > 1"):
        AdaptiveBatching(slow_factor=1.0)
    with pytest.raises(ConfigError, match="hysteresis"):
        AdaptiveBatching(hysteresis=1.5)
    with pytest.raises(ConfigError, match="micro_batches"):
        AdaptiveBatching(micro_batches=0)
