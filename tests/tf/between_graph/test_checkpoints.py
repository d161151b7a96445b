"""Between-graph checkpoints (kubeai_train.tf.between_graph.checkpoints) in TF-native and
fsspec-only model directories.

Single process, real TensorFlow savers and checkpoints; the fsspec-only directory is memory://
(every test its own root) and, for the real object-store path, the local OSS server.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from kubeai_train.tf.between_graph import checkpoints as ck
from kubeai_train.tf.checkpoint_store import StagedStore
from kubeai_train.tf.model_dir import ModelDir
from kubeai_train.tf.types import TrainError

from ..conftest import values_equal


class _Graph:
    """A graph like a trainer's: a partitioned table, a dense weight, a string reader position."""

    def __init__(self, make_ckpts):
        self.graph = tf.Graph()
        with self.graph.as_default():
            part = tf.compat.v1.fixed_size_partitioner(3)
            self.emb = tf.compat.v1.get_variable(
                "emb", [300, 8], partitioner=part, initializer=tf.compat.v1.random_normal_initializer()
            )
            self.w = tf.compat.v1.get_variable("w", [8], initializer=tf.compat.v1.random_normal_initializer())
            self.pos = tf.compat.v1.get_variable("pos", initializer=tf.constant(""), trainable=False)
            self.new_pos = tf.compat.v1.placeholder(tf.string, [])
            self.set_pos = self.pos.assign(self.new_pos)
            self.emb_t = self.emb.as_tensor()
            self.bump = tf.group(*[v.assign_add(tf.ones_like(v)) for v in [*self.emb, self.w]])
            self.init = tf.compat.v1.global_variables_initializer()
            self.ckpts = make_ckpts()
            self.ckpts.build(sharded=False)
        self.sess = tf.compat.v1.Session(graph=self.graph)
        self.sess.run(self.init)

    def values(self):
        return self.sess.run([self.emb_t, self.w, self.pos])

    def step(self, pos: str):
        self.sess.run([self.bump, self.set_pos], {self.new_pos: pos})


def test_plan_parts_bounds_bytes_and_keeps_one_device_per_part():
    g = tf.Graph()
    with g.as_default():
        vs = []
        for i in range(6):
            with tf.compat.v1.device(f"/job:ps/task:{i % 2}"):
                vs.append(tf.compat.v1.get_variable(f"v{i}", [100, 4]))  # 1600 bytes each
        with tf.compat.v1.device("/job:ps/task:0"):
            vs.append(tf.compat.v1.get_variable("big", [1000, 4]))  # 16000 bytes > part_bytes
    parts = ck.plan_parts(vs, 3300)
    assert sorted(v.name for p in parts for v in p) == sorted(v.name for v in vs)
    for p in parts:
        assert len({v.device for v in p}) == 1
        assert len(p) == 1 or sum(ck._var_bytes(v) for v in p) <= 3300
    assert [v.name for v in parts[-1]] == ["v5:0"] or any([v.name for v in p] == ["big:0"] for p in parts)
    with pytest.raises(TrainError, match="checkpoint_part_bytes must be >= 1, got 0"):
        ck.plan_parts(vs, 0)


def test_between_graph_rejects_an_unwritable_export_dir_before_training(tmp_path, clean_cluster_env):
    from kubeai_train import tf as ktf

    cfg = ktf.TrainConfig(model_dir=str(tmp_path / "m"), train_data="x", export_dir="nosuchscheme://b/e")
    with pytest.raises(TrainError, match=r"^export_dir 'nosuchscheme://b/e'"):
        ktf.run(ktf.DeepFM(features=ktf.CtrFeatures(hash_buckets=10)), cfg)
    assert not (tmp_path / "m").exists()  # nothing was started or written


def test_staged_round_trip_is_a_standard_tf_checkpoint(mem_dir, tmp_path):
    g = _Graph(lambda: ck.StagedCheckpoints(mem_dir, part_bytes=4000))
    assert len(g.ckpts.parts) >= 3  # 3 table shards of 3200 bytes each cannot share a part
    g.step('{"row": 10}')
    saved = g.values()
    url = g.ckpts.save(g.sess, 7)
    assert url == f"{mem_dir.url}/model.ckpt-7"
    names = mem_dir.listdir()
    assert "checkpoint" in names and "model.ckpt-7.index" in names
    data = [n for n in names if ".data-" in n]
    assert len(data) == len(g.ckpts.parts) and all(n.endswith(f"-of-{len(data):05d}") for n in data)
    # TensorFlow itself reads the downloaded copy: state file, variable list and values
    local = tmp_path / "copy"
    local.mkdir()
    for n in names:
        mem_dir.download(n, str(local / n))
    assert tf.train.latest_checkpoint(str(local)) == str(local / "model.ckpt-7")
    assert dict(tf.train.list_variables(str(local / "model.ckpt-7"))) == {
        "emb": [300, 8],
        "w": [8],
        "pos": [],
    }
    reader = tf.train.load_checkpoint(str(local / "model.ckpt-7"))
    assert np.array_equal(reader.get_tensor("emb"), saved[0]) and reader.get_tensor("pos") == b'{"row": 10}'
    # a later state is replaced by the saved one on restore
    g.step('{"row": 20}')
    assert not values_equal(g.values(), saved)
    assert g.ckpts.restore_latest(g.sess) == url
    assert values_equal(g.values(), saved)
    # a fresh process (a new instance) finds the same latest checkpoint
    g2 = _Graph(lambda: ck.StagedCheckpoints(ModelDir(mem_dir.url), part_bytes=4000))
    assert g2.ckpts.restore_latest(g2.sess) == url and values_equal(g2.values(), saved)


def test_staged_keeps_max_to_keep_and_names_a_repeated_step_apart(mem_dir):
    g = _Graph(lambda: ck.StagedCheckpoints(mem_dir, part_bytes=1 << 20, max_to_keep=2))
    for step in (1, 2, 3):
        g.step(f"p{step}")
        g.ckpts.save(g.sess, step)
    g.step("final")
    final = g.values()
    assert g.ckpts.save(g.sess, 3).endswith("/model.ckpt-3_1")
    assert g.ckpts.committed() == ["model.ckpt-3", "model.ckpt-3_1"]
    stems = {n.split(".index")[0].split(".data-")[0] for n in mem_dir.listdir() if n != "checkpoint"}
    assert stems == {"model.ckpt-3", "model.ckpt-3_1"}
    g.step("later")
    g.ckpts.restore_latest(g.sess)
    assert values_equal(g.values(), final)


def test_staged_save_killed_midway_keeps_the_previous_checkpoint(mem_dir, monkeypatch):
    g = _Graph(lambda: ck.StagedCheckpoints(mem_dir, part_bytes=4000))
    g.step("a")
    first = g.values()
    g.ckpts.save(g.sess, 1)
    g.step("b")

    uploads = []
    real_upload = ModelDir.upload

    def dying_upload(self, local, rel):
        uploads.append(rel)
        if len(uploads) == 2:
            raise KeyboardInterrupt("killed")  # the process dies after one data file of the save
        real_upload(self, local, rel)

    monkeypatch.setattr(ModelDir, "upload", dying_upload)
    with pytest.raises(KeyboardInterrupt):
        g.ckpts.save(g.sess, 2)
    monkeypatch.setattr(ModelDir, "upload", real_upload)
    assert any(n.startswith("model.ckpt-2.data-") for n in mem_dir.listdir())  # the torn save's file
    # the restarted chief restores the previous checkpoint; its next save deletes the torn files
    g2 = _Graph(lambda: ck.StagedCheckpoints(ModelDir(mem_dir.url), part_bytes=4000))
    assert g2.ckpts.restore_latest(g2.sess).endswith("/model.ckpt-1")
    assert values_equal(g2.values(), first)
    g2.ckpts.save(g2.sess, 3)
    assert not any(n.startswith("model.ckpt-2") for n in mem_dir.listdir())
    assert g2.ckpts.committed() == ["model.ckpt-1", "model.ckpt-3"]


def test_staged_save_replaces_a_torn_save_of_the_same_step(mem_dir, monkeypatch):
    g = _Graph(lambda: ck.StagedCheckpoints(mem_dir, part_bytes=4000))  # 3+ parts
    g.step("a")
    real_upload = ModelDir.upload
    calls = []

    def dying_upload(self, local, rel):
        calls.append(rel)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        real_upload(self, local, rel)

    monkeypatch.setattr(ModelDir, "upload", dying_upload)
    with pytest.raises(KeyboardInterrupt):
        g.ckpts.save(g.sess, 4)
    monkeypatch.setattr(ModelDir, "upload", real_upload)
    # the restarted chief saves the same step with another part count (one part)
    g2 = _Graph(lambda: ck.StagedCheckpoints(ModelDir(mem_dir.url), part_bytes=1 << 20))
    g2.step("b")
    saved = g2.values()
    g2.ckpts.save(g2.sess, 4)
    assert sorted(n for n in mem_dir.listdir() if n.startswith("model.ckpt-4")) == [
        "model.ckpt-4.data-00000-of-00001",
        "model.ckpt-4.index",
    ]
    g2.step("c")
    assert g2.ckpts.restore_latest(g2.sess).endswith("/model.ckpt-4")
    assert values_equal(g2.values(), saved)


@pytest.mark.parametrize("kind", ["staged", "native"])
def test_corrupt_latest_falls_back_to_the_one_before(kind, mem_dir, tmp_path, caplog):
    if kind == "staged":
        d = mem_dir
        make = lambda: ck.StagedCheckpoints(d, part_bytes=4000)  # noqa: E731
    else:
        d = ModelDir(str(tmp_path / "m"))
        d.makedirs()
        make = lambda: ck.NativeCheckpoints(d)  # noqa: E731
    g = _Graph(make)
    g.step("one")
    first = g.values()
    g.ckpts.save(g.sess, 1)
    g.step("two")
    g.ckpts.save(g.sess, 2)
    data = sorted(n for n in d.listdir() if n.startswith("model.ckpt-2.data-"))
    raw = bytearray(d.read_bytes(data[0]))
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the newest checkpoint
    d.write_bytes(data[0], bytes(raw))
    g.step("three")
    with caplog.at_level(logging.WARNING, logger="kubeai_train.tf"):
        assert g.ckpts.restore_latest(g.sess).endswith("/model.ckpt-1")
    assert "model.ckpt-2" in caplog.text and "does not restore" in caplog.text
    assert values_equal(g.values(), first)
    # nothing restores: one clear error naming every checkpoint
    for n in d.listdir():
        if n.endswith(".index"):
            d.remove(n)
    with pytest.raises(TrainError, match=r"no checkpoint in .* restores: model\.ckpt-2 .*model\.ckpt-1"):
        g.ckpts.restore_latest(g.sess)


def test_no_checkpoint_restores_nothing(mem_dir):
    g = _Graph(lambda: ck.StagedCheckpoints(mem_dir))
    assert g.ckpts.restore_latest(g.sess) is None
    assert g.ckpts.committed() == []


def test_staged_on_the_local_oss_server(tmp_path, monkeypatch):
    from kubeai_train.testing.oss_server import OSSServer

    with OSSServer(tmp_path / "oss", buckets=["ckpt"]) as server:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        d = ModelDir("oss://ckpt/jobs/a")
        assert not d.native
        g = _Graph(lambda: ck.StagedCheckpoints(d, part_bytes=4000))
        g.step("x")
        saved = g.values()
        url = g.ckpts.save(g.sess, 5)
        g.step("y")
        assert g.ckpts.restore_latest(g.sess) == url == "oss://ckpt/jobs/a/model.ckpt-5"
        assert values_equal(g.values(), saved)
        on_disk = sorted(os.listdir(os.path.join(server.root, "ckpt", "jobs", "a")))
        assert "checkpoint" in on_disk and "model.ckpt-5.index" in on_disk
        secret = server.env()["OSS_ACCESS_KEY_SECRET"]
        assert secret not in repr(d) and secret not in d.display


def test_a_failed_periodic_save_does_not_stop_training(tmp_path, mem_dir, clean_cluster_env, caplog):
    """model_dir on memory://, one process: the upload of the 2nd periodic checkpoint fails (a store
    that stays unreachable through its client's retries); training goes on, later checkpoints and
    the final one commit, and the job finishes."""
    from kubeai_train import tf as ktf
    from kubeai_train.testing import ctr

    monkeypatch = clean_cluster_env
    ctr.generate(2000, tmp_path / "d", seed=1, files=1)
    real_upload = ModelDir.upload
    saves = []

    def flaky_upload(self, local, rel):
        if rel.endswith(".index"):
            saves.append(rel)
        if rel.startswith("model.ckpt-4."):
            raise ConnectionResetError("connection reset by peer")
        real_upload(self, local, rel)

    monkeypatch.setattr(ModelDir, "upload", flaky_upload)
    cfg = ktf.TrainConfig(
        model_dir=mem_dir.url, train_data=str(tmp_path / "d"), batch_size=100, save_checkpoint_steps=2
    )
    model = ktf.DeepFM(features=ktf.CtrFeatures(hash_buckets=50), embedding_dim=2, hidden=(4,))
    with caplog.at_level(logging.WARNING, logger="kubeai_train.tf"):
        res = ktf.run(model, cfg)
    assert res.global_step == 20 and res.checkpoint == f"{mem_dir.url}/model.ckpt-20_1"
    assert "checkpoint at global step 4 failed (ConnectionResetError" in caplog.text
    committed = StagedStore(ModelDir(mem_dir.url)).committed()
    assert "model.ckpt-4" not in committed and committed[-1] == "model.ckpt-20_1"
    assert mem_dir.read_json("_TRAINED.json")["global_step"] == 20


def test_periodic_saves_failing_in_a_row_fail_the_job(tmp_path, mem_dir, clean_cluster_env):
    from kubeai_train import tf as ktf
    from kubeai_train.testing import ctr
    from kubeai_train.tf.between_graph.trainer import MAX_FAILED_SAVES

    ctr.generate(2000, tmp_path / "d", seed=1, files=1)

    def down(self, local, rel):
        raise ConnectionRefusedError("the store is down")

    clean_cluster_env.setattr(ModelDir, "upload", down)
    cfg = ktf.TrainConfig(
        model_dir=mem_dir.url, train_data=str(tmp_path / "d"), batch_size=100, save_checkpoint_steps=2
    )
    model = ktf.DeepFM(features=ktf.CtrFeatures(hash_buckets=50), embedding_dim=2, hidden=(4,))
    with pytest.raises(ConnectionRefusedError):
        ktf.run(model, cfg)
    assert MAX_FAILED_SAVES == 3 and mem_dir.read_json("_TRAINED.json") is None
