"""``data.read(..., assignment="dynamic")`` end to end over real HTTP: exactly-once coverage
(a row-id column) with concurrent readers, one slow; a reader killed mid-epoch and restarted;
the job stopped and resumed from its states; DataLoader workers; the unreachable error."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubeai_train import data
from kubeai_train.data.dispatch import server as srv
from kubeai_train.data.dispatch.client import DynamicAssignment
from kubeai_train.data.dispatch.core import DispatchError


def write_ids(root: Path, files: int = 4, rows: int = 1500, row_group: int = 250) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    ids = np.arange(files * rows, dtype=np.int64)
    for f in range(files):
        part = ids[f * rows : (f + 1) * rows]
        t = pa.table({"id": part, "x": (part * 7 % 13).astype(np.float32)})
        pq.write_table(t, root / f"part-{f}.parquet", row_group_size=row_group)
    return ids


def dyn(lease: float = 30.0, min_rows: int = 16) -> DynamicAssignment:
    return DynamicAssignment(min_rows=min_rows, lease=lease, timeout=10.0)


def read(root: Path, rank: int, world: int, **kw: Any) -> data.Dataset:
    kw.setdefault("assignment", dyn())
    kw.setdefault("batch_size", 64)
    return data.read(str(root), rank=rank, world_size=world, **kw)


def run_readers(datasets: list[data.Dataset], delay: dict[int, float]) -> list[list[np.ndarray]]:
    out: list[list[np.ndarray]] = [[] for _ in datasets]
    errors: list[BaseException] = []
    start = threading.Barrier(len(datasets))

    def work(i: int) -> None:
        try:
            start.wait(10)
            for b in datasets[i]:
                out[i].append(b["id"])
                time.sleep(delay.get(i, 0.0))
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(datasets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a reader hung"
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_four_readers_one_slow_every_row_once(tmp_path: Path, shuffle: bool) -> None:
    ids = write_ids(tmp_path / "d")
    dss = [read(tmp_path / "d", r, 4, shuffle=shuffle, seed=3) for r in range(4)]
    # per-batch compute: the slow reader is 6x slower (sleeps, not CPU, so the test stays fair
    # on a busy machine)
    got = run_readers(dss, {0: 0.005, 1: 0.005, 2: 0.005, 3: 0.03})
    every = np.concatenate([np.concatenate(g) for g in got if g])
    np.testing.assert_array_equal(np.sort(every), ids)
    rows = [sum(len(b) for b in g) for g in got]
    assert rows[3] < sum(rows[:3]) / 3, f"the slow reader did not read less: {rows}"
    stats = dss[0].assignment.stats(0)  # type: ignore[attr-defined]
    assert stats["complete"] and sum(r["rows"] for r in stats["readers"].values()) == len(ids)
    assert stats["readers"]["3.0"]["rows"] == rows[3]
    for g in got:  # exact batches but each reader's last
        assert all(len(b) == 64 for b in g[:-1])


def test_two_epochs_cover_each_epoch_once(tmp_path: Path) -> None:
    ids = write_ids(tmp_path / "d", files=2, rows=700)
    dss = [read(tmp_path / "d", r, 2, shuffle=True, seed=1, num_epochs=2) for r in range(2)]
    got = run_readers(dss, {1: 0.002})
    every = np.concatenate([np.concatenate(g) for g in got])
    assert len(every) == 2 * len(ids)
    counts = np.bincount(every, minlength=len(ids))
    assert (counts == 2).all()


def test_reader_killed_mid_epoch_and_restarted_from_its_state(tmp_path: Path) -> None:
    # reader 1 stops after a few batches with pieces read ahead; it "restarts" from its last
    # state (a new Dataset loading it), while reader 0 keeps reading
    ids = write_ids(tmp_path / "d")
    a = dyn(lease=30.0)
    r0 = read(tmp_path / "d", 0, 2, assignment=a, prefetch=4)
    r1 = read(tmp_path / "d", 1, 2, assignment=dyn(), prefetch=4)
    got1: list[np.ndarray] = []
    it = iter(r1)
    for _ in range(5):
        got1.append(next(it)["id"])
    state = json.loads(json.dumps(r1.state_dict()))
    assert state["assignment"]["piece"] is not None  # partway through a piece
    del it  # killed: no clean exit path is relied on (the generator is just dropped)
    r1b = read(tmp_path / "d", 1, 2, assignment=dyn())
    r1b.load_state_dict(state)
    got = run_readers([r0, r1b], {1: 0.001})
    every = np.concatenate([*got1, *got[0], *got[1]])
    np.testing.assert_array_equal(np.sort(every), ids)


def test_dead_reader_pieces_go_to_others_after_its_lease(tmp_path: Path) -> None:
    ids = write_ids(tmp_path / "d", files=2, rows=600)
    r1 = read(tmp_path / "d", 1, 2, assignment=dyn(lease=1.0), prefetch=0)
    r0 = read(tmp_path / "d", 0, 2, assignment=dyn(lease=1.0), prefetch=0)
    it = iter(r1)
    dead = [next(it)["id"] for _ in range(3)]
    # reader 1 dies holding a piece (never acked, no heartbeat: its thread is gone)
    r1.assignment._active.clear()  # type: ignore[attr-defined]
    time.sleep(0.6)  # silent for over half its lease: the others wait for its pieces
    t0 = time.monotonic()
    rest = np.concatenate([b["id"] for b in r0])
    assert time.monotonic() - t0 < 20
    # its delivered rows were never acknowledged: they are read again, nothing is lost
    np.testing.assert_array_equal(np.unique(rest), ids)
    assert len(rest) == len(ids)
    assert len(np.concatenate(dead)) == 192


def test_whole_job_stopped_and_resumed_from_states(tmp_path: Path) -> None:
    ids = write_ids(tmp_path / "d")
    kw: dict[str, Any] = {"shuffle": True, "seed": 9}
    dss = [read(tmp_path / "d", r, 3, **kw) for r in range(3)]
    its = [iter(d) for d in dss]
    got: list[np.ndarray] = []
    for _ in range(6):  # a synchronous step: every reader delivers one batch
        for it in its:
            got.append(next(it)["id"])
    states = [json.loads(json.dumps(d.state_dict())) for d in dss]  # the job's checkpoint
    assert "dispatcher" in states[0]["assignment"]  # rank 0 hosts: its state holds the dispatcher's
    for it in its:
        it.close()  # type: ignore[attr-defined]
    # every process restarts: rank 0 first (it hosts), then the others; all load their state
    new = [read(tmp_path / "d", r, 3, **kw) for r in range(3)]
    for d, st in zip(new, states, strict=True):
        d.load_state_dict(st)
    rest = run_readers(new, {})
    every = np.concatenate([*got, *(b for g in rest for b in g)])
    assert len(every) == len(ids), "rows lost or read twice across the restart"
    np.testing.assert_array_equal(np.sort(every), ids)


def test_chief_restarted_under_live_readers_loses_and_repeats_nothing(tmp_path: Path) -> None:
    # rank 0 (the host) dies and comes back from its last state, which holds the dispatcher's
    # state of that moment; rank 1 lives on, having read and acknowledged more since. The
    # restored dispatcher is a new incarnation: rank 1 says hello again with what it holds and
    # delivered, and the two states agree
    ids = write_ids(tmp_path / "d", files=3, rows=900, row_group=150)
    r0 = read(tmp_path / "d", 0, 2, shuffle=True, seed=4, prefetch=2)
    r1 = read(tmp_path / "d", 1, 2, shuffle=True, seed=4, prefetch=2)
    it0, it1 = iter(r0), iter(r1)
    got0 = [next(it0)["id"] for _ in range(4)]
    got1 = [next(it1)["id"] for _ in range(6)]
    state0 = json.loads(json.dumps(r0.state_dict()))  # rank 0's last checkpoint
    got0 += [next(it0)["id"] for _ in range(5)]  # read after it: lost with rank 0
    got1 += [next(it1)["id"] for _ in range(5)]  # acknowledged after it: rank 1 is live
    r0.assignment._active.clear()  # type: ignore[attr-defined]  # rank 0 is gone
    del it0
    back = read(tmp_path / "d", 0, 2, shuffle=True, seed=4, prefetch=2)
    back.load_state_dict(state0)
    rest1: list[np.ndarray] = []
    out: list[np.ndarray] = []

    def finish_rank1() -> None:
        for b in it1:
            rest1.append(b["id"])

    t = threading.Thread(target=finish_rank1)
    t.start()
    out = [b["id"] for b in back]
    t.join(60)
    assert not t.is_alive()
    every = np.concatenate([*got0[:4], *out, *got1, *rest1])
    assert len(every) == len(ids), "rows lost or read twice across the chief's restart"
    np.testing.assert_array_equal(np.sort(every), ids)


def test_dataloader_workers_are_readers_of_their_own(tmp_path: Path) -> None:
    import torch.utils.data as tud

    ids = write_ids(tmp_path / "d", files=3, rows=800)
    dss = [read(tmp_path / "d", r, 2, prefetch=2) for r in range(2)]
    out: list[np.ndarray] = []

    def loader(ds: data.Dataset) -> None:
        for b in tud.DataLoader(ds.to_torch(), batch_size=None, num_workers=2, timeout=60):
            out.append(b["id"].numpy())

    threads = [threading.Thread(target=loader, args=(d,)) for d in dss]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    every = np.concatenate(out)
    np.testing.assert_array_equal(np.sort(every), ids)
    readers = dss[0].assignment.stats(0)["readers"]  # type: ignore[attr-defined]
    assert set(readers) == {"0.0", "0.1", "1.0", "1.1"}


def _late_first_worker(worker_id: int) -> None:
    if worker_id == 0:
        time.sleep(1.5)


def test_a_late_dataloader_worker_does_not_wait_for_its_siblings_piece(tmp_path: Path) -> None:
    # worker 1 takes the only piece and blocks after its prefetched batches, since the loader
    # takes batches from its workers in turn and waits for worker 0's first one; worker 0 finds
    # nothing pending and must end (not wait for worker 1's piece: that waited for a lease)
    import torch.utils.data as tud

    ids = write_ids(tmp_path / "d", files=1, rows=1000, row_group=1000)  # one split, one piece
    ds = read(tmp_path / "d", 0, 1, assignment=dyn(lease=60.0, min_rows=100_000), prefetch=2)
    t0 = time.monotonic()
    loader = tud.DataLoader(
        ds.to_torch(), batch_size=None, num_workers=2, timeout=20, worker_init_fn=_late_first_worker
    )
    got = np.concatenate([b["id"].numpy() for b in loader])
    assert time.monotonic() - t0 < 15
    np.testing.assert_array_equal(np.sort(got), ids)
    assert set(ds.assignment.stats(0)["readers"]) == {"0.0", "0.1"}  # type: ignore[attr-defined]


def test_unreachable_dispatcher_fails_with_one_line_naming_it(tmp_path: Path) -> None:
    write_ids(tmp_path / "d", files=1, rows=100)
    a = DynamicAssignment(address="127.0.0.1:9", timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(DispatchError) as ei:
        list(data.read(str(tmp_path / "d"), rank=1, world_size=2, assignment=a))
    msg = str(ei.value)
    assert time.monotonic() - t0 < 5
    assert "\n" not in msg
    assert msg.startswith("cannot reach dispatcher at http://127.0.0.1:9 after ")
    assert "attempts (" in msg


def test_address_from_the_cluster_environment() -> None:
    tf = {
        "TF_CONFIG": json.dumps(
            {
                "cluster": {"chief": ["c0:2222"], "worker": ["w0:2222"], "ps": ["p:2222"]},
                "task": {"type": "worker", "index": 0},
            }
        )
    }
    assert srv.address(tf) == ("c0", 2223)
    torch = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "m", "MASTER_PORT": "23456"}
    assert srv.address(torch) == ("m", 23457)
    assert srv.address({**torch, srv.ADDRESS_ENV: "h:7000"}) == ("h", 7000)
    with pytest.raises(DispatchError, match=srv.ADDRESS_ENV):
        srv.address({srv.ADDRESS_ENV: "nonsense"})


def test_dynamic_is_registered_and_splits_is_refused(tmp_path: Path) -> None:
    write_ids(tmp_path / "d", files=1, rows=100)
    ds = data.read(str(tmp_path / "d"), rank=0, world_size=1, assignment="dynamic", batch_size=30)
    assert isinstance(ds.assignment, DynamicAssignment)
    with pytest.raises(TypeError, match="dynamic"):
        ds.splits()
    assert [len(b["id"]) for b in ds] == [30, 30, 30, 10]
    write_ids(tmp_path / "other", files=1, rows=50)
    with pytest.raises(DispatchError, match="its own"):
        data.read(str(tmp_path / "other"), rank=0, world_size=1, assignment=ds.assignment)


KILLED_READER = """
import json, os, signal, sys
import numpy as np
from kubeai_train import data
from kubeai_train.data.dispatch.client import DynamicAssignment

root, ckpt, address, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ds = data.read(root, rank=1, world_size=2, batch_size=64, prefetch=4,
               assignment=DynamicAssignment(address=address, timeout=30.0))
ids = []
if os.path.exists(ckpt):
    saved = json.load(open(ckpt))
    ids, _ = saved["ids"], ds.load_state_dict(saved["state"])
n = 0
for b in ds:
    ids.extend(int(x) for x in b["id"])
    # the trainer's checkpoint after each step: what it consumed and the reader's state, atomically
    with open(ckpt + ".tmp", "w") as f:
        json.dump({"ids": ids, "state": ds.state_dict()}, f)
    os.replace(ckpt + ".tmp", ckpt)
    n += 1
    if n == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)  # pieces read ahead, acknowledgements in flight
print("done", len(ids))
"""


@pytest.mark.integration
def test_reader_process_killed_mid_epoch_and_restarted(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    ids = write_ids(tmp_path / "d")
    r0 = read(tmp_path / "d", 0, 2, assignment=DynamicAssignment(min_rows=16, lease=20.0, timeout=10.0))
    address = str(r0.assignment.url).removeprefix("http://")  # type: ignore[attr-defined]
    script = tmp_path / "reader.py"
    script.write_text(KILLED_READER)
    ckpt = str(tmp_path / "ckpt.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(kill_after: int) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, str(script), str(tmp_path / "d"), ckpt, address, str(kill_after)]
        return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)

    got0: list[np.ndarray] = []

    def reader0() -> None:
        # rank 0 starts once rank 1 is reading (a process starts in about a second here)
        deadline = time.monotonic() + 30
        while not Path(ckpt).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        for b in r0:
            got0.append(b["id"])
            time.sleep(0.02)

    t = threading.Thread(target=reader0)
    t.start()
    first = run(kill_after=8)
    assert first.returncode == -9, first.stderr[-2000:]
    before = json.loads(Path(ckpt).read_text())
    assert len(before["ids"]) == 8 * 64 and before["state"]["assignment"]["piece"] is not None
    second = run(kill_after=0)
    assert second.returncode == 0 and "done" in second.stdout, second.stderr[-2000:]
    t.join(60)
    assert not t.is_alive()
    got1 = json.loads(Path(ckpt).read_text())["ids"]
    every = np.concatenate([np.concatenate(got0), np.asarray(got1, dtype=np.int64)])
    assert len(got1) > len(before["ids"]), "the restarted reader read nothing"
    assert len(every) == len(ids), "rows lost or read twice across the kill"
    np.testing.assert_array_equal(np.sort(every), ids)
