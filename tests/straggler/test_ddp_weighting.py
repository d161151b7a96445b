"""The loss weight of adaptive batches on real DDP (gloo, two processes): with unequal local
batches the averaged gradient is the global-batch mean gradient, as with equal batches."""

from __future__ import annotations

import pytest
import torch

from kubeai_train.launch import run_processes

from ._ddp_jobs import toy_batch, toy_model

pytestmark = pytest.mark.integration

ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def full_batch_gradient(rows: int) -> dict[str, list]:
    model = toy_model()
    x, y = toy_batch(rows)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return {name: p.grad.tolist() for name, p in model.named_parameters()}


def test_weighted_unequal_batches_give_the_global_batch_gradient():
    cases = [([6, 6], False), ([9, 3], True), ([9, 3], False)]
    res = run_processes(
        "tests.straggler._ddp_jobs:gradients", workers=2, kwargs={"cases": cases}, env=ENV, timeout=120
    ).results
    assert res["master:0"] == res["worker:0"]  # DDP: both replicas hold the same averaged gradient
    equal, weighted, plain = (
        {k: torch.tensor(v, dtype=torch.float64) for k, v in g.items()} for g in res["master:0"]
    )
    expected = {k: torch.tensor(v, dtype=torch.float64) for k, v in full_batch_gradient(12).items()}
    for k, want in expected.items():
        assert torch.allclose(equal[k], want, rtol=1e-12, atol=1e-14)  # equal batches, plain average
        assert torch.allclose(weighted[k], want, rtol=1e-12, atol=1e-14)
        # without the weight the 3-row replica counts as much as the 9-row one: a different gradient
        assert not torch.allclose(plain[k], want, rtol=1e-3)
