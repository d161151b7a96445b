"""Shared set-up of the tf tests: generated CTR data and memory:// model directories (running
jobs on clusters: ``_cluster.py``)."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest

from kubeai_train.testing import ctr


@pytest.fixture(scope="session")
def ctr_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctr_e2e")
    report = ctr.generate_split(150_000, 30_000, root, seed=11, files=4, eval_files=2)
    return root, report


@pytest.fixture(scope="session")
def ctr_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctr_small")
    report = ctr.generate_split(40_000, 5_000, root, seed=12, files=4, eval_files=1)
    return root, report


@pytest.fixture
def mem_dir():
    """A fresh ``ModelDir`` on memory:// (fsspec-only: TensorFlow cannot write it), removed after."""
    from kubeai_train.tf.model_dir import ModelDir

    url = f"memory://t-{uuid.uuid4().hex[:8]}/job"
    yield ModelDir(url)
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def values_equal(a, b) -> bool:
    """Element-wise equality of two equally long lists of arrays / scalars / bytes."""
    return all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b, strict=True)
    )
