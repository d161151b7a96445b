"""Backup workers: which gradients a step aggregates, and the bias it introduces."""

from __future__ import annotations

import pytest

from kubeai_train.straggler import BackupWorkers, StragglerError, sample_shares


def test_the_first_n_minus_b_arrivals_count():
    b = BackupWorkers(world=4, backup=1)
    assert b.aggregate({0: 1.0, 1: 3.0, 2: 1.1, 3: 0.9}) == (3, 0, 2)
    assert b.aggregate({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}) == (0, 1, 2)  # ties to the lower index
    assert b.step_time([1.0, 3.0, 1.1, 0.9]) == 1.1  # the slow one no longer sets the step
    assert BackupWorkers(world=4, backup=0).step_time([1.0, 3.0, 1.1, 0.9]) == 3.0


def test_the_bias_a_persistently_slow_worker_is_never_learnt_from():
    b = BackupWorkers(world=4, backup=1)
    kept = dict.fromkeys(range(4), 0)
    for _ in range(50):
        for r in b.aggregate({0: 1.0, 1: 1.05, 2: 0.95, 3: 3.0}):
            kept[r] += 1
    assert sample_shares(kept, 50) == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}


def test_bad_input_names_the_value():
    with pytest.raises(
        StragglerError, match=r"backup workers must be an integer in \[0, 3\] for 4 replicas, got 4"
    ):
        BackupWorkers(world=4, backup=4)
    with pytest.raises(StragglerError, match=r"2 gradients arrived, the step needs 3 of 4"):
        BackupWorkers(world=4, backup=1).aggregate({0: 1.0, 1: 1.0})
    with pytest.raises(StragglerError, match=r"replica 7 out of range for 4 replicas"):
        BackupWorkers(world=4, backup=1).aggregate({0: 1.0, 1: 1.0, 7: 1.0})


def test_sit_out_takes_the_slowest_flagged_holders_and_never_all_of_them():
    b = BackupWorkers(world=4, backup=1)
    ratio = {0: 1.0, 1: 2.5, 2: 3.1, 3: 1.0}
    assert b.sit_out(set(), ratio, range(4)) == frozenset()  # nobody flagged: everyone trains
    assert b.sit_out({1, 2}, ratio, range(4)) == {2}  # at most b, the slowest first
    assert b.sit_out({1, 2}, ratio, {0, 1, 3}) == {1}  # rank 2 holds no data: nothing to sit out
    assert BackupWorkers(world=4, backup=2).sit_out({1, 2}, ratio, range(4)) == {1, 2}
    assert b.sit_out({1}, ratio, {1}) == frozenset()  # the last holder must read its rows
    assert b.sit_out({1, 2}, {}, range(4)) == {1}  # unknown ratios: ties to the lower index
    with pytest.raises(StragglerError, match=r"replica 9 out of range for 4 replicas"):
        b.sit_out({1}, ratio, {0, 9})
