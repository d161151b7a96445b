"""Shared set-up of the serving tests: generated Criteo-schema data, read back raw."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from kubeai_train.testing import ctr


@pytest.fixture(scope="session")
def ctr_split(tmp_path_factory):
    """``(root, report)``: 8000 train and 3000 eval rows (one eval file) with a planted signal."""
    root = tmp_path_factory.mktemp("serving_ctr")
    report = ctr.generate_split(8000, 3000, root, seed=21, files=2, eval_files=1)
    return root, report


@pytest.fixture(scope="session")
def eval_table(ctr_split):
    """The eval set exactly as it is on disk: raw strings, nulls, the label and ``row_id``."""
    root, _ = ctr_split
    return pq.read_table(root / "eval")
