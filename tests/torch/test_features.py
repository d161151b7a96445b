from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from kubeai_train.data.convert import fnv1a64
from kubeai_train.torch.features import CATEGORICAL, DENSE, CTRFeatures, hash_column
from kubeai_train.torch.types import ConfigError

from ._helpers import ctr_columns


def reference(values, buckets):
    def fnv(b: bytes) -> int:
        h = 0xCBF29CE484222325
        for x in b:
            h = ((h ^ x) * 0x100000001B3) & (2**64 - 1)
        return h

    return [0 if v is None else fnv(v.encode()) % buckets for v in values]


def test_hash_is_fnv1a64_over_utf8():
    assert fnv1a64(pa.array(["", "a", "foobar"])).tolist() == [
        0xCBF29CE484222325,
        0xAF63DC4C8601EC8C,
        0x85944171F73967E8,
    ]
    values = ["68fd1e64", None, "héllo", "", "05db9164"]
    assert hash_column(values, 1000).tolist() == reference(values, 1000)


def test_transform_takes_reader_ids_or_raw_strings():
    f = CTRFeatures(buckets=1000)
    raw = ctr_columns(64)
    out = f.transform(raw)
    assert out["ids"].shape == (64, 26) and out["ids"].dtype == np.int64
    assert out["dense"].shape == (64, 13) and out["dense"].dtype == np.float32
    assert np.isnan(out["dense"]).any()  # nulls stay NaN: scaling is inside the model
    assert out["label"].dtype == np.float32
    hashed = dict(raw)
    for c in CATEGORICAL:
        hashed[c] = hash_column(list(raw[c]), 1000)
    assert np.array_equal(f.transform(hashed)["ids"], out["ids"])
    assert out["ids"][:, 0].tolist() == reference(list(raw["C1"]), 1000)


def test_read_options_and_columns():
    f = CTRFeatures(buckets=77)
    opts = f.read_options()
    assert opts["columns"] == f.columns == ["label", *DENSE, *CATEGORICAL]
    assert opts["hash_buckets"] == dict.fromkeys(CATEGORICAL, 77)
    assert set(opts["fill_null"]) == set(DENSE) and all(math.isnan(v) for v in opts["fill_null"].values())


def test_per_column_buckets_and_round_trip():
    buckets = {c: 10 + i for i, c in enumerate(CATEGORICAL)}
    f = CTRFeatures(buckets=buckets)
    assert f.sizes == tuple(buckets[c] for c in CATEGORICAL)
    assert CTRFeatures.from_dict(f.to_dict()) == f
    assert f.to_dict()["hash"] == "fnv1a64-utf8"


def test_bad_input_names_the_value():
    with pytest.raises(ConfigError, match="buckets of C1 must be an integer >= 1, got 0"):
        CTRFeatures(buckets=0)
    with pytest.raises(ConfigError, match=r"buckets has no entry for \['C2'\]"):
        CTRFeatures(categorical=("C1", "C2"), buckets={"C1": 5})
    with pytest.raises(ConfigError, match="distinct"):
        CTRFeatures(dense=("I1",), categorical=("I1",))
    with pytest.raises(ConfigError, match="got the string 'C1'"):
        CTRFeatures(categorical="C1")
    cols = ctr_columns(4)
    del cols["C26"]
    with pytest.raises(ConfigError, match=r"batch lacks columns \['C26'\]"):
        CTRFeatures(buckets=10).transform(cols)
