"""The conformance suite every data source passes (files, ODPS, OSS): exactly-once across world
sizes x DataLoader workers with and without shuffle, exact batches, deterministic order,
resume after stopping at random points, and the bad inputs every source shares.

Use it by subclassing :class:`SourceConformance` in a test module and providing one fixture::

    class TestMySource(SourceConformance):
        @pytest.fixture(scope="class")
        def spec(self, ...):
            return ConformanceSpec(source="odps://proj/tables/t", options={...}, ids=np.arange(1000))

The dataset behind ``spec`` must have an integer column (``spec.id_column``, default ``"id"``)
whose values are unique, and ideally several splits of uneven sizes with ~500-3000 rows in all
(the suite reads it a few hundred times). Sources that can express a missing or an empty
dataset override :meth:`SourceConformance.missing_source` / :meth:`empty_source`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from kubeai_train import data

WORLD_SIZES = (1, 2, 3, 7)
LOADER_WORKERS = (0, 2)


@dataclass
class ConformanceSpec:
    """A dataset the suite reads: ``data.read(source, **options)`` yields rows whose
    ``id_column`` values are exactly ``ids`` (in any order)."""

    source: Any
    ids: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)
    id_column: str = "id"
    batch_size: int = 64

    def read(self, **kw: Any) -> data.Dataset:
        args: dict[str, Any] = {"batch_size": self.batch_size, "rank": 0, "world_size": 1, **self.options}
        args.update(kw)
        return data.read(self.source, **args)


def ids_of(batches: list[dict[str, np.ndarray]], column: str) -> np.ndarray:
    if not batches:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(b[column]) for b in batches])


def torch_ids(
    ds: data.Dataset, num_workers: int, column: str, timeout: float = 60
) -> tuple[np.ndarray, list[int]]:
    """Read ``ds.to_torch()`` through a real DataLoader; return ids and batch sizes."""
    import torch.utils.data as tud

    loader = tud.DataLoader(
        ds.to_torch(), batch_size=None, num_workers=num_workers, timeout=timeout if num_workers else 0
    )
    out, sizes = [], []
    for b in loader:
        out.append(b[column].numpy())
        sizes.append(len(b[column]))
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), sizes


class SourceConformance:
    """Behaviour every source shares. Subclasses provide the ``spec`` fixture."""

    @pytest.fixture(scope="class")
    def spec(self) -> ConformanceSpec:  # pragma: no cover - overridden
        raise NotImplementedError("subclass SourceConformance and provide a `spec` fixture")

    # -- exactly once ------------------------------------------------------------------------
    @pytest.mark.parametrize("shuffle", [False, True])
    @pytest.mark.parametrize("world_size", WORLD_SIZES)
    def test_exactly_once_across_ranks(self, spec: ConformanceSpec, world_size: int, shuffle: bool) -> None:
        shares = []
        for rank in range(world_size):
            ds = spec.read(rank=rank, world_size=world_size, shuffle=shuffle, seed=11)
            got = ids_of(list(ds), spec.id_column)
            assert len(got) == ds.num_rows
            shares.append(got)
        every = np.concatenate(shares)
        assert len(every) == len(spec.ids), "a row was read twice or not at all"
        np.testing.assert_array_equal(np.sort(every), np.sort(spec.ids))
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1, f"shares differ by more than one row: {sizes}"

    @pytest.mark.parametrize("shuffle", [False, True])
    @pytest.mark.parametrize("world_size", WORLD_SIZES)
    def test_exactly_once_with_loader_workers(
        self, spec: ConformanceSpec, world_size: int, shuffle: bool
    ) -> None:
        got = []
        for rank in range(world_size):
            ds = spec.read(rank=rank, world_size=world_size, shuffle=shuffle, seed=5, prefetch=2)
            ids, sizes = torch_ids(ds, LOADER_WORKERS[1], spec.id_column)
            assert all(s <= spec.batch_size for s in sizes)
            got.append(ids)
        every = np.concatenate(got)
        assert len(every) == len(spec.ids)
        np.testing.assert_array_equal(np.sort(every), np.sort(spec.ids))

    def test_loader_without_workers_matches_plain_iteration(self, spec: ConformanceSpec) -> None:
        ds = spec.read(rank=1, world_size=3, shuffle=True, seed=2)
        plain = ids_of(list(ds), spec.id_column)
        via_torch, _ = torch_ids(spec.read(rank=1, world_size=3, shuffle=True, seed=2), 0, spec.id_column)
        np.testing.assert_array_equal(plain, via_torch)

    # -- batches and order -------------------------------------------------------------------
    @pytest.mark.parametrize("drop_last", [False, True])
    def test_batches_are_exact(self, spec: ConformanceSpec, drop_last: bool) -> None:
        bs = 37  # deliberately not a divisor of any split size
        ds = spec.read(batch_size=bs, drop_last=drop_last, rank=0, world_size=2)
        sizes = [len(b[spec.id_column]) for b in ds]
        assert sizes, "no batches"
        assert all(s == bs for s in sizes[:-1])
        n = ds.num_rows
        if drop_last:
            assert sizes[-1] == bs and sum(sizes) == n - n % bs
        else:
            assert sum(sizes) == n and sizes[-1] == (n % bs or bs)
        assert len(sizes) == len(ds)

    def test_order_is_a_function_of_seed_and_epoch(self, spec: ConformanceSpec) -> None:
        a = spec.read(shuffle=True, seed=7, num_epochs=2)
        b = spec.read(shuffle=True, seed=7, num_epochs=2, prefetch=0)
        ra, rb = ids_of(list(a), spec.id_column), ids_of(list(b), spec.id_column)
        np.testing.assert_array_equal(ra, rb)
        n = len(spec.ids)
        e0, e1 = ra[:n], ra[n:]
        np.testing.assert_array_equal(np.sort(e0), np.sort(e1))
        assert not np.array_equal(e0, e1), "epochs 0 and 1 came in the same order"
        plain = ids_of(list(spec.read()), spec.id_column)
        assert not np.array_equal(e0, plain), "shuffle=True gave the unshuffled order"
        other = ids_of(list(spec.read(shuffle=True, seed=8)), spec.id_column)
        assert not np.array_equal(e0, other), "seeds 7 and 8 gave the same order"

    def test_iterating_again_reads_the_next_epoch(self, spec: ConformanceSpec) -> None:
        ds = spec.read(shuffle=True, seed=3, num_epochs=1)
        first = ids_of(list(ds), spec.id_column)
        assert ds.epoch == 1
        second = ids_of(list(ds), spec.id_column)
        both = ids_of(list(spec.read(shuffle=True, seed=3, num_epochs=2)), spec.id_column)
        np.testing.assert_array_equal(np.concatenate([first, second]), both)

    def test_projection(self, spec: ConformanceSpec) -> None:
        ds = spec.read(columns=[spec.id_column])
        batch = next(iter(ds))
        assert list(batch) == [spec.id_column]

    # -- resume ------------------------------------------------------------------------------
    @pytest.mark.parametrize("case", range(6))
    def test_resume_at_random_points(self, spec: ConformanceSpec, case: int) -> None:
        rnd = random.Random(case)
        world_size = rnd.choice((1, 2, 3))
        rank = rnd.randrange(world_size)
        kw = {
            "rank": rank,
            "world_size": world_size,
            "shuffle": case % 2 == 1,
            "seed": case,
            "num_epochs": 2,
            "batch_size": rnd.choice((16, 50, 64)),
            "prefetch": rnd.choice((0, 3)),
        }
        if kw["shuffle"]:
            kw["shuffle_buffer"] = rnd.choice((100, 1000))
        whole = ids_of(list(spec.read(**kw)), spec.id_column)
        ds = spec.read(**kw)
        got: list[np.ndarray] = []
        remaining = len(whole)
        while remaining > 0:
            it = iter(ds)
            for _ in range(rnd.randint(1, 12)):
                try:
                    b = next(it)
                except StopIteration:
                    break
                got.append(b[spec.id_column])
                remaining -= len(b[spec.id_column])
            it.close()  # type: ignore[attr-defined]
            state = json.loads(json.dumps(ds.state_dict()))
            ds = spec.read(**kw)  # a new process would do exactly this
            ds.load_state_dict(state)
        np.testing.assert_array_equal(np.concatenate(got), whole)

    def test_state_of_other_arguments_is_refused(self, spec: ConformanceSpec) -> None:
        ds = spec.read(shuffle=True, seed=1)
        next(iter(ds))
        state = ds.state_dict()
        with pytest.raises(data.StateError, match="seed"):
            spec.read(shuffle=True, seed=2).load_state_dict(state)
        with pytest.raises(data.StateError, match="world_size"):
            spec.read(shuffle=True, seed=1, rank=0, world_size=2).load_state_dict(state)

    # -- bad input ---------------------------------------------------------------------------
    def test_unknown_column_lists_existing(self, spec: ConformanceSpec) -> None:
        with pytest.raises(data.ColumnNotFoundError) as ei:
            spec.read(columns=[spec.id_column, "no_such_column"])
        msg = str(ei.value)
        assert "no_such_column" in msg and spec.id_column in msg
        assert isinstance(ei.value, KeyError) and isinstance(ei.value, data.DataError)

    def missing_source(self, spec: ConformanceSpec) -> Any:
        """A location of this kind that does not exist (None: the source cannot express one)."""
        return None

    def empty_source(self, spec: ConformanceSpec) -> Any:
        """A dataset of this kind with no rows (None: the source cannot express one)."""
        return None

    def test_missing_dataset(self, spec: ConformanceSpec) -> None:
        src = self.missing_source(spec)
        if src is None:
            pytest.skip("this source has no way to name a missing dataset")
        with pytest.raises(data.DataError) as ei:
            data.read(src, rank=0, world_size=1, **spec.options)
        assert str(src).rstrip("/").split("/")[-1] in str(ei.value)

    def test_empty_dataset(self, spec: ConformanceSpec) -> None:
        src = self.empty_source(spec)
        if src is None:
            pytest.skip("this source has no way to express an empty dataset")
        with pytest.raises(data.EmptyDatasetError):
            data.read(src, rank=0, world_size=1, **spec.options)
        ds = data.read(src, rank=0, world_size=3, allow_empty=True, **spec.options)
        assert list(ds) == [] and len(ds) == 0

    def test_rank_with_nothing_to_read(self, spec: ConformanceSpec) -> None:
        # more readers than rows: the extra readers get an empty share and iterate nothing
        n = len(spec.ids)
        ws = n + 2
        for rank in (n, n + 1):
            ds = spec.read(rank=rank, world_size=ws)
            assert ds.num_rows == 0 and list(ds) == [] and len(ds) == 0
        ds = spec.read(rank=0, world_size=ws)
        assert ds.num_rows == 1


class DynamicConformance:
    """What every source must also do under ``assignment="dynamic"``: read the row ranges the
    dispatcher cuts from its splits (``min_rows`` is small here so that it cuts many), exactly
    once across concurrent readers and DataLoader workers, deterministically for one reader,
    and resume exactly from a state (the host's state carries the dispatcher's).

    Mix it into a class that provides the ``spec`` fixture (like :class:`SourceConformance`).
    """

    @staticmethod
    def dyn(spec: ConformanceSpec, **kw: Any) -> data.Dataset:
        from kubeai_train.data.dispatch.client import DynamicAssignment

        kw.setdefault("assignment", DynamicAssignment(min_rows=16, timeout=20.0))
        return spec.read(**kw)

    @staticmethod
    def concurrently(datasets: list[data.Dataset], column: str) -> list[np.ndarray]:
        import threading

        out: list[list[np.ndarray]] = [[] for _ in datasets]
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                out[i] = [b[column] for b in datasets[i]]
            except BaseException as e:  # re-raised by the test thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(datasets))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        assert not any(t.is_alive() for t in threads), "a reader hung"
        return [np.concatenate(o) if o else np.zeros(0, np.int64) for o in out]

    @pytest.mark.parametrize("shuffle", [False, True])
    @pytest.mark.parametrize("world_size", (1, 3))
    def test_dynamic_exactly_once_across_concurrent_readers(
        self, spec: ConformanceSpec, world_size: int, shuffle: bool
    ) -> None:
        # rank 0 first: it hosts the dispatcher the others reach over HTTP
        dss = [
            self.dyn(spec, rank=r, world_size=world_size, shuffle=shuffle, seed=11) for r in range(world_size)
        ]
        every = np.concatenate(self.concurrently(dss, spec.id_column))
        assert len(every) == len(spec.ids), "a row was read twice or not at all"
        np.testing.assert_array_equal(np.sort(every), np.sort(spec.ids))

    def test_dynamic_exactly_once_with_loader_workers(self, spec: ConformanceSpec) -> None:
        import threading

        dss = [self.dyn(spec, rank=r, world_size=2, shuffle=True, seed=5, prefetch=2) for r in range(2)]
        got: list[np.ndarray] = []
        threads = [
            threading.Thread(
                target=lambda d=d: got.append(torch_ids(d, LOADER_WORKERS[1], spec.id_column)[0])
            )
            for d in dss
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        every = np.concatenate(got)
        assert len(every) == len(spec.ids)
        np.testing.assert_array_equal(np.sort(every), np.sort(spec.ids))

    @pytest.mark.parametrize("drop_last", [False, True])
    def test_dynamic_batches_are_exact(self, spec: ConformanceSpec, drop_last: bool) -> None:
        bs = 37
        sizes = [len(b[spec.id_column]) for b in self.dyn(spec, batch_size=bs, drop_last=drop_last)]
        n = len(spec.ids)
        assert all(s == bs for s in sizes[:-1])
        if drop_last:
            assert sum(sizes) == n - n % bs and sizes[-1] == bs
        else:
            assert sum(sizes) == n and sizes[-1] == (n % bs or bs)

    def test_dynamic_order_is_a_function_of_seed_and_epoch_for_one_reader(
        self, spec: ConformanceSpec
    ) -> None:
        a = ids_of(list(self.dyn(spec, shuffle=True, seed=7, num_epochs=2)), spec.id_column)
        b = ids_of(list(self.dyn(spec, shuffle=True, seed=7, num_epochs=2, prefetch=0)), spec.id_column)
        np.testing.assert_array_equal(a, b)
        n = len(spec.ids)
        np.testing.assert_array_equal(np.sort(a[:n]), np.sort(spec.ids))
        np.testing.assert_array_equal(np.sort(a[n:]), np.sort(spec.ids))
        assert not np.array_equal(a[:n], a[n:]), "epochs 0 and 1 came in the same order"

    @pytest.mark.parametrize("case", range(4))
    def test_dynamic_resume_at_random_points(self, spec: ConformanceSpec, case: int) -> None:
        rnd = random.Random(100 + case)
        kw: dict[str, Any] = {
            "shuffle": case % 2 == 1,
            "seed": case,
            "num_epochs": 2,
            "batch_size": rnd.choice((16, 50, 64)),
            "prefetch": rnd.choice((0, 3)),
        }
        whole = ids_of(list(self.dyn(spec, **kw)), spec.id_column)
        ds = self.dyn(spec, **kw)
        got: list[np.ndarray] = []
        remaining = len(whole)
        while remaining > 0:
            it = iter(ds)
            for _ in range(rnd.randint(1, 12)):
                try:
                    b = next(it)
                except StopIteration:
                    break
                got.append(b[spec.id_column])
                remaining -= len(b[spec.id_column])
            it.close()  # type: ignore[attr-defined]
            state = json.loads(json.dumps(ds.state_dict()))
            ds = self.dyn(spec, **kw)  # a new process (the host: the dispatcher restarts too)
            ds.load_state_dict(state)
        np.testing.assert_array_equal(np.concatenate(got), whole)
