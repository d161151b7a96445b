"""Two optimizers behind one: a sparse one for ``sparse=True`` embedding tables, a dense one
for everything else.

``torch.optim.Adam`` refuses sparse gradients and ``SparseAdam`` refuses dense ones, so a model
with sparse embeddings needs both; :func:`split_parameters` finds which is which from the
modules, so callers never list parameters by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from kubeai_train.torch.types import ConfigError

__all__ = ["SplitOptimizer", "split_parameters"]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(sparse, dense)`` trainable parameters of ``model`` (a DDP wrapper is unwrapped).

    Sparse: the weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules built with
    ``sparse=True``. Dense: every other parameter that requires grad. Shared parameters are
    listed once.
    """
    module = getattr(model, "module", model)
    sparse_ids: set[int] = set()
    sparse: list[nn.Parameter] = []
    for m in module.modules():
        is_sparse = isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad
        if is_sparse and id(m.weight) not in sparse_ids:
            sparse_ids.add(id(m.weight))
            sparse.append(m.weight)  # type: ignore[arg-type]
    dense: list[nn.Parameter] = []
    seen: set[int] = set(sparse_ids)
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            dense.append(p)
    return sparse, dense


class SplitOptimizer:
    """``SparseAdam`` (or ``sparse_cls``) for sparse tables, ``Adam`` (or ``dense_cls``) for the rest.

    Behaves like one optimizer: :meth:`zero_grad`, :meth:`step`, :meth:`state_dict`,
    :meth:`load_state_dict`. Either half is None when the model has no such parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        dense_lr: float = 1e-3,
        sparse_lr: float = 1e-2,
        dense_cls: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        sparse_cls: Callable[..., torch.optim.Optimizer] = torch.optim.SparseAdam,
    ) -> None:
        sparse, dense = split_parameters(model)
        if not sparse and not dense:
            raise ConfigError("the model has no trainable parameters")
        self.sparse = sparse_cls(sparse, lr=sparse_lr) if sparse else None
        self.dense = dense_cls(dense, lr=dense_lr) if dense else None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.sparse, self.dense) if o is not None]

    @property
    def param_groups(self) -> Iterable[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "sparse": self.sparse.state_dict() if self.sparse else None,
            "dense": self.dense.state_dict() if self.dense else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in (("sparse", self.sparse), ("dense", self.dense)):
            saved = state.get(name)
            if (opt is None) != (saved is None):
                raise ConfigError(
                    f"optimizer state has {'no' if saved is None else 'a'} {name} part but the model "
                    f"{'has' if opt is not None else 'has no'} {name} parameters: was it saved from another model?"
                )
            if opt is not None and saved is not None:
                opt.load_state_dict(saved)
