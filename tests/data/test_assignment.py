"""Static split assignment: exactly-once and balance over the whole input space (hypothesis)."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeai_train.data.assignment import StaticAssignment, cut, order, share_bounds, slice_rows
from kubeai_train.data.types import ReaderId, Split

split_sizes = st.lists(st.integers(min_value=0, max_value=50), min_size=0, max_size=12)


def make_splits(sizes: list[int]) -> list[Split]:
    out, start = [], 0
    for i, n in enumerate(sizes):
        # several files, each with its own row numbering
        key = f"f{i // 3}"
        if i % 3 == 0:
            start = 0
        out.append(Split(key, start, start + n, {"unit": i % 3}))
        start += n
    return out


def rows(splits: list[Split]) -> list[tuple[str, int]]:
    return [(s.key, r) for s in splits for r in range(s.start, s.stop)]


@settings(max_examples=300, deadline=None)
@given(
    sizes=split_sizes,
    world_size=st.integers(1, 9),
    num_workers=st.integers(1, 4),
    epoch=st.integers(0, 3),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
)
def test_every_row_exactly_once_and_balanced(sizes, world_size, num_workers, epoch, seed):
    splits = make_splits(sizes)
    a = StaticAssignment()
    everything = sorted(rows(splits))
    got: list[tuple[str, int]] = []
    per_reader = []
    for rank in range(world_size):
        rank_rows = rows(a.assign(splits, ReaderId(rank, world_size), epoch, seed))
        worker_rows: list[tuple[str, int]] = []
        for w in range(num_workers):
            part = a.assign(splits, ReaderId(rank, world_size, w, num_workers), epoch, seed)
            for s in part:
                assert s.num_rows > 0
                # a sub-split stays inside the split it was cut from
                assert any(o.key == s.key and o.start <= s.start and s.stop <= o.stop for o in splits)
            worker_rows += rows(part)
            per_reader.append(len(rows(part)))
        # a rank's share is the same whatever its number of loader workers
        assert worker_rows == rank_rows
        got += rank_rows
    assert sorted(got) == everything
    assert len(got) == len(set(got))
    rank_sizes = [
        len(rows(a.assign(splits, ReaderId(r, world_size), epoch, seed))) for r in range(world_size)
    ]
    assert max(rank_sizes) - min(rank_sizes) <= 1
    assert max(per_reader) - min(per_reader) <= 1 + (1 if world_size > 1 else 0)


@settings(max_examples=100, deadline=None)
@given(sizes=split_sizes, epoch=st.integers(0, 5), seed=st.integers(0, 1000))
def test_order_is_a_permutation_determined_by_seed_and_epoch(sizes, epoch, seed):
    splits = make_splits(sizes)
    o = order(splits, epoch, seed)
    assert sorted(map(repr, o)) == sorted(map(repr, splits))
    assert o == order(splits, epoch, seed)
    assert order(splits, epoch, None) == splits


def test_orders_differ_across_epochs_and_seeds():
    splits = make_splits([5] * 12)
    assert order(splits, 0, 1) != order(splits, 1, 1)
    assert order(splits, 0, 1) != order(splits, 0, 2)


@given(total=st.integers(0, 1000), parts=st.integers(1, 20))
def test_share_bounds_tile_the_range(total, parts):
    bounds = [share_bounds(total, parts, i) for i in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(parts - 1))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_fewer_splits_than_readers_cuts_row_groups():
    # one row group of 10 rows, 4 readers: nobody idles, row ranges of 3/3/2/2
    splits = [Split("f", 100, 110, {"row_group": 0})]
    parts = [cut(splits, 4, i) for i in range(4)]
    assert [[(s.start, s.stop) for s in p] for p in parts] == [
        [(100, 103)],
        [(103, 106)],
        [(106, 108)],
        [(108, 110)],
    ]
    assert all(p[0].info == {"row_group": 0} for p in parts)


def test_slice_rows_keeps_whole_splits_when_possible():
    splits = make_splits([4, 4, 4])
    assert slice_rows(splits, 0, 12) == splits
    assert slice_rows(splits, 4, 8) == [splits[1]]
    assert slice_rows(splits, 3, 5) == [
        dataclasses.replace(splits[0], start=3),
        dataclasses.replace(splits[1], stop=5),
    ]
    assert np.sum([s.num_rows for s in slice_rows(splits, 2, 11)]) == 9
