"""Launcher demo: every process prints who it is (``cluster.current()``); in a torch job the
processes also form a real gloo group and check an all_reduce.

    python -m kubeai_train.launch --framework torch --workers 2 examples/launch_demo.py
    python -m kubeai_train.launch --framework tf --ps 1 --workers 2 examples/launch_demo.py
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

from kubeai_train import cluster


def main() -> int:
    info = cluster.current()
    print(
        f"role={info.role} index={info.index} rank={info.rank}/{info.world_size} "
        f"local_rank={info.local_rank} chief={info.is_chief} cluster={info.cluster_spec()}"
    )
    if info.framework != "torch":
        return 0
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        t = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(t)
        n = info.world_size
        expected = n * (n + 1) / 2
        if t.item() != expected:
            print(f"all_reduce gave {t.item()}, expected {expected}", file=sys.stderr)
            return 1
        print(f"all_reduce over {n} ranks = {t.item():g} (ok)")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
