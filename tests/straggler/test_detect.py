"""SlowWorkerDetector on hand-made step timings."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeai_train.straggler import SlowWorkerDetector, StragglerError, WorkerTiming


def step(times: list[float], rows: int | list[int] = 100) -> list[WorkerTiming]:
    rs = rows if isinstance(rows, list) else [rows] * len(times)
    return [WorkerTiming(w, r, t) for w, (t, r) in enumerate(zip(times, rs, strict=True))]


def test_a_2x_slowdown_is_flagged_within_three_steps_and_cleared_on_recovery():
    d = SlowWorkerDetector(k=1.5, m=2)
    for s in range(5):
        assert not d.observe(s, step([1.0, 1.0, 1.05, 0.95])).flagged
    slow_from = 5
    flagged_at = None
    for s in range(slow_from, slow_from + 5):
        det = d.observe(s, step([1.0, 2.0, 1.05, 0.95]))
        if det.new:
            flagged_at = s
            assert det.new == {1} and det.ratio[1] == pytest.approx(2.0 / 1.0, rel=0.05)
            assert "slow worker(s) 1 (1.9" in det.describe() or "slow worker(s) 1 (2.0" in det.describe()
    assert flagged_at is not None and flagged_at - slow_from + 1 <= 3
    assert d.flagged == {1}
    cleared_at = None
    for s in range(10, 15):
        det = d.observe(s, step([1.0, 1.0, 1.05, 0.95]))
        if det.cleared:
            cleared_at = s
            assert det.cleared == {1} and "recovered 1" in det.describe()
    assert cleared_at == 11 and not d.flagged


def test_per_row_not_per_step_a_slow_worker_with_a_smaller_batch_stays_flagged():
    d = SlowWorkerDetector(k=1.5, m=1)
    # worker 1 is 3x slower per row but got a third of the rows: equal step times
    det = d.observe(0, step([1.0, 1.0], rows=[300, 100]))
    assert det.flagged == {1}
    det = d.observe(1, step([1.0, 1.0], rows=[300, 300]))
    assert det.cleared == {1}


def test_one_noisy_step_does_not_flag_and_shadow_steps_are_ignored():
    d = SlowWorkerDetector(k=1.5, m=2)
    assert not d.observe(0, step([1.0, 3.0, 1.0])).new  # one slow step: counted, not flagged
    assert not d.observe(1, step([1.0, 1.0, 1.0])).flagged
    # a worker sitting out (Join shadow step, 0 rows) keeps its count and is not compared
    d.observe(2, step([1.0, 3.0, 1.0]))
    det = d.observe(3, step([1.0, 0.0, 1.0], rows=[100, 0, 100]))
    assert 1 not in det.ratio and not det.flagged
    assert d.observe(4, step([1.0, 3.0, 1.0])).new == {1}
    # a single measured worker has no one to be compared with
    assert d.observe(5, step([1.0], rows=[100])).flagged == {1}


def test_state_round_trips_and_bad_input_names_the_value():
    d = SlowWorkerDetector(k=2.0, m=2)
    d.observe(0, step([1.0, 5.0, 1.0]))
    e = SlowWorkerDetector(k=2.0, m=2)
    e.load_state_dict(d.state_dict())
    assert e.observe(1, step([1.0, 5.0, 1.0])).new == {1}
    with pytest.raises(StragglerError, match=r"k must be a number > 1 .* got 1"):
        SlowWorkerDetector(k=1)
    with pytest.raises(StragglerError, match=r"m must be an integer >= 1 .* got 0"):
        SlowWorkerDetector(m=0)
    with pytest.raises(StragglerError, match=r"rows of worker 3 must be an integer >= 0, got -1"):
        WorkerTiming(3, -1, 1.0)
    with pytest.raises(
        StragglerError, match=r"compute_seconds of worker 0 must be a finite number >= 0, got nan"
    ):
        WorkerTiming(0, 1, float("nan"))
    with pytest.raises(StragglerError, match=r"two timings of worker 0"):
        d.observe(2, [WorkerTiming(0, 1, 1.0), WorkerTiming(0, 1, 1.0)])
    with pytest.raises(StragglerError, match=r"not a SlowWorkerDetector state"):
        d.load_state_dict({"flagged": []})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.001, 100.0), min_size=2, max_size=30))
def test_ratio_is_to_the_median_of_the_others(times):
    det = SlowWorkerDetector().observe(0, step(times))
    for w, t in enumerate(times):
        others = times[:w] + times[w + 1 :]
        assert det.ratio[w] == pytest.approx((t / 100) / statistics.median([o / 100 for o in others]))
