"""Launcher overhead and fail-fast, side by side with torchrun, in one run.

Claims measured:
1. Start-up overhead: the same 2-process gloo script (init_process_group + one all_reduce)
   under ``torchrun --standalone --nproc-per-node 2`` and under ``python -m
   kubeai_train.launch`` (2 replicas x 1 process, and 1 replica x 2 processes). Reported: the
   wall time of the whole run, and the time from the launch to the moment the last rank's
   script starts (its first line, before importing torch), medians over the repetitions, with
   the ratio to torchrun.
2. Fail-fast: rank 1 exits with code 3 while rank 0 waits; the time from the failing rank's
   exit to the launcher's exit (and its exit code), for both launchers.

Runs are interleaved (A B C A B C ...) so that machine load drifts hit every launcher alike.

    python benchmarks/bench_launch.py [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OK_SCRIPT = """
import os, sys, time
t0 = time.time()
with open(os.path.join(os.environ["BENCH_OUT"], f"start-{os.environ['RANK']}"), "w") as f:
    f.write(repr(t0))
from datetime import timedelta
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == dist.get_world_size()
dist.destroy_process_group()
"""

FAIL_SCRIPT = """
import os, sys, time
rank = int(os.environ["RANK"])
if rank == 1:
    time.sleep(1.0)
    with open(os.path.join(os.environ["BENCH_OUT"], "failed"), "w") as f:
        f.write(repr(time.time()))
    sys.exit(3)
time.sleep(120)
"""


def launchers(script: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "torchrun --standalone --nproc-per-node 2": [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        "kubeai launch --workers 2": [py, "-m", "kubeai_train.launch", "--framework", "torch", "--workers", "2", "--grace-period", "2", str(script)],
        "kubeai launch --workers 1 --nproc-per-node 2": [
            py, "-m", "kubeai_train.launch", "--framework", "torch", "--workers", "1", "--nproc-per-node", "2", "--grace-period", "2", str(script),
        ],
    }  # fmt: skip


def run_once(cmd: list[str], out: Path) -> tuple[float, float | None, int, float]:
    env = {**os.environ, "BENCH_OUT": str(out), "GLOO_SOCKET_IFNAME": "lo"}
    for name in ("TF_CONFIG", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    t0 = time.time()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180
    )
    t1 = time.time()
    starts = [float(p.read_text()) for p in out.glob("start-*")]
    last_start = max(starts) - t0 if len(starts) == 2 else None
    failed = out / "failed"
    fail_to_exit = t1 - float(failed.read_text()) if failed.exists() else float("nan")
    return t1 - t0, last_start, proc.returncode, fail_to_exit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        tmpd = Path(tmp)
        ok, fail = tmpd / "ok.py", tmpd / "fail.py"
        ok.write_text(OK_SCRIPT)
        fail.write_text(FAIL_SCRIPT)
        walls: dict[str, list[float]] = {}
        starts: dict[str, list[float]] = {}
        fails: dict[str, list[float]] = {}
        codes: dict[str, set[int]] = {}
        n = 0
        for _ in range(args.reps):
            for kind, script in (("ok", ok), ("fail", fail)):
                for name, cmd in launchers(script).items():
                    n += 1
                    out = tmpd / f"run{n}"
                    out.mkdir()
                    wall, start, code, f2e = run_once(cmd, out)
                    if kind == "ok":
                        if code != 0:
                            raise SystemExit(f"{name} failed with code {code}")
                        walls.setdefault(name, []).append(wall)
                        starts.setdefault(name, []).append(start or float("nan"))
                    else:
                        fails.setdefault(name, []).append(f2e)
                        codes.setdefault(name, set()).add(code)
    base = "torchrun --standalone --nproc-per-node 2"
    med = {k: statistics.median(v) for k, v in walls.items()}
    med_start = {k: statistics.median(v) for k, v in starts.items()}
    print(f"2-process gloo all_reduce script, {args.reps} repetitions each, interleaved; medians (seconds)\n")
    print("| launcher | wall time | ratio | launch -> last rank's script starts | ratio |")
    print("|---|---:|---:|---:|---:|")
    for k in walls:
        print(
            f"| {k} | {med[k]:.2f} | {med[k] / med[base]:.2f} | {med_start[k]:.3f} | {med_start[k] / med_start[base]:.2f} |"
        )
    print("\nFail-fast: rank 1 exits 3 after 1 s, rank 0 sleeps; failing rank's exit -> launcher exit\n")
    print("| launcher | median | max | launcher exit code(s) |")
    print("|---|---:|---:|---|")
    for k, v in fails.items():
        print(f"| {k} | {statistics.median(v):.3f} | {max(v):.3f} | {sorted(codes[k])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
