"""gc of ModelRepository: debris of killed publishers and old versions, never a protected one."""

from __future__ import annotations

import pytest

from kubeai_train.repository import InvalidArgumentError, ModelRepository
from kubeai_train.repository.metadata import METADATA_FILE

from .conftest import make_export


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
