"""Adaptive local batch sizes: the plan, the policy's re-planning, and the loss weight."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeai_train.straggler import (
    AdaptiveBatchPolicy,
    SlowWorkerDetector,
    StragglerError,
    WorkerTiming,
    capacity_bound,
    equal_batches,
    loss_weight,
    plan_local_batches,
    step_time,
)


def test_plan_is_proportional_to_speed_and_sums_to_the_global_batch():
    assert plan_local_batches(512, [3.0, 3.0, 3.0, 1.0]) == (154, 154, 153, 51)
    assert plan_local_batches(10, [1.0, 1.0, 1.0]) == (4, 3, 3)  # ties to the lower index
    assert equal_batches(10, 3) == (4, 3, 3)
    # a very slow worker keeps min_local rows; the others take the rest
    assert plan_local_batches(100, [1000.0, 1000.0, 1e-6], min_local=4) == (48, 48, 4)
    # one 3x-slow worker of 4: the planned step is at the capacity bound, equal batches are 2.5x it
    speeds = [3.0, 3.0, 3.0, 1.0]
    bound = capacity_bound(512, speeds)
    assert step_time(plan_local_batches(512, speeds), speeds) / bound == pytest.approx(1.0, abs=0.01)
    assert step_time(equal_batches(512, 4), speeds) / bound == pytest.approx(2.5, abs=0.01)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0.01, 1000.0), min_size=1, max_size=12),
    st.integers(1, 4096),
    st.integers(1, 8),
)
def test_plan_is_an_optimal_integer_split(speeds, batch, min_local):
    if batch < len(speeds) * min_local:
        with pytest.raises(StragglerError, match="global_batch must be an integer >= world x min_local"):
            plan_local_batches(batch, speeds, min_local)
        return
    sizes = plan_local_batches(batch, speeds, min_local)
    assert sum(sizes) == batch and min(sizes) >= min_local
    assert sizes == plan_local_batches(batch, list(speeds), min_local)  # deterministic
    t = step_time(sizes, speeds)
    # no single move of a row from the slowest-finishing worker to another makes the step shorter
    slow = max(range(len(sizes)), key=lambda i: sizes[i] / speeds[i])
    if sizes[slow] > min_local:
        for j in range(len(sizes)):
            if j != slow:
                moved = list(sizes)
                moved[slow] -= 1
                moved[j] += 1
                assert step_time(moved, speeds) >= t * (1 - 1e-12) or math.isclose(
                    step_time(moved, speeds), t
                )


def test_policy_replans_every_r_steps_toward_the_slow_worker_with_hysteresis():
    p = AdaptiveBatchPolicy(global_batch=400, world=4, replan_every=5, hysteresis=0.05, smoothing=1.0)
    assert p.plan.sizes == (100, 100, 100, 100)

    def timings(sizes, per_row):  # compute time proportional to the local batch
        return [WorkerTiming(w, b, b * per_row[w]) for w, b in enumerate(sizes)]

    per_row = [0.001, 0.001, 0.001, 0.003]  # worker 3 is 3x slower
    plans = []
    for s in range(20):
        new = p.observe(s, timings(p.plan.sizes, per_row))
        if new is not None:
            plans.append(new)
    assert len(plans) == 1 and plans[0].step == 5  # re-planned at the first R boundary, then stable
    assert plans[0].sizes == (120, 120, 120, 40)
    assert [round(plans[0].loss_weight(w), 3) for w in range(4)] == [1.2, 1.2, 1.2, 0.4]
    # recovery: back to equal batches at the next boundary after the speeds come back
    for s in range(20, 30):
        p.observe(s, timings(p.plan.sizes, [0.001] * 4))
    assert p.plan.sizes == (100, 100, 100, 100)
    # noise under the hysteresis does not re-plan
    q = AdaptiveBatchPolicy(global_batch=400, world=4, replan_every=1, hysteresis=0.05, smoothing=1.0)
    assert q.observe(0, timings(q.plan.sizes, [0.001, 0.001, 0.001, 0.00102])) is None


def test_policy_state_and_bad_input():
    p = AdaptiveBatchPolicy(global_batch=8, world=2, replan_every=1, smoothing=1.0)
    p.observe(0, [WorkerTiming(0, 4, 0.4), WorkerTiming(1, 4, 1.2)])
    assert p.plan.sizes == (6, 2)
    q = AdaptiveBatchPolicy(global_batch=8, world=2, replan_every=1)
    q.load_state_dict(p.state_dict())
    assert q.plan.sizes == (6, 2) and q.speeds == p.speeds
    with pytest.raises(StragglerError, match=r"belongs to another job shape"):
        AdaptiveBatchPolicy(global_batch=9, world=2).load_state_dict(p.state_dict())
    with pytest.raises(
        StragglerError, match=r"global_batch must be an integer >= world x min_local = 8, got 4"
    ):
        AdaptiveBatchPolicy(global_batch=4, world=4, min_local=2)
    with pytest.raises(StragglerError, match=r"replan_every must be an integer >= 1 \(steps\), got 0"):
        AdaptiveBatchPolicy(global_batch=8, world=2, replan_every=0)
    with pytest.raises(StragglerError, match=r"worker 2 out of range for world 2"):
        p.observe(1, [WorkerTiming(2, 1, 1.0)])
    with pytest.raises(StragglerError, match=r"speed of worker 1 must be a finite number > 0"):
        plan_local_batches(8, [1.0, 0.0])
    with pytest.raises(StragglerError, match=r"local batch must be an integer in \[0, 8\], got 9"):
        loss_weight(9, 8, 2)
    assert loss_weight(6, 8, 2) == 1.5


def _timings(sizes, per_row, noise=None):
    """Compute time proportional to the local batch (times a per-step noise factor)."""
    return [
        WorkerTiming(w, b, b * per_row[w] * (1.0 if noise is None else noise[w])) for w, b in enumerate(sizes)
    ]


def test_a_regime_change_replans_at_once_from_the_new_speed():
    p = AdaptiveBatchPolicy(global_batch=400, world=4, replan_every=10, smoothing=0.5)
    det = SlowWorkerDetector(k=1.5, m=2)
    per_row = [0.001] * 4
    plans = []
    for s in range(40):
        if s == 12:
            per_row = [0.001, 0.001, 0.001, 0.003]  # worker 3 turns 3x slower
        if s == 30:
            per_row = [0.001] * 4  # and recovers
        t = _timings(p.plan.sizes, per_row)
        d = det.observe(s, t)
        new = p.observe(s, t, new=d.new, cleared=d.cleared)
        if new is not None:
            plans.append((s, new))
    # flagged at its 2nd slow step (13): planned from the slow steps alone, not a smoothed mix of
    # old and new (that would give worker 3 more than a 3x slower share and need a second plan)
    assert [(s, q.step, q.sizes) for s, q in plans] == [
        (13, 14, (120, 120, 120, 40)),
        (31, 32, (100, 100, 100, 100)),
    ]


def test_iid_jitter_does_not_move_the_plan_but_a_lasting_difference_does():
    rng = random.Random(7)
    world = 8

    def run(noise_z, slow_from=None, steps=300):
        p = AdaptiveBatchPolicy(global_batch=64 * world, world=world, replan_every=3, noise_z=noise_z)
        plans = []
        for s in range(steps):
            per_row = [0.001] * world
            if slow_from is not None and s >= slow_from:
                per_row[5] = 0.0013  # 1.3x: under the detector's k, only the periodic re-plan sees it
            noise = [rng.lognormvariate(0, 0.15) for _ in range(world)]
            new = p.observe(s, _timings(p.plan.sizes, per_row, noise))
            if new is not None:
                plans.append(new)
        return plans

    assert len(run(0.0)) > 50  # without the noise test it chases the jitter (~1 plan per R)
    assert len(run(3.0)) <= 10  # with it, a rare noise plan (a worker 3 se off its median)
    lasting = run(3.0, slow_from=100)
    moved = [q for q in lasting if q.step > 100 and q.sizes[5] <= 56]  # 1/1.3 of 64 is 49
    assert moved and moved[0].step <= 100 + 20, lasting
    assert lasting[-1].sizes[5] <= 56, lasting


def test_flags_wait_when_slow_spells_have_been_short_and_state_keeps_them():
    p = AdaptiveBatchPolicy(global_batch=400, world=4, replan_every=100, smoothing=1.0, min_regime=8)
    fast = [WorkerTiming(w, 100, 0.1) for w in range(4)]
    slow = [*fast[:3], WorkerTiming(3, 100, 0.3)]
    for s in range(4):
        p.observe(s, fast)
    p.observe(4, slow)
    assert p.observe(5, slow, new={3}) is not None  # no spell seen yet: react
    p.observe(6, fast)
    p.observe(7, fast, cleared={3})  # a 2-step spell, undone
    assert p.plan.sizes == (100, 100, 100, 100)
    q = AdaptiveBatchPolicy(global_batch=400, world=4, replan_every=100, smoothing=1.0, min_regime=8)
    q.load_state_dict(p.state_dict())
    for pol in (p, q):  # short spells so far: the next flag waits ...
        pol.observe(8, slow)
        assert pol.observe(9, slow, new={3}) is None
        for s in range(10, 17):
            assert pol.observe(s, slow) is None
        new = pol.observe(17, slow)  # ... until it has lasted 8 steps
        assert new is not None and new.sizes == (120, 120, 120, 40)
    with pytest.raises(StragglerError, match=r"min_regime must be an integer >= 0 \(steps\), got -1"):
        AdaptiveBatchPolicy(global_batch=8, world=2, min_regime=-1)
