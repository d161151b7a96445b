"""A DLRM-style click model over :class:`~kubeai_train.torch.features.CTRFeatures` inputs.

Input: ``ids`` int64 ``[batch, n_categorical]`` (per-feature row ids from the hashing in
``features``) and ``dense`` float32 ``[batch, n_dense]`` (raw values, NaN for null). Output:
one logit per row. All categorical features share one ``EmbeddingBag(sparse=True)`` table (each
feature owns a contiguous block of rows), so DDP exchanges a single sparse gradient per step
holding only the rows the batch touched, instead of the whole table.

The module is TorchScript-compatible; ``kubeai_train.torch.exporter`` scripts it as-is.
"""

# no `from __future__ import annotations`: TorchScript needs real class annotations

from collections.abc import Sequence

import torch
from torch import nn

from kubeai_train.torch.types import ConfigError

__all__ = ["DLRM", "mlp", "scale_dense"]


def scale_dense(dense: torch.Tensor) -> torch.Tensor:
    """``[log1p(max(x, 0)) for each column, then a 0/1 missing indicator for each]`` (the TF
    trainer's definition; NaN is missing): ``[batch, n] -> [batch, 2n]``."""
    missing = torch.isnan(dense)
    x = torch.where(missing, torch.zeros_like(dense), dense)
    return torch.cat([torch.log1p(torch.clamp(x, min=0.0)), missing.to(dense.dtype)], dim=1)


def mlp(sizes: Sequence[int], last_activation: bool = True) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ...`` with ReLU between (and after the last
    unless ``last_activation`` is False)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Bottom MLP on dense features, embeddings for categoricals, pairwise dot interactions,
    top MLP to a logit (Naumov et al. 2019, without the multi-hot bags).

    Args:
        sizes: embedding rows per categorical feature (``CTRFeatures.sizes``).
        n_dense: number of dense features.
        dim: embedding width (the bottom MLP ends at this width too).
        bottom: hidden widths of the bottom MLP.
        top: hidden widths of the top MLP.
        sparse: sparse embedding gradients (what DDP on gloo wants; nccl cannot all-reduce
            sparse tensors, so pass False there).
    """

    offsets: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor

    def __init__(
        self,
        sizes: Sequence[int],
        n_dense: int,
        dim: int = 16,
        bottom: Sequence[int] = (64, 32),
        top: Sequence[int] = (128, 64),
        sparse: bool = True,
    ) -> None:
        super().__init__()
        if not sizes or any(int(s) < 1 for s in sizes):
            raise ConfigError(f"sizes must be a non-empty list of row counts >= 1, got {list(sizes)}")
        if n_dense < 1:
            raise ConfigError(f"n_dense must be >= 1, got {n_dense}")
        if dim < 1:
            raise ConfigError(f"dim must be >= 1, got {dim}")
        n_cat = len(sizes)
        offsets = torch.zeros(n_cat, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.tensor(list(sizes[:-1]), dtype=torch.int64), 0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.num_rows = int(sum(int(s) for s in sizes))
        self.dim = dim
        self.embedding = nn.EmbeddingBag(self.num_rows, dim, mode="sum", sparse=sparse)
        nn.init.uniform_(self.embedding.weight, -0.05, 0.05)
        self.bottom = mlp([2 * n_dense, *bottom, dim])
        n_vec = n_cat + 1
        iu = torch.triu_indices(n_vec, n_vec, offset=1)
        self.register_buffer("pair_i", iu[0].clone(), persistent=False)
        self.register_buffer("pair_j", iu[1].clone(), persistent=False)
        self.top = mlp([dim + iu.shape[1], *top, 1], last_activation=False)

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        batch = ids.shape[0]
        d = self.bottom(scale_dense(dense))
        rows = (ids + self.offsets).reshape(-1, 1)  # one-element bags: [batch * n_cat, 1]
        e = self.embedding(rows).view(batch, -1, self.dim)
        z = torch.cat([d.unsqueeze(1), e], dim=1)
        inter = torch.bmm(z, z.transpose(1, 2))
        pairs = inter[:, self.pair_i, self.pair_j]
        return self.top(torch.cat([d, pairs], dim=1)).squeeze(1)
