"""Value types of the repository validate what they hold."""

from __future__ import annotations

import pytest

from kubeai_train.repository import Deployment, FileEntry, GcReport, InvalidMetadataError, ModelVersion


def test_file_entry_validation():
    assert FileEntry("a/b", 1, "0" * 64).to_json() == {"path": "a/b", "size": 1, "sha256": "0" * 64}
    for args in [("/abs", 1, "0" * 64), ("a/../b", 1, "0" * 64), ("a", -1, "0" * 64), ("a", 1, "XYZ")]:
        with pytest.raises(InvalidMetadataError):
            FileEntry(*args)


def test_model_version_and_deployment_validation():
    mv = ModelVersion("ctr", 2, "/r/ctr/2", {"metrics": {"auc": 0.5}}, (FileEntry("a", 3, "0" * 64),))
    assert mv.metrics == {"auc": 0.5} and mv.size == 3 and mv.parent is None
    assert mv.to_json()["manifest"] == [{"path": "a", "size": 3, "sha256": "0" * 64}]
    for bad in (0, True, "2"):
        with pytest.raises(InvalidMetadataError):
            ModelVersion("ctr", bad, "/x")
    with pytest.raises(InvalidMetadataError, match="status"):
        Deployment("ctr", 1, "svc", status="running")
    assert GcReport(removed_versions=[("ctr", 1)]).to_json()["removed_versions"] == [["ctr", 1]]
