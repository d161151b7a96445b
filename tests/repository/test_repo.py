"""Publish / get / versions of ModelRepository on every backend (tests/repository/conftest.py)."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from kubeai_train.repository import (
    AliasNotFoundError,
    IntegrityError,
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


# ------------------------------------------------------------------------------------ aliases
def test_aliases_move_atomically_and_resolve(repo: ModelRepository, tmp_path):
    for i in range(3):
        repo.publish("ctr", make_export(tmp_path / f"e{i}", seed=i))
    assert repo.aliases("ctr") == {}
    assert repo.set_alias("ctr", "production", 1).version == 1
    repo.set_alias("ctr", "staging", 3)
    assert repo.aliases("ctr") == {"production": 1, "staging": 3}
    assert repo.get("ctr", alias="production").version == 1
    repo.set_alias("ctr", "production", 2)  # move
    assert repo.get("ctr", alias="production").version == 2
    config = repo.model_config("ctr")
    assert re.findall(r"versions: (\d+)", config) == ["2", "3"]  # newest + aliased, only committed
    assert re.findall(r'key: "(\w+)"\s+value: (\d+)', config) == [("production", "2"), ("staging", "3")]
    repo.remove_alias("ctr", "staging")
    assert repo.aliases("ctr") == {"production": 2}
    with pytest.raises(AliasNotFoundError, match=r"no alias 'staging'; aliases: production=2"):
        repo.get("ctr", alias="staging")
    with pytest.raises(AliasNotFoundError):
        repo.remove_alias("ctr", "staging")


def test_alias_readers_see_old_or_new_never_neither(repo_root, repo: ModelRepository, tmp_path):
    for i in range(2):
        repo.publish("ctr", make_export(tmp_path / f"e{i}", seed=i))
    repo.set_alias("ctr", "production", 1)
    stop = threading.Event()
    seen: list = []

    def reader():
        r = ModelRepository(repo.config.root, dict(repo.config.storage_options), commit=repo.mode)
        while not stop.is_set():
            seen.append(r.get("ctr", alias="production").version)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for i in range(6 if repo_root.remote else 20):
        repo.set_alias("ctr", "production", 1 + (i % 2 == 0))
    stop.set()
    t.join(30)
    assert seen and set(seen) <= {1, 2}


# ------------------------------------------------------------------------------------ deployments
def test_deployments_record_where_versions_run(repo: ModelRepository, export_dir):
    for _ in range(3):
        repo.publish("ctr", export_dir)
    d = repo.record_deployment("ctr", 1, "rec-svc", environment="prod", endpoint="http://user:pw@rec:8500")
    assert (d.version, d.service, d.status, d.environment) == (1, "rec-svc", "deployed", "prod")
    assert d.endpoint == "http://rec:8500"
    repo.record_deployment("ctr", 2, "rec-svc/canary", environment="prod")
    repo.record_deployment("ctr", 3, "rec-svc", environment="staging")
    now = {(x.service, x.environment): x.version for x in repo.deployments("ctr")}
    assert now == {("rec-svc", "prod"): 1, ("rec-svc/canary", "prod"): 2, ("rec-svc", "staging"): 3}
    repo.record_deployment("ctr", 2, "rec-svc", environment="prod")  # a rollout replaces the slot
    repo.record_deployment("ctr", 2, "rec-svc/canary", environment="prod", status="undeployed")
    now = {(x.service, x.environment): x.version for x in repo.deployments("ctr")}
    assert now == {("rec-svc", "prod"): 2, ("rec-svc", "staging"): 3}
    history = repo.deployments("ctr", history=True)
    assert [(x.service, x.version, x.status) for x in history] == [
        ("rec-svc", 1, "deployed"),
        ("rec-svc/canary", 2, "deployed"),
        ("rec-svc", 3, "deployed"),
        ("rec-svc", 2, "deployed"),
        ("rec-svc/canary", 2, "undeployed"),
    ]


# ------------------------------------------------------------------------------------ gc
def test_gc_keeps_aliased_deployed_and_newest(repo: ModelRepository, tmp_path):
    for i in range(5):
        repo.publish("ctr", make_export(tmp_path / f"e{i}", seed=i))
    repo.set_alias("ctr", "production", 1)
    repo.record_deployment("ctr", 2, "rec-svc")
    repo.record_deployment("ctr", 3, "old-svc")
    repo.record_deployment("ctr", 3, "old-svc", status="undeployed")
    dry = repo.gc(keep_last=1, dry_run=True)
    assert sorted(dry.removed_versions) == [("ctr", 3), ("ctr", 4)]
    assert [mv.version for mv in repo.versions("ctr")] == [1, 2, 3, 4, 5]
    report = repo.gc(keep_last=1)
    assert sorted(report.removed_versions) == [("ctr", 3), ("ctr", 4)]
    assert sorted(report.kept) == [("ctr", 1, "alias:production"), ("ctr", 2, "deployed:rec-svc")]
    assert [mv.version for mv in repo.versions("ctr")] == [1, 2, 5]
    assert repo._tree.store.tree(repo._tree.vdir("ctr", 3)) == {}
    assert repo.publish("ctr", tmp_path / "e0").version == 6  # numbers never go back
    with pytest.raises(InvalidArgumentError, match="keep_last must be an int >= 1"):
        repo.gc(keep_last=0)
    with pytest.raises(InvalidArgumentError, match="grace_seconds must be >= 0"):
        repo.gc(grace_seconds=-1)


def test_gc_reports_damaged_versions_and_leaves_them(repo: ModelRepository, tmp_path):
    for i in range(3):
        repo.publish("ctr", make_export(tmp_path / f"e{i}", seed=i))
    repo._tree.store.rm_file(repo._tree.store.join(repo._tree.vdir("ctr", 1), "saved_model.pb"))
    report = repo.gc(keep_last=1, grace_seconds=0)
    assert report.damaged == [("ctr", 1, "file saved_model.pb is missing")]
    assert report.removed_versions == [("ctr", 2)]
    assert repo._tree.store.read(repo._tree.store.join(repo._tree.vdir("ctr", 1), METADATA_FILE)) is not None


# ------------------------------------------------------------------------------------ verify, download
def test_verify_names_the_file_whose_checksum_changed(repo: ModelRepository, export_dir):
    mv = repo.publish("ctr", export_dir)
    assert repo.verify("ctr") == mv
    target = repo._tree.store.join(repo._tree.vdir("ctr", 1), "variables/variables.index")
    repo._tree.store.fs.pipe_file(target, b"\xff" * 16)  # same size, different bytes
    assert [v.version for v in repo.versions("ctr")] == [1]  # listing checks sizes only
    with pytest.raises(
        IntegrityError, match=r"ctr/1: file variables/variables.index has sha256 [0-9a-f]{64}"
    ) as e:
        repo.verify("ctr", 1)
    assert e.value.path == "variables/variables.index" and e.value.version == 1
    with pytest.raises(IntegrityError, match="variables/variables.index"):
        repo.download("ctr", 1, Path(str(export_dir) + "-dl"))
    assert not Path(str(export_dir) + "-dl").exists()


def test_missing_or_extra_files_fail_verify_and_hide_the_version(repo: ModelRepository, tmp_path):
    repo.publish("ctr", make_export(tmp_path / "a", seed=1))
    repo.publish("ctr", make_export(tmp_path / "b", seed=2))
    store = repo._tree.store
    store.rm_file(store.join(repo._tree.vdir("ctr", 1), "saved_model.pb"))
    assert [v.version for v in repo.versions("ctr")] == [2]
    with pytest.raises(VersionNotFoundError, match=r"exists but is damaged: file saved_model.pb is missing"):
        repo.get("ctr", version=1)
    with pytest.raises(IntegrityError, match="file saved_model.pb is missing"):
        repo.verify("ctr", 1)
    store.fs.pipe_file(store.join(repo._tree.vdir("ctr", 2), "stray.txt"), b"x")
    with pytest.raises(IntegrityError, match="file stray.txt is not in the manifest"):
        repo.verify("ctr", 2)


def test_download_copies_a_verified_version(repo: ModelRepository, export_dir, tmp_path):
    mv = repo.publish("ctr", export_dir)
    repo.set_alias("ctr", "production", 1)
    dest = repo.download("ctr", None, tmp_path / "dl", alias="production")
    for f in mv.manifest:
        assert (dest / f.path).read_bytes() == (export_dir / f.path).read_bytes()
    assert json.loads((dest / METADATA_FILE).read_text())["version"] == 1
    with pytest.raises(InvalidArgumentError, match="is not empty"):
        repo.download("ctr", 1, dest)
    assert repo.download("ctr", 1, dest, overwrite=True) == dest
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".dl")) == []


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


def test_gc_leaves_hand_made_version_directories_on_local_disks(tmp_path, export_dir):
    repo = ModelRepository(tmp_path / "repo")
    repo.publish("ctr", export_dir)
    manual = tmp_path / "repo" / "ctr" / "7"
    manual.mkdir()
    (manual / "saved_model.pb").write_bytes(b"by hand")
    report = repo.gc(grace_seconds=0)
    assert report.removed_debris == [] and report.damaged[0][:2] == ("ctr", 7)
    assert manual.exists()
    assert [v.version for v in repo.versions("ctr")] == [1]
    assert repo.publish("ctr", export_dir).version == 8  # numbering steps over it


def test_gc_finishes_a_killed_gc(tmp_path, export_dir):
    repo = ModelRepository(tmp_path / "repo")
    repo.publish("ctr", export_dir)
    leftover = tmp_path / "repo" / "ctr" / ".kubeai" / "trash" / "3-deadbeef" / "variables"
    leftover.mkdir(parents=True)
    (leftover / "x").write_bytes(b"x")
    report = repo.gc()
    assert report.removed_debris == [str(leftover.parent)]
    assert not leftover.parent.exists()


def test_republishing_a_downloaded_version_promotes_it(repo: ModelRepository, export_dir, tmp_path):
    first = repo.publish("ctr", export_dir, metadata={"metrics": {"auc": 0.7}})
    dl = repo.download("ctr", 1, tmp_path / "dl")
    prod = ModelRepository(tmp_path / "prod")
    promoted = prod.publish("ctr", dl, metadata={"metrics": first.metrics})
    assert [(f.path, f.sha256) for f in promoted.manifest] == [(f.path, f.sha256) for f in first.manifest]
    assert promoted.metrics == {"auc": 0.7}
    with pytest.raises(SourceNotFoundError):
        repo.publish("ctr", None)
