from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeai_train.torch.metrics import auc, gather, logloss, summarize


def brute_auc(y, p):
    pos = [s for s, t in zip(p, y, strict=True) if t]
    neg = [s for s, t in zip(p, y, strict=True) if not t]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=60))
def test_auc_equals_pair_count_with_ties(rows):
    y = np.array([r[0] for r in rows])
    p = np.array([r[1] / 6 for r in rows])
    if y.all() or not y.any():
        assert math.isnan(auc(y, p))
    else:
        assert math.isclose(auc(y, p), brute_auc(y, p), rel_tol=1e-12)


def test_logloss_and_summary():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.1, 0.6, 0.4])
    expected = -np.mean(np.log([0.9, 0.9, 0.6, 0.6]))
    assert math.isclose(logloss(y, p), expected)
    s = summarize(y, p)
    assert s["auc"] == 1.0 and s["rows"] == 4 and math.isclose(s["pred_mean"], 0.5)


def test_gather_without_group_returns_inputs():
    y, p = gather(np.array([1, 0]), np.array([0.3, 0.2]))
    assert y.tolist() == [1.0, 0.0] and p.tolist() == [0.3, 0.2]
