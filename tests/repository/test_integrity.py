"""verify and download of ModelRepository: every file against the manifest, named when wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeai_train.repository import (
    IntegrityError,
    InvalidArgumentError,
    ModelRepository,
    VersionNotFoundError,
)
from kubeai_train.repository.metadata import METADATA_FILE

from .conftest import make_export


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
