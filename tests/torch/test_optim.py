from __future__ import annotations

import pytest
import torch

from kubeai_train.torch.model import DLRM
from kubeai_train.torch.optim import SplitOptimizer, split_parameters
from kubeai_train.torch.types import ConfigError


def test_split_and_step_moves_only_touched_rows():
    torch.manual_seed(0)
    m = DLRM([50, 50], n_dense=3, dim=4)
    sparse, dense = split_parameters(m)
    assert sparse == [m.embedding.weight]
    assert len(dense) == len(list(m.parameters())) - 1
    opt = SplitOptimizer(m, dense_lr=0.01, sparse_lr=0.1)
    assert isinstance(opt.sparse, torch.optim.SparseAdam) and isinstance(opt.dense, torch.optim.Adam)
    before = m.embedding.weight.detach().clone()
    opt.zero_grad()
    m(torch.tensor([[1, 2]]), torch.ones(1, 3)).sum().backward()
    opt.step()
    changed = (m.embedding.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 52]


def test_state_dict_round_trip_and_mismatch():
    m = DLRM([10], n_dense=2, dim=4)
    opt = SplitOptimizer(m)
    m(torch.tensor([[1]]), torch.ones(1, 2)).sum().backward()
    opt.step()
    state = opt.state_dict()
    opt2 = SplitOptimizer(m)
    opt2.load_state_dict(state)
    assert opt2.state_dict()["dense"]["state"].keys() == state["dense"]["state"].keys()
    dense_only = SplitOptimizer(DLRM([10], n_dense=2, dim=4, sparse=False))
    assert dense_only.sparse is None
    with pytest.raises(ConfigError, match="optimizer state has a sparse part but the model has no sparse"):
        dense_only.load_state_dict(state)
