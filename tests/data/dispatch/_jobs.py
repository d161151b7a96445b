"""The function every process of the killed-and-resumed job runs (``run_processes``)."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from kubeai_train import cluster, data


def _write(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)  # a checkpoint file is whole or absent


def _load(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _wait(paths: list[str], what: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {[p for p in paths if not os.path.exists(p)]} never appeared")
        time.sleep(0.005)


def read_checkpoint_kill(root: str, ckpt: str, every: int, kill_step: int, slow_rank: int) -> dict[str, Any]:
    """Read ``root`` with ``assignment="dynamic"``, checkpointing (ids, state) every ``every`` steps.

    A checkpoint at step s is a consistent cut, as a trainer's barrier makes it: ranks > 0 write
    theirs and wait; rank 0 takes its state (which holds the dispatcher's) only once every other
    rank's file of step s exists, so the dispatcher's acknowledged pieces include every piece the
    readers' states count as delivered, and no reader delivers a batch past s before it. With
    ``kill_step`` > 0, rank 0 SIGKILLs every process of the job two steps after the checkpoint
    of step ``kill_step`` (pieces read ahead, acknowledgements in flight); with 0 the ranks resume
    from the latest complete checkpoint and finish the epoch.
    """
    info = cluster.current()
    rank, world = info.rank, info.world_size
    os.makedirs(ckpt, exist_ok=True)

    def file(r: int, s: int) -> str:
        return os.path.join(ckpt, f"step{s}-rank{r}.json")

    _write(os.path.join(ckpt, f"pid{rank}"), os.getpid())
    ds = data.read(root, batch_size=40, prefetch=2, shuffle=True, seed=5, assignment="dynamic")
    ids: list[int] = []
    step = 0
    if kill_step == 0:
        steps = [
            int(n[4:].split("-")[0])
            for n in os.listdir(ckpt)
            if n.startswith("step") and n.endswith("-rank0.json")
        ]
        step = max(steps)
        saved = _load(file(rank, step))
        ids = saved["ids"]
        ds.load_state_dict(saved["state"])
        # the other ranks start reading once rank 0 restored the dispatcher (a trainer's
        # barrier after restore): the dispatcher is served from data.read on, before the load
        ready = os.path.join(ckpt, f"restored{step}")
        if rank == 0:
            _write(ready, step)
        _wait([ready], "rank 0's restore")
    else:
        ups = [os.path.join(ckpt, f"up{r}") for r in range(world)]
        _write(ups[rank], 1)
        _wait(ups, "every rank up")
    kill_at = None
    for b in ds:
        ids.extend(int(x) for x in b["id"])
        step += 1
        time.sleep(0.03 if rank == slow_rank else 0.005)  # compute-proportional; one rank slow
        if kill_step and step % every == 0:
            if rank != 0:
                _write(file(rank, step), {"ids": ids, "state": ds.state_dict()})
                _wait([file(0, step)], f"rank 0's checkpoint of step {step}")
            else:
                _wait([file(r, step) for r in range(1, world)], f"checkpoint of step {step}")
                _write(file(0, step), {"ids": ids, "state": ds.state_dict()})
            if rank == 0 and kill_step and step == kill_step:
                kill_at = step + 2
        if kill_at is not None and step == kill_at:
            pids = [_load(os.path.join(ckpt, f"pid{r}")) for r in range(world)]
            for pid in [p for p in pids if p != os.getpid()] + [os.getpid()]:
                os.kill(pid, signal.SIGKILL)
    _write(os.path.join(ckpt, f"final-rank{rank}.json"), {"ids": ids, "steps": step})
    return {"rank": rank, "rows": len(ids), "steps": step}
