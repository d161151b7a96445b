"""Publish / get / versions of ModelRepository on every backend (tests/repository/conftest.py)."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest

from kubeai_train.repository import (
    ModelRepository,
    ModelVersion,
    VersionNotFoundError,
)
from kubeai_train.repository.metadata import METADATA_FILE

from .conftest import make_export


def test_publish_then_get_roundtrip(repo: ModelRepository, export_dir):
    mv = repo.publish(
        "ctr",
        export_dir,
        metadata={
            "framework": "tensorflow",
            "metrics": {"auc": np.float32(0.75), "logloss": 0.5},
            "params": {"lr": 0.1},
        },
    )
    assert isinstance(mv, ModelVersion)
    assert (mv.name, mv.version) == ("ctr", 1)
    assert mv.uri.endswith("/ctr/1")
    assert mv.metrics == {"auc": pytest.approx(0.75), "logloss": 0.5}
    assert mv.metadata["framework"] == "tensorflow"
    assert mv.metadata["params"] == {"lr": 0.1}
    paths = {f.path: f for f in mv.manifest}
    assert set(paths) == {
        "saved_model.pb",
        "variables/variables.index",
        "variables/variables.data-00000-of-00001",
    }
    data = (export_dir / "variables" / "variables.data-00000-of-00001").read_bytes()
    entry = paths["variables/variables.data-00000-of-00001"]
    assert entry.size == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert repo.get("ctr") == mv
    assert repo.get("ctr", version=1) == mv
    assert [v.version for v in repo.versions("ctr")] == [1]


def test_versions_only_grow_and_latest_wins(repo: ModelRepository, tmp_path):
    for i in range(3):
        repo.publish("ctr", make_export(tmp_path / f"e{i}", seed=i), metadata={"metrics": {"auc": i / 10}})
    assert [v.version for v in repo.versions("ctr")] == [1, 2, 3]
    assert repo.get("ctr").version == 3
    assert repo.get("ctr", version=2).metrics["auc"] == pytest.approx(0.1)
    repo.gc(keep_last=1, grace_seconds=0)
    assert [v.version for v in repo.versions("ctr")] == [3]
    assert repo.publish("ctr", tmp_path / "e0").version == 4


def test_metadata_file_sits_inside_the_version_and_describes_it(repo: ModelRepository, export_dir):
    mv = repo.publish("ctr", export_dir, metadata={"signature": {"inputs": {"I1": "float32"}}})
    fs = repo._store
    record = json.loads(fs.read(fs.join(repo._vdir("ctr", 1), METADATA_FILE)))
    assert record["name"] == "ctr" and record["version"] == 1
    assert record["signature"] == {"inputs": {"I1": "float32"}}
    assert record["manifest"]["digest"] == mv.metadata["manifest_digest"]
    assert record["created"].endswith("+00:00")


def test_unknown_version_names_what_exists(repo: ModelRepository, export_dir):
    repo.publish("ctr", export_dir)
    repo.publish("ctr", export_dir)
    with pytest.raises(VersionNotFoundError, match=r"no version 7; versions: 1, 2"):
        repo.get("ctr", version=7)


def test_repository_and_model_versions_pickle(repo: ModelRepository, export_dir):
    mv = repo.publish("ctr", export_dir)
    assert pickle.loads(pickle.dumps(mv)) == mv
    again = pickle.loads(pickle.dumps(repo))
    assert again.mode == repo.mode and again.config.root == repo.config.root
