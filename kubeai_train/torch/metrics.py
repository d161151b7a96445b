"""Loss, AUC and log loss over the whole job, not one rank's shard.

AUC does not decompose over shards, so :func:`gather` brings every rank's predictions and
labels to every rank (an all_gather of padded tensors; 12 bytes a row, e.g. 12 MB for a
million eval rows) and :func:`auc` computes the exact rank statistic with ties averaged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from kubeai_train.torch.group import guard

__all__ = ["auc", "gather", "logloss", "summarize"]


def auc(labels: np.ndarray, preds: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with tied scores averaged); NaN when one class is absent."""
    y = np.asarray(labels, dtype=np.float64).ravel() > 0.5
    p = np.asarray(preds, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    uniq, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct score
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = float(avg_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(labels: np.ndarray, preds: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``preds`` (clipped to [eps, 1-eps])."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(preds, dtype=np.float64).ravel(), eps, 1 - eps)
    if len(y) == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def gather(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``(labels, preds)`` concatenated in rank order, on every rank.

    Works for any row count per rank, zero included. Without an initialised group it returns
    the inputs. Raises PeerFailedError when a peer dies or hangs.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(preds, dtype=np.float64).ravel()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return y, p
    world = dist.get_world_size()
    with guard("gathering eval predictions"):
        n = torch.tensor([len(y)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, n)
        counts = [int(s.item()) for s in sizes]
        width = max(max(counts), 1)
        mine = torch.zeros(2, width, dtype=torch.float64)
        mine[0, : len(y)] = torch.from_numpy(y)
        mine[1, : len(p)] = torch.from_numpy(p)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
    ys = np.concatenate([t[0, :c].numpy() for t, c in zip(parts, counts, strict=True)])
    ps = np.concatenate([t[1, :c].numpy() for t, c in zip(parts, counts, strict=True)])
    return ys, ps


def summarize(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """``{"auc", "logloss", "rows", "label_mean", "pred_mean"}`` of gathered predictions."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(preds, dtype=np.float64)
    return {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "rows": int(len(y)),
        "label_mean": float(y.mean()) if len(y) else math.nan,
        "pred_mean": float(p.mean()) if len(p) else math.nan,
    }
