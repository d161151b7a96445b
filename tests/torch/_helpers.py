"""Small helpers shared by the torch tests: CTR columns with a learnable signal, as Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kubeai_train.torch.features import CATEGORICAL, DENSE


def ctr_columns(n: int, seed: int = 0, n_values: int = 50) -> dict[str, np.ndarray]:
    """Criteo-schema columns (nullable floats and strings) with a signal in C1 and I1."""
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


def write_parquet(path: Path, cols: dict[str, np.ndarray], files: int = 1, row_group: int = 256) -> Path:
    """Write ``cols`` as ``files`` Parquet files under ``path`` (nulls as Arrow nulls)."""
    path.mkdir(parents=True, exist_ok=True)
    n = len(cols["label"])
    bounds = np.linspace(0, n, files + 1).astype(int)
    for k in range(files):
        a, b = bounds[k], bounds[k + 1]
        arrays = {}
        for name, v in cols.items():
            part = v[a:b]
            if part.dtype == object:
                arrays[name] = pa.array(list(part), type=pa.string())
            elif part.dtype.kind == "f":
                arrays[name] = pa.array(part, mask=np.isnan(part))
            else:
                arrays[name] = pa.array(part)
        pq.write_table(pa.table(arrays), path / f"part-{k:03d}.parquet", row_group_size=row_group)
    return path
