"""Run in every process of a local torch job by tests/straggler/test_ddp_weighting.py."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from kubeai_train import torch as kt
from kubeai_train.straggler import loss_weight


def toy_batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 4, generator=g, dtype=torch.float64)
    y = torch.randn(rows, 1, generator=g, dtype=torch.float64)
    return x, y


def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1).double()


def gradients(cases: list[tuple[list[int], bool]]) -> list[dict[str, Any]]:
    """One DDP step of the toy problem per case ``(sizes, weighted)``: rank r takes ``sizes[r]``
    rows of the global batch; with ``weighted`` its mean loss is scaled by ``loss_weight``."""
    torch.set_num_threads(1)
    out = []
    with kt.process_group(timeout_s=60) as ctx:
        for sizes, weighted in cases:
            model = DDP(toy_model())
            x, y = toy_batch(sum(sizes))
            lo = sum(sizes[: ctx.rank])
            xs, ys = x[lo : lo + sizes[ctx.rank]], y[lo : lo + sizes[ctx.rank]]
            loss = torch.nn.functional.mse_loss(model(xs), ys)
            if weighted:
                loss = loss * loss_weight(sizes[ctx.rank], sum(sizes), ctx.world_size)
            loss.backward()
            out.append({name: p.grad.tolist() for name, p in model.module.named_parameters()})
    return out
