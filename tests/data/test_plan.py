"""The split plan made once per job (kubeai_train.data.plan): footers read by the planner only,
counted by the local OSS server; stale, missing and unparsable plans."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubeai_train import data
from kubeai_train.data.files import FileSource
from kubeai_train.data.plan import PLAN_DIR_ENV
from kubeai_train.testing.oss_server import OSSServer

FILES, GROUPS, ROWS = 6, 2, 4000


def _table(seed: int, n: int = ROWS) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols = {f"c{i:02d}": rng.normal(size=n) for i in range(8)}
    cols["id"] = np.arange(seed * n, (seed + 1) * n)
    return pa.table(cols)


def _write(root: Path, files: int = FILES) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        pq.write_table(_table(i), root / f"part-{i}.parquet", row_group_size=ROWS // GROUPS)


def _ids(ds: data.Dataset) -> list[int]:
    return [int(x) for b in ds for x in b["id"]]


def test_local_plan_is_written_once_and_loaded_without_footers(tmp_path, monkeypatch):
    _write(tmp_path / "d")
    plans = tmp_path / "plans"
    first = FileSource(str(tmp_path / "d"), plan_dir=str(plans), planner=True)
    assert first.plan_source == "wrote" and len(list(plans.glob("*.plan.json"))) == 1
    opened = []
    real = FileSource._inspect
    monkeypatch.setattr(FileSource, "_inspect", lambda self, f: (opened.append(f.path), real(self, f)))
    second = FileSource(str(tmp_path / "d"), plan_dir=str(plans), planner=False)
    assert second.plan_source == "loaded" and opened == []  # no footer read to plan
    assert list(second.splits()) == list(first.splits())
    assert second.schema() == first.schema()
    # reading goes through the plan's footers too, and gives every row once over two ranks
    ids = sorted(
        _ids(data.read(second, columns=["id"], batch_size=700, rank=r, world_size=2)) for r in range(2)
    )
    assert sorted(ids[0] + ids[1]) == list(range(FILES * ROWS))
    # a planner finding a matching plan reuses it (a restarted job plans nothing)
    again = FileSource(str(tmp_path / "d"), plan_dir=str(plans), planner=True)
    assert again.plan_source == "loaded"


def test_a_stale_plan_is_not_used(tmp_path, caplog):
    _write(tmp_path / "d")
    plans = str(tmp_path / "plans")
    FileSource(str(tmp_path / "d"), plan_dir=plans, planner=True)
    pq.write_table(_table(99, 500), tmp_path / "d" / "part-9.parquet")  # a file added since
    caplog.set_level(logging.WARNING, "kubeai_train.data")
    waiting = FileSource(str(tmp_path / "d"), plan_dir=plans, planner=False, plan_timeout=0.2)
    assert waiting.plan_source == "own" and sum(s.num_rows for s in waiting.splits()) == FILES * ROWS + 500
    assert "no split plan" in caplog.text and "reading the footers here" in caplog.text
    # ... and wrote what it planned: the next process of the job reads no footer
    assert FileSource(str(tmp_path / "d"), plan_dir=plans, planner=True).plan_source == "loaded"


def test_unparsable_plan_is_ignored_and_replaced(tmp_path, caplog):
    _write(tmp_path / "d", files=2)
    plans = tmp_path / "plans"
    FileSource(str(tmp_path / "d"), plan_dir=str(plans), planner=True)
    (path,) = plans.glob("*.plan.json")
    path.write_text("{not json")
    caplog.set_level(logging.WARNING, "kubeai_train.data")
    src = FileSource(str(tmp_path / "d"), plan_dir=str(plans), planner=True)
    assert src.plan_source == "wrote" and "unparsable" in caplog.text
    assert FileSource(str(tmp_path / "d"), plan_dir=str(plans), planner=False).plan_source == "loaded"


def test_plan_dir_from_the_environment_and_bad_timeout(tmp_path, monkeypatch):
    _write(tmp_path / "d", files=1)
    monkeypatch.setenv(PLAN_DIR_ENV, str(tmp_path / "plans"))
    assert FileSource(str(tmp_path / "d"), planner=True).plan_source == "wrote"
    assert FileSource(str(tmp_path / "d"), plan_dir="").plan_source == "none"  # "" turns it off
    with pytest.raises(ValueError, match="plan_timeout must be a number of seconds >= 0, got -1"):
        FileSource(str(tmp_path / "d"), plan_timeout=-1)
    # a callable filter has no identity the processes share: each plans by itself
    src = FileSource(str(tmp_path / "d"), partition_filter=lambda parts: True, planner=False, plan_timeout=0)
    assert src.plan_source == "none"


# ------------------------------------------------------------------ request counts on OSS
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with OSSServer(tmp_path_factory.mktemp("oss-plan"), buckets=["data"]) as srv:
        yield srv


def _job_reads(server: OSSServer, plan_dir: str | None) -> tuple[dict, list[int]]:
    """Two ranks of one job each plan and read their share of column c05 (and id)."""
    server.reset_stats()
    ids = []
    for rank in range(2):
        ds = data.read(
            "oss://data/plan/",
            columns=["id"],
            batch_size=1000,
            rank=rank,
            world_size=2,
            storage_options=server.storage_options(),
            plan_dir=plan_dir or "",
            planner=rank == 0,
        )
        ids += _ids(ds)
    return server.stats(), ids


@pytest.mark.integration
def test_footers_are_read_once_per_job_on_oss(server, tmp_path):
    root = Path(server.root, "data", "plan")
    _write(root)
    st_plan, ids_plan = _job_reads(server, str(tmp_path / "plans"))
    st_none, ids_none = _job_reads(server, None)
    assert sorted(ids_plan) == sorted(ids_none) == list(range(FILES * ROWS))
    sizes = {f"data/plan/part-{i}.parquet": os.path.getsize(root / f"part-{i}.parquet") for i in range(FILES)}

    def footer_gets(stats: dict) -> int:  # ranged GETs ending at the file's end: footer reads
        return sum(1 for key, _, end in stats["get_ranges"] if key in sizes and end >= sizes[key])

    def chunk_gets(stats: dict) -> int:
        return sum(1 for key, _, end in stats["get_ranges"] if key in sizes and end < sizes[key])

    print("with plan", st_plan["requests"], footer_gets(st_plan), chunk_gets(st_plan))
    print("without", st_none["requests"], footer_gets(st_none), chunk_gets(st_none))
    # with the plan: one footer GET per file (the planner's), then only the column chunks
    assert footer_gets(st_plan) == FILES
    assert st_plan["requests"]["GetObject"] == FILES + chunk_gets(st_plan)
    assert chunk_gets(st_plan) <= FILES * GROUPS  # one coalesced range per row group read
    # without it every rank reads every footer to plan, and again to read
    assert footer_gets(st_none) >= 2 * FILES
    assert st_plan["bytes_total"] < st_none["bytes_total"]


def test_first_to_lock_plans_while_the_others_wait(tmp_path, monkeypatch):
    import threading
    import time

    _write(tmp_path / "d", files=3)
    plans = str(tmp_path / "plans")
    opened: list[str] = []
    real = FileSource._inspect

    def slow_inspect(self, f):
        opened.append(f.path)
        time.sleep(0.05)  # a slow footer read: the other process arrives while the lock is held
        return real(self, f)

    monkeypatch.setattr(FileSource, "_inspect", slow_inspect)
    out: list[FileSource] = []
    threads = [
        threading.Thread(target=lambda: out.append(FileSource(str(tmp_path / "d"), plan_dir=plans)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(s.plan_source for s in out) == ["loaded", "loaded", "wrote"]
    assert len(opened) == 3  # each footer read once, by the one that took the lock
    assert not list((tmp_path / "plans").glob("*.lock"))
    # a dataset only this process reads: it takes the lock and plans, nobody to wait for
    _write(tmp_path / "e", files=1)
    assert FileSource(str(tmp_path / "e"), plan_dir=plans, plan_timeout=0).plan_source == "wrote"
