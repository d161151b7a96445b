"""Version metadata: normalisation, redaction, code version, and tamper detection on read."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from kubeai_train.repository.errors import InvalidMetadataError
from kubeai_train.repository.metadata import (
    build_record,
    detect_framework,
    git_code_version,
    manifest_digest,
    parse_parent,
    parse_record,
    record_bytes,
)
from kubeai_train.repository.types import FileEntry

SHA = "a" * 64


def _files():
    return [FileEntry("variables/v.data", 10, SHA), FileEntry("saved_model.pb", 3, "b" * 64)]


def test_record_holds_lineage_manifest_and_converted_values():
    rec = build_record(
        "ctr",
        4,
        _files(),
        {
            "metrics": {"auc": np.float64(0.81), "n": np.int64(7), "bad": float("nan")},
            "params": {"layers": (64, 32), "emb": np.array([1, 2])},
            "signature": {"inputs": {"I1": "float32"}},
            "team": "rec",
        },
        parent=3,
        dataset={"uri": "odps://p/tables/t", "partition": "ds=1", "digest": "sha256:x"},
        code_version="abc",
    )
    assert rec["metrics"] == {"auc": 0.81, "n": 7, "bad": None}
    assert rec["params"] == {"layers": [64, 32], "emb": [1, 2]}
    assert rec["parent"] == {"name": "ctr", "version": 3}
    assert rec["framework"] == "tensorflow"  # from saved_model.pb
    assert rec["team"] == "rec" and rec["code_version"] == "abc"
    assert [f["path"] for f in rec["manifest"]["files"]] == ["saved_model.pb", "variables/v.data"]
    assert rec["manifest"]["total_size"] == 13
    assert rec["manifest"]["digest"] == manifest_digest(_files())
    meta, files = parse_record(record_bytes(rec), "ctr", 4)
    assert files == tuple(sorted(_files(), key=lambda f: f.path))
    assert meta["metrics"]["auc"] == 0.81 and "manifest" not in meta


def test_tampered_or_foreign_records_are_rejected():
    data = record_bytes(build_record("ctr", 2, _files(), {}, code_version=None))
    doc = json.loads(data)
    doc["manifest"]["files"][0]["size"] = 11
    with pytest.raises(InvalidMetadataError, match="does not match its digest"):
        parse_record(json.dumps(doc).encode(), "ctr", 2)
    with pytest.raises(InvalidMetadataError, match="names 'ctr'/2"):
        parse_record(data, "ctr", 3)
    with pytest.raises(InvalidMetadataError, match="unreadable"):
        parse_record(data[: len(data) // 2], "ctr", 2)


def test_parent_forms():
    assert parse_parent(None, "ctr") is None
    assert parse_parent(2, "ctr") == {"name": "ctr", "version": 2}
    assert parse_parent("base:5", "ctr") == {"name": "base", "version": 5}
    assert parse_parent({"name": "b", "version": 1}, "ctr") == {"name": "b", "version": 1}
    for bad in (0, True, "x", "a:0", 1.5):
        with pytest.raises(InvalidMetadataError):
            parse_parent(bad, "ctr")


def test_detect_framework():
    assert detect_framework(["saved_model.pb", "variables/x"]) == "tensorflow"
    assert detect_framework(["model.pt"]) == "torch"
    assert detect_framework(["m.onnx"]) == "onnx"
    assert detect_framework(["weights.bin"]) is None


def test_git_code_version(tmp_path, monkeypatch):
    for var in ("KUBEAI_CODE_VERSION", "GIT_COMMIT", "GITHUB_SHA"):
        monkeypatch.delenv(var, raising=False)
    assert git_code_version(tmp_path) is None  # not a repository
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "train.py").write_text("print(1)\n")
    subprocess.run([*git, "add", "train.py"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], cwd=tmp_path, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    assert git_code_version(tmp_path) == sha
    (tmp_path / "train.py").write_text("print(2)\n")
    assert git_code_version(tmp_path) == sha + "-dirty"
    monkeypatch.setenv("GITHUB_SHA", "f" * 40)
    assert git_code_version(tmp_path) == "f" * 40
