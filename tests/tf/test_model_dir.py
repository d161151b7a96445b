"""Model directories (kubeai_train.tf.model_dir): TF-native and fsspec-only, URL checks, the
staging of processes that are gone, and exports written whole."""

from __future__ import annotations

import os

import pytest

from kubeai_train.tf.model_dir import ModelDir, check_url, tf_writes
from kubeai_train.tf.types import TrainError


def test_model_dir_kinds_and_bad_scheme(tmp_path, mem_dir):
    assert tf_writes(str(tmp_path)) and tf_writes(f"file://{tmp_path}") and not tf_writes("oss://b/x")
    for d in (ModelDir(str(tmp_path / "m")), mem_dir):
        d.makedirs()
        assert d.read_json("a.json") is None and not d.exists("a.json")
        d.write_json("a.json", {"x": 1})
        d.write_json("a.json", {"x": 2})
        d.write_bytes("sub/b.bin", b"\x00\x01")
        assert d.read_json("a.json") == {"x": 2} and d.read_bytes("sub/b.bin") == b"\x00\x01"
        assert d.listdir() == ["a.json", "sub"] and d.listdir("missing") == []
        d.remove("a.json")
        d.remove("a.json")  # missing: not an error
        assert not d.exists("a.json")
    with pytest.raises(TrainError) as e:
        ModelDir("nosuchscheme://user:pw@bucket/x")
    msg = str(e.value)
    assert "nosuchscheme://" in msg and "pw" not in msg and "\n" not in msg
    check_url(None)
    check_url(str(tmp_path))
    check_url("memory://b/e", what="export_dir")
    with pytest.raises(TrainError, match=r"^export_dir 'nosuchscheme://b/e': neither TensorFlow nor fsspec"):
        check_url("nosuchscheme://b/e", what="export_dir")


def test_staging_of_processes_that_are_gone_is_swept(tmp_path):
    import psutil

    dead = next(p for p in range(4_000_000, 4_100_000) if not psutil.pid_exists(p))
    gone = tmp_path / f"kubeai-model-dir-{dead}-x1y2"
    (gone / "restore").mkdir(parents=True)
    (gone / "restore" / "model.ckpt-9.index").write_bytes(b"left by a process that exited with os._exit")
    alive = tmp_path / f"kubeai-model-dir-{os.getppid()}-a1b2"
    alive.mkdir()
    other = tmp_path / "someone-elses-dir"
    other.mkdir()
    d = ModelDir("memory://sweep/m", staging_dir=str(tmp_path))
    mine = d.staging
    assert os.path.basename(mine).startswith(f"kubeai-model-dir-{os.getpid()}-")
    assert not gone.exists() and alive.exists() and other.exists()


def test_write_export_replaces_local_exports_whole_and_uploads_remote_ones(tmp_path, mem_dir):
    from kubeai_train.tf.model_dir import write_export

    def save(content):
        def write(path):
            os.makedirs(path)
            with open(os.path.join(path, "saved_model.pb"), "w") as f:
                f.write(content)

        return write

    target = tmp_path / "exp"
    assert write_export(f"file://{target}", mem_dir, save("v1")) == str(target)
    assert (target / "saved_model.pb").read_text() == "v1"

    def broken(path):
        os.makedirs(path)
        raise RuntimeError("export failed midway")

    with pytest.raises(RuntimeError):
        write_export(str(target), mem_dir, broken)
    assert (target / "saved_model.pb").read_text() == "v1"  # the old export is untouched
    local = write_export(f"{mem_dir.url}/export", mem_dir, save("v2"))
    assert local.startswith(mem_dir.staging) and mem_dir.read_bytes("export/saved_model.pb") == b"v2"
