"""Tests for the synthetic CTR generator: schema, determinism, planted signal, split, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import product

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeai_train.testing import ctr


def _read(path):
    return pq.read_table(sorted(path.glob("part-*.parquet"))).to_pydict()


def test_schema_files_row_groups_and_report(tmp_path):
    report = ctr.generate(4000, tmp_path, seed=3, files=3, row_group_size=500)
    files = sorted(tmp_path.glob("part-*.parquet"))
    assert len(files) == 3
    schema = pq.read_schema(files[0])
    assert schema.names[:40] == ["label", *ctr.DENSE, *ctr.CATEGORICAL]
    assert str(schema.field("label").type) == "int64"
    assert all(str(schema.field(c).type) == "float" for c in ctr.DENSE)
    assert all(str(schema.field(c).type) == "string" for c in ctr.CATEGORICAL)
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 4000
    assert all(pq.ParquetFile(f).metadata.num_row_groups >= 2 for f in files)
    assert report["row_groups"] == sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    on_disk = json.loads((tmp_path / "_report.json").read_text())
    assert on_disk["true_auc"] == pytest.approx(report["true_auc"])
    data = _read(tmp_path)
    assert set(np.unique(data["label"])) <= {0, 1}
    # nullable columns really hold nulls, others none
    assert any(v is None for v in data["I1"]) and all(v is not None for v in data["I2"])
    assert any(v is None for v in data["C23"]) and all(v is not None for v in data["C1"])
    assert all(len(v) == 8 for v in data["C3"] if v is not None)
    assert data["row_id"] == list(range(4000))
    # the report's AUC is the AUC of the p_true column
    assert report["true_auc"] == pytest.approx(ctr.auc(np.array(data["label"]), np.array(data["p_true"])))


def test_deterministic_by_seed(tmp_path):
    ctr.generate(1000, tmp_path / "a", seed=7, files=2)
    ctr.generate(1000, tmp_path / "b", seed=7, files=2)
    ctr.generate(1000, tmp_path / "c", seed=8, files=2)
    a, b, c = (_read(tmp_path / x) for x in "abc")
    assert a == b
    assert a["C1"] != c["C1"]


def test_planted_signal_zipf_and_interaction(tmp_path):
    report = ctr.generate(60000, tmp_path, seed=0, files=2)
    assert 0.75 < report["true_auc"] < 0.9
    assert 0.2 < report["positive_rate"] < 0.5
    data = _read(tmp_path)
    # Zipf: the most frequent C3 value is far more common than the median value seen
    _, counts = np.unique([v for v in data["C3"] if v is not None], return_counts=True)
    counts = np.sort(counts)[::-1]
    assert counts[0] > 20 * np.median(counts)
    # the planted signal is learnable: the empirical CTR of a frequent C1 value tracks its p_true
    y, p = np.array(data["label"]), np.array(data["p_true"])
    c1 = np.array(data["C1"], dtype=object)
    top = [
        v for v, _ in sorted(zip(*np.unique(c1, return_counts=True), strict=False), key=lambda t: -t[1])[:5]
    ]
    for v in top:
        m = c1 == v
        assert abs(y[m].mean() - p[m].mean()) < 0.05
    # the interaction exists: the model's C1 x C2 term is not zero on observed pairs
    model = ctr.CtrModel.from_seed(0)
    assert np.std(np.outer(model.factors[0][:10], model.factors[1][:10])) > 0.3


def test_split_same_model_disjoint_rows(tmp_path):
    report = ctr.generate_split(3000, 1000, tmp_path, seed=1, files=2, eval_files=1)
    train, ev = _read(tmp_path / "train"), _read(tmp_path / "eval")
    assert len(train["label"]) == 3000 and len(ev["label"]) == 1000
    assert set(report) >= {"train", "eval", "seed"}
    # same vocabulary (same model), different rows
    assert {v for v in ev["C9"] if v} <= {v for v in train["C9"] if v}
    assert train["I2"][:50] != ev["I2"][:50]
    assert (tmp_path / "train" / "_report.json").exists() and (tmp_path / "_report.json").exists()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=40))
def test_auc_matches_pairwise_definition(pairs):
    y = np.array([a for a, _ in pairs])
    s = np.array([b for _, b in pairs], dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        assert np.isnan(ctr.auc(y, s))
        return
    expected = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg)])
    assert ctr.auc(y, s) == pytest.approx(expected)


def test_logloss():
    assert ctr.logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rows": 0}, "rows must be"),
        ({"rows": 3, "files": 5}, "files must be <= rows"),
        ({"rows": 10, "format": "csv"}, "format must be one of"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    rows = kwargs.pop("rows")
    with pytest.raises(ctr.CtrError, match=match):
        ctr.generate(rows, tmp_path, **kwargs)


def test_cli(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubeai_train.testing.ctr",
            "--rows",
            "2000",
            "--eval-rows",
            "500",
            "--out",
            str(tmp_path),
            "--files",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["train"]["rows"] == 2000 and printed["eval"]["rows"] == 500
    bad = subprocess.run(
        [sys.executable, "-m", "kubeai_train.testing.ctr", "--rows", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "rows must be" in bad.stderr
