"""Run by plain ``torchrun`` in a test: the group must come up from torchrun's variables alone."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from kubeai_train import cluster
from kubeai_train import torch as kt


def main() -> None:
    info = cluster.current()
    with kt.process_group(timeout_s=60) as ctx:
        t = torch.tensor([float(ctx.rank + 1)])
        with kt.guard("all_reduce"):
            dist.all_reduce(t)
        ctx.barrier()
        out = {"rank": ctx.rank, "world": ctx.world_size, "local_rank": info.local_rank, "sum": float(t)}
    with open(f"{sys.argv[1]}/result-{out['rank']}.json", "w") as f:  # ranks share stdout: no prints
        json.dump(out, f)


if __name__ == "__main__":
    kt.run(main)
    sys.exit(0)
