from __future__ import annotations

import pytest
import torch

from kubeai_train.torch.model import DLRM, scale_dense
from kubeai_train.torch.types import ConfigError


def test_forward_shape_nan_and_scripting():
    torch.manual_seed(0)
    m = DLRM([5, 7, 11], n_dense=4, dim=8)
    ids = torch.tensor([[0, 6, 10], [4, 0, 3]])
    dense = torch.tensor([[float("nan"), 1.0, -3.0, 1e6], [0.0, 2.0, 3.0, 4.0]])
    out = m(ids, dense)
    assert out.shape == (2,) and torch.isfinite(out).all()
    scripted = torch.jit.script(m)
    assert torch.equal(scripted(ids, dense), out)


def test_embedding_gradient_is_sparse_and_touches_only_used_rows():
    m = DLRM([100, 100], n_dense=2, dim=4)
    m(torch.tensor([[3, 5]]), torch.ones(1, 2)).sum().backward()
    g = m.embedding.weight.grad
    assert g.is_sparse
    rows = sorted(set(g.coalesce().indices()[0].tolist()))
    assert rows == [3, 105]  # feature 2 lives at offset 100


def test_scale_dense_is_log1p_of_positive_part_plus_missing_indicator():
    x = torch.tensor([[float("nan"), -5.0, 0.0, torch.e - 1]])
    assert torch.allclose(scale_dense(x), torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]))


def test_bad_sizes():
    with pytest.raises(ConfigError, match="sizes must be"):
        DLRM([], n_dense=3)
    with pytest.raises(ConfigError, match="n_dense must be >= 1, got 0"):
        DLRM([3], n_dense=0)
