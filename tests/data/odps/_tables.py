"""The tables the odps:// tests read: three uneven partitions of ids, and how to read them all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kubeai_train.data.odps import OdpsSource

PARTS = {("20260101", "00"): (700, 0), ("20260101", "01"): (333, 700), ("20260102", "00"): (1100, 1033)}
TOTAL = sum(n for n, _ in PARTS.values())


def rows(n: int, first: int) -> pa.Table:
    ids = np.arange(first, first + n, dtype=np.int64)
    cols = {"id": ids, "label": (ids % 2).astype(np.int64)}
    for i in range(4):
        cols[f"d{i}"] = ids * (i + 1) * 0.25
    return pa.table(cols)


def write_parted(root: Path, name: str) -> None:
    for (ds, hh), (n, first) in PARTS.items():
        d = root / "proj" / name / f"ds={ds}" / f"hh={hh}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows(n, first), d / "part-0.parquet")


def all_ids(src: OdpsSource, columns=None) -> list[int]:
    out: list[int] = []
    for split in src.splits():
        for b in src.read(split, columns=columns):
            out.extend(b.column("id").to_pylist())
    return out
