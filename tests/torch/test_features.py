from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeai_train.torch.features import CATEGORICAL, DENSE, CTRFeatures, fnv1a64, hash_column
from kubeai_train.torch.types import ConfigError

from ._helpers import ctr_columns


def reference(values, name, buckets):
    return [0 if v is None else 1 + fnv1a64(f"{name}={v}") % (buckets - 1) for v in values]


def test_fnv1a64_known_vectors():
    # published FNV-1a 64 test vectors
    assert fnv1a64("") == 0xCBF29CE484222325
    assert fnv1a64("a") == 0xAF63DC4C8601EC8C
    assert fnv1a64("foobar") == 0x85944171F73967E8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=12).filter(lambda s: "\x00" not in s)), max_size=40))
def test_hash_column_matches_reference(values):
    arr = np.array(values, dtype=object)
    assert hash_column(arr, "C7", 1000).tolist() == reference(values, "C7", 1000)


def test_dtypes_agree_and_null_is_row_zero():
    vals = ["68fd1e64", "abc", "", "05db9164"]
    obj = np.array([*vals, None], dtype=object)
    ids = hash_column(obj, "C1", 97)
    assert ids[-1] == 0 and (ids[:-1] >= 1).all() and (ids < 97).all()
    assert hash_column(np.array(vals), "C1", 97).tolist() == ids[:-1].tolist()  # '<U' array
    assert hash_column(np.array(vals, dtype="S"), "C1", 97).tolist() == ids[:-1].tolist()  # bytes
    assert (
        hash_column(np.array([v.encode() for v in vals], dtype=object), "C1", 97).tolist()
        == ids[:-1].tolist()
    )
    # the column name salts the hash
    assert (
        hash_column(np.array(vals), "C2", 1 << 20).tolist()
        != hash_column(np.array(vals), "C1", 1 << 20).tolist()
    )


def test_transform_shapes_and_dtypes():
    f = CTRFeatures(buckets=1000)
    cols = ctr_columns(64)
    out = f.transform(cols)
    assert out["ids"].shape == (64, 26) and out["ids"].dtype == np.int64
    assert out["dense"].shape == (64, 13) and out["dense"].dtype == np.float32
    assert np.isnan(out["dense"]).any()  # nulls stay NaN: scaling is inside the model
    assert out["label"].dtype == np.float32
    assert ((out["ids"] >= 0) & (out["ids"] < 1000)).all()
    assert f.columns == ["label", *DENSE, *CATEGORICAL]


def test_per_column_buckets_and_round_trip():
    buckets = {c: 10 + i for i, c in enumerate(CATEGORICAL)}
    f = CTRFeatures(buckets=buckets)
    assert f.sizes == tuple(buckets[c] for c in CATEGORICAL)
    assert CTRFeatures.from_dict(f.to_dict()) == f
    assert f.to_dict()["hash"] == "fnv1a64-codepoints"


def test_bad_input_names_the_value():
    with pytest.raises(ConfigError, match="buckets of C1 must be an integer >= 2, got 1"):
        CTRFeatures(buckets=1)
    with pytest.raises(ConfigError, match=r"buckets has no entry for \['C2'\]"):
        CTRFeatures(categorical=("C1", "C2"), buckets={"C1": 5})
    with pytest.raises(ConfigError, match="distinct"):
        CTRFeatures(dense=("I1",), categorical=("I1",))
    with pytest.raises(ConfigError, match=r"batch lacks columns \['C26'\]"):
        cols = ctr_columns(4)
        del cols["C26"]
        CTRFeatures(buckets=10).transform(cols)
