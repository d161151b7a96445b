"""Small helpers shared by the torch tests: an in-memory resumable dataset and CTR batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from kubeai_train.torch.features import CATEGORICAL, DENSE


def ctr_columns(n: int, seed: int = 0, n_values: int = 50) -> dict[str, np.ndarray]:
    """Criteo-schema columns with a learnable signal in C1 and I1."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for c in DENSE:
        v = rng.exponential(10.0, n).astype(np.float32)
        v[rng.random(n) < 0.1] = np.nan
        cols[c] = v
    for c in CATEGORICAL:
        vals = rng.integers(0, n_values, n)
        col = np.array([f"v{x:x}" for x in vals], dtype=object)
        col[rng.random(n) < 0.05] = None
        cols[c] = col
    c1 = np.array([0 if v is None else int(v[1:], 16) for v in cols["C1"]])
    logit = (c1 % 5 - 2) * 0.8 + np.log1p(np.nan_to_num(cols["I1"])) * 0.3 - 0.7
    cols["label"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return cols


class MemoryDataset:
    """A resumable batch stream over columns in memory (the trainer's view of a data.Dataset).

    Used only by unit tests that must not depend on the reader; integration tests read
    through ``kubeai_train.data``.
    """

    def __init__(self, columns: Mapping[str, np.ndarray], batch_size: int) -> None:
        self.columns = dict(columns)
        self.batch_size = batch_size
        self.n = len(next(iter(columns.values())))
        self.pos = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while self.pos < self.n:
            stop = min(self.pos + self.batch_size, self.n)
            batch = {k: v[self.pos : stop] for k, v in self.columns.items()}
            self.pos = stop
            yield batch

    def to_torch(self) -> MemoryDataset:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pos = int(state["pos"])
