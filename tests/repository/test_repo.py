"""Publish / get / versions of ModelRepository on every backend (tests/repository/conftest.py)."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest

from kubeai_train.repository import (
    AliasNotFoundError,
    InvalidArgumentError,
    InvalidMetadataError,
    InvalidNameError,
    ModelNotFoundError,
    ModelRepository,
    ModelVersion,
    RepositoryConfigError,
    SourceNotFoundError,
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
    fs = repo._tree.store
    record = json.loads(fs.read(fs.join(repo._tree.vdir("ctr", 1), METADATA_FILE)))
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


# ------------------------------------------------------------------------------------ lineage, secrets
def test_lineage_dataset_and_code_version_are_recorded(repo: ModelRepository, export_dir, monkeypatch):
    monkeypatch.setenv("KUBEAI_CODE_VERSION", "0123456789abcdef0123456789abcdef01234567")
    v1 = repo.publish("ctr", export_dir, metadata={"dataset": "oss://bucket/train/"})
    v2 = repo.publish(
        "ctr",
        export_dir,
        metadata={"metrics": {"auc": 0.8}},
        parent=v1.version,
        dataset={"uri": "odps://proj/tables/ctr_train", "partition": "ds=20260101", "digest": "sha256:ab"},
    )
    assert v1.metadata["dataset"] == {"uri": "oss://bucket/train/", "partition": None, "digest": None}
    assert v2.parent == {"name": "ctr", "version": 1}
    assert v2.metadata["dataset"]["partition"] == "ds=20260101"
    assert v2.metadata["code_version"] == "0123456789abcdef0123456789abcdef01234567"
    other = repo.publish("ranker", export_dir, parent="ctr:2")
    assert other.parent == {"name": "ctr", "version": 2}
    assert repo.get("ctr", version=2).metadata == v2.metadata  # read back as published


def test_secrets_never_reach_metadata_or_logs(repo_root, export_dir, caplog):
    caplog.set_level("DEBUG")
    repo = ModelRepository(repo_root.url, {**repo_root.storage_options, "client_secret_x": "TOPSECRET-1"})
    mv = repo.publish(
        "ctr",
        export_dir,
        metadata={
            "params": {"lr": 0.1, "oss_access_key_secret": "TOPSECRET-2", "db_password": "TOPSECRET-3"}
        },
        dataset="oss://AKID:TOPSECRET-4@bucket/train/",
    )
    raw = repo._tree.store.read(repo._tree.store.join(repo._tree.vdir("ctr", mv.version), METADATA_FILE))
    text = raw.decode() + caplog.text + repr(repo) + repr(repo.config) + json.dumps(mv.to_json())
    for secret in ("TOPSECRET-1", "TOPSECRET-2", "TOPSECRET-3", "TOPSECRET-4", "AKID"):
        assert secret not in text
    assert mv.metadata["params"] == {
        "lr": 0.1,
        "oss_access_key_secret": "<redacted>",
        "db_password": "<redacted>",
    }
    assert mv.metadata["dataset"]["uri"] == "oss://bucket/train/"


# ------------------------------------------------------------------------------------ bad input
BAD_NAMES = ["", "a/b", "..", "../x", "a..b", ".hidden", "-x", "a b", "ctr\n", "a\\b", "x" * 129, None, 3]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_unsafe_model_names_are_rejected_before_anything_is_written(repo: ModelRepository, export_dir, bad):
    for call in (
        lambda: repo.publish(bad, export_dir),
        lambda: repo.get(bad),
        lambda: repo.versions(bad),
        lambda: repo.set_alias(bad, "production", 1),
        lambda: repo.record_deployment(bad, 1, "svc"),
    ):
        with pytest.raises(InvalidNameError) as e:
            call()
        assert isinstance(e.value, ValueError)
        assert "\n" not in str(e.value)
    assert repo.models() == []


@pytest.mark.parametrize("bad", ["", "3", "a/b", "..", "prod uction"], ids=repr)
def test_unsafe_alias_names_are_rejected(repo: ModelRepository, export_dir, bad):
    repo.publish("ctr", export_dir)
    with pytest.raises(InvalidNameError, match="alias"):
        repo.set_alias("ctr", bad, 1)


@pytest.mark.parametrize("bad", [0, -1, "1", 1.5, True])
def test_bad_versions_are_rejected(repo: ModelRepository, export_dir, bad):
    repo.publish("ctr", export_dir)
    with pytest.raises(InvalidArgumentError, match="version must be an int >= 1"):
        repo.get("ctr", version=bad)


def test_unknown_model_alias_and_version_name_what_exists(repo: ModelRepository, export_dir):
    with pytest.raises(ModelNotFoundError, match=r"model 'ctr' has no committed version .*; models: none"):
        repo.get("ctr")
    repo.publish("ctr", export_dir)
    repo.set_alias("ctr", "production", 1)
    with pytest.raises(ModelNotFoundError, match=r"models: ctr"):
        repo.get("ranker")
    with pytest.raises(AliasNotFoundError, match=r"aliases: production=1"):
        repo.get("ctr", alias="prod")
    with pytest.raises(VersionNotFoundError, match=r"no version 5; versions: 1"):
        repo.set_alias("ctr", "staging", 5)
    with pytest.raises(VersionNotFoundError, match=r"no version 5"):
        repo.record_deployment("ctr", 5, "svc")
    with pytest.raises(InvalidArgumentError, match="not both"):
        repo.get("ctr", version=1, alias="production")
    with pytest.raises(InvalidNameError, match="service"):
        repo.record_deployment("ctr", 1, "bad service")
    assert repo.versions("ranker") == []


@pytest.mark.parametrize(
    ("metadata", "kwargs", "error", "match"),
    [
        ("auc=0.8", {}, InvalidMetadataError, "metadata must be a dict"),
        ({"version": 3}, {}, InvalidMetadataError, "set by the repository"),
        ({"metrics": {"auc": "high"}}, {}, InvalidMetadataError, "metric 'auc' must be a number"),
        ({"params": {"fn": object()}}, {}, InvalidMetadataError, r"metadata\.params\.fn has a object"),
        ({"dataset": 3}, {}, InvalidMetadataError, "dataset must be a URI string"),
        ({}, {"parent": 9}, VersionNotFoundError, "parent ctr/9 is not a committed version"),
        ({}, {"parent": "x"}, InvalidMetadataError, "parent must be a version number"),
    ],
)
def test_bad_metadata_is_rejected_before_anything_is_written(
    repo, export_dir, metadata, kwargs, error, match
):
    with pytest.raises(error, match=match):
        repo.publish("ctr", export_dir, metadata, **kwargs)
    assert repo.versions("ctr") == []
    assert repo.gc(grace_seconds=0).removed_debris == []


def test_missing_or_empty_sources_are_rejected(repo: ModelRepository, tmp_path):
    with pytest.raises(SourceNotFoundError, match="does not exist") as e:
        repo.publish("ctr", tmp_path / "nope")
    assert isinstance(e.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="has no files"):
        repo.publish("ctr", tmp_path / "empty")
    single = tmp_path / "model.onnx"
    single.write_bytes(b"onnx")
    mv = repo.publish("ctr", single)
    assert [f.path for f in mv.manifest] == ["model.onnx"] and mv.metadata["framework"] == "onnx"


@pytest.mark.parametrize(
    ("root", "kwargs", "match"),
    [
        ("", {}, "must be a non-empty path or URL"),
        ("nosuchproto://x/y", {}, "cannot open repository root"),
        ("memory://x", {"commit": "bogus"}, "commit must be one of"),
        ("memory://x", {"commit": "rename"}, "commit='rename' needs a local path"),
        ("memory://x", {"grace_seconds": -1}, "grace_seconds must be >= 0"),
    ],
)
def test_bad_repository_settings(root, kwargs, match):
    with pytest.raises(RepositoryConfigError, match=match):
        ModelRepository(root, **kwargs)


def test_publish_from_a_url(repo: ModelRepository, export_dir):
    src = f"file://{export_dir}"
    mv = repo.publish("ctr", src)
    assert {f.path for f in mv.manifest} == {
        "saved_model.pb",
        "variables/variables.index",
        "variables/variables.data-00000-of-00001",
    }
    with pytest.raises(SourceNotFoundError, match="cannot open"):
        repo.publish("ctr", "nosuchproto://x/y")


def test_republishing_a_downloaded_version_promotes_it(repo: ModelRepository, export_dir, tmp_path):
    first = repo.publish("ctr", export_dir, metadata={"metrics": {"auc": 0.7}})
    dl = repo.download("ctr", 1, tmp_path / "dl")
    prod = ModelRepository(tmp_path / "prod")
    promoted = prod.publish("ctr", dl, metadata={"metrics": first.metrics})
    assert [(f.path, f.sha256) for f in promoted.manifest] == [(f.path, f.sha256) for f in first.manifest]
    assert promoted.metrics == {"auc": 0.7}
    with pytest.raises(SourceNotFoundError):
        repo.publish("ctr", None)
