"""Synthetic CTR data in the Criteo display-advertising schema, with a planted signal.

Tests, examples and benchmarks need click data whose answer is known: this module writes
Parquet files with ``label`` (0/1 int64), ``I1``..``I13`` (float32, nullable) and
``C1``..``C26`` (string, nullable), plus extra columns ``p_true`` (the true click
probability) and ``row_id`` (0..rows-1 in file order); readers of the Criteo schema ignore
extra columns. The labels are drawn from
a known logistic model:

* categorical values are Zipf-distributed over per-column vocabularies (a few huge, most
  small, as in Criteo), each value carries a random effect (some columns are pure noise);
* dense columns are heavy-tailed counts whose ``log1p`` enters the logit linearly;
* one interaction: ``C1`` x ``C2`` through per-value latent factors (what FM/DeepFM models).

The generative parameters depend on ``seed`` only, so a train and an eval set written with the
same seed come from the same distribution; the rows of file ``k`` depend on ``(seed, split, k)``,
so the output is identical for the same arguments. The report (returned, printed by the CLI
and written to ``<out>/_report.json``, a name Parquet dataset readers skip) holds the AUC and
log loss of the true probabilities: the ceiling a model can reach on that data.

CLI::

    python -m kubeai_train.testing.ctr --rows 1000000 --out /tmp/ctr [--eval-rows 100000]
        [--files 4] [--seed 0] [--format parquet]

With ``--eval-rows`` the data goes to ``<out>/train`` and ``<out>/eval``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "CATEGORICAL",
    "CRITEO_KAGGLE_CARDINALITIES",
    "DENSE",
    "LABEL",
    "CtrError",
    "CtrModel",
    "auc",
    "generate",
    "generate_split",
    "logloss",
    "main",
]

LABEL = "label"
DENSE = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
# Distinct values of C1..C26 in the Criteo Kaggle display-advertising set (the counts DLRM's
# benchmarks use): the embedding table sizes a real Criteo model has, for planning and benchmarks.
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
REPORT_NAME = "_report.json"
FORMATS = ("parquet",)

# Per-column vocabulary sizes: a few large, most small, like Criteo's.
_VOCAB = (
    1460,
    583,
    100000,
    50000,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    80000,
    3194,
    27,
    14992,
    60000,
    10,
    5652,
    2173,
    4,
    70000,
    17,
    15,
    30000,
    104,
    40000,
)
# Effect scale per categorical column; 0 = pure noise column.
_CAT_SIGMA = (
    0.45,
    0.35,
    0.5,
    0.45,
    0.4,
    0.35,
    0.4,
    0.3,
    0.3,
    0.4,
    0.3,
    0.35,
    0.25,
    0.0,
    0.3,
    0.0,
    0.25,
    0.2,
    0.0,
    0.2,
    0.3,
    0.0,
    0.2,
    0.25,
    0.0,
    0.2,
)
_CAT_NULL = (
    0.0,
    0.0,
    0.03,
    0.03,
    0.0,
    0.1,
    0.0,
    0.0,
    0.0,
    0.03,
    0.0,
    0.03,
    0.0,
    0.0,
    0.0,
    0.03,
    0.0,
    0.0,
    0.4,
    0.4,
    0.03,
    0.0,
    0.7,
    0.03,
    0.4,
    0.03,
)
# Dense columns: lognormal scale, null rate, coefficient of standardised log1p(x).
_DENSE_SCALE = (1.0, 3.0, 2.0, 1.5, 6.0, 3.0, 2.0, 1.5, 3.5, 0.5, 1.2, 0.3, 1.5)
_DENSE_NULL = (0.45, 0.0, 0.2, 0.2, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.2)
_DENSE_BETA = (0.35, -0.3, 0.25, 0.0, -0.2, 0.2, 0.15, 0.0, 0.1, 0.3, 0.0, 0.1, -0.15)
_ZIPF_A = 1.1
_INTERACTION = 0.6
_BIAS = -1.25


class CtrError(ValueError):
    """Bad arguments to the generator; the message names the value and the limit."""


@dataclass(frozen=True)
class CtrModel:
    """The generative parameters, a function of ``seed`` only.

    Attributes:
        seed: the seed they were drawn from.
        vocab: per categorical column, the value strings (rank 0 is the most frequent).
        cdf: per categorical column, the Zipf cumulative distribution over ranks.
        effects: per categorical column, the logit effect of each rank.
        factors: latent factors of C1 and C2 ranks for the planted interaction.
        dense_mu / dense_sd: mean and std of log1p(x) per dense column, for standardising.
    """

    seed: int
    vocab: tuple[pa.Array, ...]
    cdf: tuple[np.ndarray, ...]
    effects: tuple[np.ndarray, ...]
    factors: tuple[np.ndarray, np.ndarray]
    dense_mu: np.ndarray
    dense_sd: np.ndarray

    @classmethod
    def from_seed(cls, seed: int) -> CtrModel:
        rng = np.random.default_rng([seed, 0xC7])
        vocab, cdf, effects = [], [], []
        for j, size in enumerate(_VOCAB):
            # a bijection of [0, 2^32) keeps the 8-hex-digit strings unique within a column
            offset = int(rng.integers(0, 2**32))
            ints = (np.arange(size, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(offset)) % np.uint64(
                2**32
            )
            vocab.append(pa.array([f"{int(x):08x}" for x in ints], type=pa.string()))
            weights = 1.0 / np.arange(1, size + 1, dtype=np.float64) ** _ZIPF_A
            c = np.cumsum(weights)
            cdf.append(c / c[-1])
            effects.append(rng.normal(0.0, _CAT_SIGMA[j], size) if _CAT_SIGMA[j] else np.zeros(size))
        factors = (rng.normal(0.0, 1.0, _VOCAB[0]), rng.normal(0.0, 1.0, _VOCAB[1]))
        # log1p of a lognormal count: mean/std estimated once from a fixed sample
        sample = np.log1p(np.floor(rng.lognormal(0.0, 1.0, (200_000, 1)) * np.asarray(_DENSE_SCALE)))
        return cls(
            seed=seed,
            vocab=tuple(vocab),
            cdf=tuple(cdf),
            effects=tuple(effects),
            factors=factors,
            dense_mu=sample.mean(axis=0),
            dense_sd=sample.std(axis=0) + 1e-6,
        )

    def sample(self, rows: int, rng: np.random.Generator, first_row: int = 0) -> pa.Table:
        """Draw ``rows`` rows (columns label, I1..I13, C1..C26, p_true, and row_id counting from
        ``first_row``)."""
        logit = np.full(rows, _BIAS)
        columns: dict[str, pa.Array] = {}
        dense = {}
        for i, name in enumerate(DENSE):
            x = np.floor(rng.lognormal(0.0, 1.0, rows) * _DENSE_SCALE[i]).astype(np.float32)
            null = rng.random(rows) < _DENSE_NULL[i]
            z = (np.log1p(x) - self.dense_mu[i]) / self.dense_sd[i]
            logit += np.where(null, 0.0, _DENSE_BETA[i] * z)
            dense[name] = pa.array(x, mask=null)
        cats = {}
        ranks = []
        for j, name in enumerate(CATEGORICAL):
            r = np.searchsorted(self.cdf[j], rng.random(rows), side="right").astype(np.int32)
            r = np.minimum(r, len(self.cdf[j]) - 1)
            null = rng.random(rows) < _CAT_NULL[j]
            logit += np.where(null, 0.0, self.effects[j][r])
            ranks.append((r, null))
            idx = pa.array(r, mask=null)
            cats[name] = pa.DictionaryArray.from_arrays(idx, self.vocab[j]).cast(pa.string())
        (r1, n1), (r2, n2) = ranks[0], ranks[1]
        inter = _INTERACTION * self.factors[0][r1] * self.factors[1][r2]
        logit += np.where(n1 | n2, 0.0, inter)
        p = 1.0 / (1.0 + np.exp(-logit))
        label = (rng.random(rows) < p).astype(np.int64)
        columns[LABEL] = pa.array(label)
        columns.update(dense)
        columns.update(cats)
        columns["p_true"] = pa.array(p.astype(np.float32))
        columns["row_id"] = pa.array(np.arange(first_row, first_row + rows, dtype=np.int64))
        return pa.table(columns)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half), computed from ranks.

    Returns NaN when ``labels`` holds a single class.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank for tied scores
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` against 0/1 ``labels``."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _check(rows: int, files: int, fmt: str, row_group_size: int | None) -> None:
    if not isinstance(rows, int) or rows < 1:
        raise CtrError(f"rows must be an integer >= 1, got {rows!r}")
    if not isinstance(files, int) or files < 1:
        raise CtrError(f"files must be an integer >= 1, got {files!r}")
    if files > rows:
        raise CtrError(f"files must be <= rows so that no file is empty, got files={files} rows={rows}")
    if fmt not in FORMATS:
        raise CtrError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if row_group_size is not None and row_group_size < 1:
        raise CtrError(f"row_group_size must be >= 1, got {row_group_size}")


def _write(
    model: CtrModel,
    rows: int,
    out: Path,
    *,
    split: int,
    files: int,
    row_group_size: int | None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    per_file = [rows // files + (1 if k < rows % files else 0) for k in range(files)]
    labels, probs, paths = [], [], []
    row_groups = 0
    first = 0
    for k, n in enumerate(per_file):
        rng = np.random.default_rng([model.seed, split, k])
        table = model.sample(n, rng, first_row=first)
        first += n
        rg = row_group_size or max(256, math.ceil(n / 4))
        path = out / f"part-{k:05d}.parquet"
        tmp = out / f".part-{k:05d}.parquet.tmp"
        pq.write_table(table, tmp, row_group_size=rg)
        os.replace(tmp, path)  # readers never see a half-written file
        row_groups += math.ceil(n / rg)
        labels.append(table.column(LABEL).to_numpy())
        probs.append(table.column("p_true").to_numpy())
        paths.append(str(path))
    y = np.concatenate(labels)
    p = np.concatenate(probs)
    return {
        "path": str(out),
        "rows": rows,
        "files": paths,
        "row_groups": row_groups,
        "positive_rate": float(y.mean()),
        "true_auc": auc(y, p),
        "true_logloss": logloss(y, p),
    }


def generate(
    rows: int,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    files: int = 4,
    row_group_size: int | None = None,
    format: str = "parquet",
) -> dict[str, Any]:
    """Write ``rows`` rows to ``files`` Parquet files ``<out>/part-NNNNN.parquet``.

    Each file holds several row groups (``row_group_size``, default a quarter of the file, at
    least 256 rows). Files are written to a temporary name and renamed, so a reader never sees a
    partial file. The same arguments always produce the same bytes of data.

    Returns:
        The report: rows, files, row_groups, positive_rate, true_auc, true_logloss, seed; also
        written to ``<out>/_report.json``.

    Raises:
        CtrError: naming a bad argument.
    """
    _check(rows, files, format, row_group_size)
    model = CtrModel.from_seed(seed)
    report = _write(model, rows, Path(out), split=0, files=files, row_group_size=row_group_size)
    report.update(seed=seed, format=format, schema=_schema_doc())
    _dump(Path(out), report)
    return report


def generate_split(
    train_rows: int,
    eval_rows: int,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    files: int = 4,
    eval_files: int | None = None,
    row_group_size: int | None = None,
    format: str = "parquet",
) -> dict[str, Any]:
    """Write a train set to ``<out>/train`` and an eval set to ``<out>/eval``.

    Both come from the same generative model (a function of ``seed``) with disjoint random rows.

    Returns:
        ``{"train": <report>, "eval": <report>, "seed": seed}``, also written to
        ``<out>/_report.json`` (each part's own report sits in its directory too).
    """
    eval_files = eval_files or max(1, min(files, eval_rows))
    _check(train_rows, files, format, row_group_size)
    _check(eval_rows, eval_files, format, row_group_size)
    model = CtrModel.from_seed(seed)
    root = Path(out)
    report: dict[str, Any] = {"seed": seed, "format": format, "schema": _schema_doc()}
    for split, (name, rows, n_files) in enumerate(
        (("train", train_rows, files), ("eval", eval_rows, eval_files))
    ):
        part = _write(model, rows, root / name, split=split, files=n_files, row_group_size=row_group_size)
        part.update(seed=seed, format=format)
        _dump(root / name, part)
        report[name] = part
    _dump(root, report)
    return report


def _schema_doc() -> dict[str, str]:
    return {
        "label": "int64 0/1",
        "I1..I13": "float32 nullable",
        "C1..C26": "string nullable",
        "p_true": "float32, the true click probability (extra column)",
        "row_id": "int64, 0..rows-1 in file order (extra column, for auditing who read what)",
    }


def _dump(root: Path, report: dict[str, Any]) -> None:
    tmp = root / f".{REPORT_NAME}.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    os.replace(tmp, root / REPORT_NAME)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; prints the report as JSON. Exit 2 with one line on stderr for bad arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m kubeai_train.testing.ctr", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--rows", type=int, required=True, help="training rows (all rows without --eval-rows)"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--eval-rows", type=int, default=0, help="also write an eval set; data goes to out/train, out/eval"
    )
    parser.add_argument("--files", type=int, default=4, help="Parquet files per data set (default 4)")
    parser.add_argument(
        "--row-group-size", type=int, default=None, help="rows per row group (default file/4)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="parquet", choices=FORMATS)
    args = parser.parse_args(argv)
    try:
        if args.eval_rows:
            report = generate_split(
                args.rows,
                args.eval_rows,
                args.out,
                seed=args.seed,
                files=args.files,
                row_group_size=args.row_group_size,
                format=args.format,
            )
        else:
            report = generate(
                args.rows,
                args.out,
                seed=args.seed,
                files=args.files,
                row_group_size=args.row_group_size,
                format=args.format,
            )
    except CtrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "schema"}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
