"""Object-based checkpoints of the coordinator mode (kubeai_train.tf.coordinator.checkpoints).

Unit tests: one process, real ``tf.train.Checkpoint`` saves; the fsspec-only model directory is
memory:// (each test its own root) or the local OSS server (also across processes: a chief
SIGKILLed mid-save). The integration test runs a real ParameterServerStrategy cluster (chief,
2 PS, 1 worker) through the launcher and checks where the checkpoint files are written.

Run as a script, this file is that cluster job (see ``_cluster_job``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.tf._cluster import ROOT, exit_now, run_cluster


def _state(seed: int = 0):
    """A model like the coordinator's: a table, a dense weight, the step, the reader positions."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    m = tf.Module()
    m.table = tf.Variable(rng.normal(size=(500, 8)).astype(np.float32), name="table")
    m.w = tf.Variable(rng.normal(size=(8,)).astype(np.float32), name="w")
    step = tf.Variable(0, dtype=tf.int64, name="global_step")
    data = tf.Variable("", dtype=tf.string, name="data_state")
    ckpt = tf.train.Checkpoint(model=m, step=step, data=data)
    return m, step, data, ckpt


def _values(m, step, data):
    return [m.table.numpy().copy(), m.w.numpy().copy(), int(step.numpy()), data.numpy()]


def _bump(m, step, data, pos: str) -> None:
    m.table.assign_add(np.ones((500, 8), np.float32))
    m.w.assign_add(np.ones(8, np.float32))
    step.assign_add(1)
    data.assign(pos)


def _staged(d, ckpt, **kw):
    from kubeai_train.tf.coordinator.checkpoints import StagedObjectCheckpoints

    return StagedObjectCheckpoints(d, ckpt, **kw)


# ----------------------------------------------------------------------------- staged


def _equal(a, b) -> bool:  # also run as a script (the cluster job): no import from conftest
    return all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b, strict=True)
    )


def test_kind_follows_the_model_dir(tmp_path, mem_dir):
    from kubeai_train.tf.coordinator.checkpoints import (
        NativeObjectCheckpoints,
        StagedObjectCheckpoints,
        object_checkpoints,
    )
    from kubeai_train.tf.model_dir import ModelDir

    assert isinstance(object_checkpoints(ModelDir(str(tmp_path))), NativeObjectCheckpoints)
    assert isinstance(object_checkpoints(mem_dir, io_device="/cpu:0"), StagedObjectCheckpoints)


def test_staged_round_trip_is_a_checkpoint_tensorflow_reads(mem_dir, tmp_path):
    import tensorflow as tf

    m, step, data, ckpt = _state()
    c = _staged(mem_dir, ckpt)
    _bump(m, step, data, '{"row": 10}')
    saved = _values(m, step, data)
    url = c.save(7)
    assert url == f"{mem_dir.url}/ckpt/ckpt-7"
    names = mem_dir.listdir("ckpt")
    assert names == ["checkpoint", "ckpt-7.data-00000-of-00001", "ckpt-7.index"]
    assert os.listdir(os.path.join(mem_dir.staging)) == []  # nothing left behind in staging

    # a downloaded copy is an ordinary CheckpointManager directory
    local = tmp_path / "copy" / "ckpt"
    local.mkdir(parents=True)
    for n in names:
        mem_dir.download(f"ckpt/{n}", str(local / n))
    assert tf.train.latest_checkpoint(str(local)) == str(local / "ckpt-7")
    m2, step2, data2, ckpt2 = _state(seed=1)
    manager = tf.train.CheckpointManager(ckpt2, str(local), max_to_keep=3)
    assert manager.latest_checkpoint == str(local / "ckpt-7") and manager.checkpoints == [
        str(local / "ckpt-7")
    ]
    ckpt2.restore(manager.latest_checkpoint).assert_consumed()
    assert _equal(_values(m2, step2, data2), saved)

    # a later state is replaced by the saved one on restore, by this instance and a fresh one
    _bump(m, step, data, '{"row": 20}')
    assert c.restore_latest() == url and _equal(_values(m, step, data), saved)
    m3, step3, data3, ckpt3 = _state(seed=2)
    assert _staged(type(mem_dir)(mem_dir.url), ckpt3).restore_latest() == url
    assert _equal(_values(m3, step3, data3), saved)


def test_staged_keeps_three_and_names_a_repeated_step_apart(mem_dir):
    m, step, data, ckpt = _state()
    c = _staged(mem_dir, ckpt)
    for s in (1, 2, 3, 4):
        _bump(m, step, data, f"p{s}")
        c.save(s)
    data.assign("final")
    final = _values(m, step, data)
    assert c.save(4).endswith("/ckpt/ckpt-4_1")  # the final save at the last periodic save's step
    assert c.committed() == ["ckpt-3", "ckpt-4", "ckpt-4_1"]
    stems = {n.split(".")[0] for n in mem_dir.listdir("ckpt") if n != "checkpoint"}
    assert stems == {"ckpt-3", "ckpt-4", "ckpt-4_1"}
    _bump(m, step, data, "later")
    assert c.restore_latest().endswith("/ckpt-4_1") and _equal(_values(m, step, data), final)


def test_staged_save_interrupted_midway_keeps_the_previous_checkpoint(mem_dir, monkeypatch):
    from kubeai_train.tf.model_dir import ModelDir

    m, step, data, ckpt = _state()
    c = _staged(mem_dir, ckpt)
    _bump(m, step, data, "a")
    first = _values(m, step, data)
    c.save(1)
    _bump(m, step, data, "b")
    real_upload = ModelDir.upload

    def dying_upload(self, local, rel):
        if rel.endswith(".index"):
            raise KeyboardInterrupt("killed")  # the data file is up, the index is not
        real_upload(self, local, rel)

    monkeypatch.setattr(ModelDir, "upload", dying_upload)
    with pytest.raises(KeyboardInterrupt):
        c.save(2)
    monkeypatch.setattr(ModelDir, "upload", real_upload)
    assert "ckpt-2.data-00000-of-00001" in mem_dir.listdir("ckpt")
    assert os.listdir(mem_dir.staging) == []  # the local copy is removed on the way out
    m2, step2, data2, ckpt2 = _state(seed=3)
    c2 = _staged(ModelDir(mem_dir.url), ckpt2)
    assert c2.restore_latest().endswith("/ckpt-1") and _equal(_values(m2, step2, data2), first)
    c2.save(3)
    assert not any(n.startswith("ckpt-2") for n in mem_dir.listdir("ckpt"))
    assert c2.committed() == ["ckpt-1", "ckpt-3"]


def test_a_torn_save_with_another_shard_count_does_not_mix_into_a_later_one(mem_dir):
    m, step, data, ckpt = _state()
    c = _staged(mem_dir, ckpt)
    c.save(1)
    # a chief killed while saving ckpt-2 with three PS: two data files up, nothing committed
    for i in range(2):
        mem_dir.write_bytes(f"ckpt/ckpt-2.data-0000{i}-of-00003", b"torn")
    _bump(m, step, data, "two")
    saved = _values(m, step, data)
    c2 = _staged(type(mem_dir)(mem_dir.url), ckpt)
    assert c2.save(2).endswith("/ckpt-2")
    assert sorted(n for n in mem_dir.listdir("ckpt") if n.startswith("ckpt-2")) == [
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
    ]
    _bump(m, step, data, "three")
    assert c2.restore_latest().endswith("/ckpt-2") and _equal(_values(m, step, data), saved)


@pytest.mark.parametrize("kind", ["staged", "native"])
def test_damaged_latest_falls_back_to_the_one_before(kind, mem_dir, tmp_path, caplog):
    from kubeai_train.tf.coordinator.checkpoints import NativeObjectCheckpoints
    from kubeai_train.tf.model_dir import ModelDir
    from kubeai_train.tf.types import TrainError

    m, step, data, ckpt = _state()
    if kind == "staged":
        d, c = mem_dir, _staged(mem_dir, ckpt)
    else:
        d = ModelDir(str(tmp_path / "m"))
        c = NativeObjectCheckpoints(d, ckpt)
    _bump(m, step, data, "one")
    first = _values(m, step, data)
    c.save(1)
    _bump(m, step, data, "two")
    c.save(2)
    raw = bytearray(d.read_bytes("ckpt/ckpt-2.data-00000-of-00001"))
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the newest checkpoint
    d.write_bytes("ckpt/ckpt-2.data-00000-of-00001", bytes(raw))
    _bump(m, step, data, "three")
    with caplog.at_level(logging.WARNING, logger="kubeai_train.tf"):
        assert c.restore_latest().endswith("/ckpt/ckpt-1")
    assert "ckpt/ckpt-2 does not restore (DataLossError" in caplog.text
    assert _equal(_values(m, step, data), first)
    # a missing file is damage too; nothing restores: one error naming every checkpoint
    d.remove("ckpt/ckpt-1.index")
    with pytest.raises(TrainError, match=r"no checkpoint in .*ckpt restores: ckpt-2 .*; ckpt-1 \(") as e:
        c.restore_latest()
    assert "\n" not in str(e.value)


def test_a_checkpoint_of_another_model_is_an_error_not_damage(mem_dir, caplog):
    import tensorflow as tf

    from kubeai_train.tf.types import TrainError

    m, step, data, ckpt = _state()
    _staged(mem_dir, ckpt).save(1)
    other = tf.Module()
    other.v = tf.Variable(np.zeros(3, np.float32))
    with caplog.at_level(logging.WARNING, logger="kubeai_train.tf"):
        with pytest.raises(TrainError, match=r"ckpt/ckpt-1 does not hold this model .*new model_dir"):
            _staged(mem_dir, tf.train.Checkpoint(model=other)).restore_latest()
    assert "does not restore" not in caplog.text  # no fallback through older checkpoints


def test_a_lost_cluster_is_not_damage(mem_dir):
    m, step, data, ckpt = _state()
    c = _staged(mem_dir, ckpt, is_lost=lambda e: True)
    c.save(1)
    c.save(2)
    mem_dir.remove("ckpt/ckpt-2.index")
    with pytest.raises(FileNotFoundError):  # propagates at once (the job restarts), no fallback
        c.restore_latest()


def test_without_a_checkpoint_object_only_copies(mem_dir):
    from kubeai_train.tf.types import TrainError

    m, step, data, ckpt = _state()
    _staged(mem_dir, ckpt).save(1)
    reader = _staged(mem_dir, None)
    assert reader.committed() == ["ckpt-1"]
    local = reader.local_copy(f"{mem_dir.url}/ckpt/ckpt-1")
    assert os.path.exists(local + ".index")
    with pytest.raises(TrainError, match="without a tf.train.Checkpoint"):
        reader.save(2)


# ----------------------------------------------------------------------------- on OSS
_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from tests.tf.coordinator.test_checkpoints import _bump, _state
    from kubeai_train.tf.coordinator.checkpoints import StagedObjectCheckpoints
    from kubeai_train.tf.model_dir import ModelDir

    m, step, data, ckpt = _state()
    c = StagedObjectCheckpoints(ModelDir(sys.argv[1]), ckpt)
    _bump(m, step, data, "committed")
    c.save(1)
    _bump(m, step, data, "torn")
    real_write = ModelDir.write_bytes

    def write_bytes(self, rel, raw):
        if rel.endswith("/checkpoint"):
            os.kill(os.getpid(), signal.SIGKILL)  # data and index are up; the commit never happens
        real_write(self, rel, raw)

    ModelDir.write_bytes = write_bytes
    c.save(2)
    """
)


def test_chief_killed_mid_save_on_oss_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from kubeai_train.testing.oss_server import OSSServer
    from kubeai_train.tf.model_dir import ModelDir

    with OSSServer(tmp_path / "oss", buckets=["ckpt"]) as server:
        env = server.env()
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        url = "oss://ckpt/jobs/a"
        proc = subprocess.run(
            [sys.executable, "-c", _KILLED_SAVE, url, str(ROOT)],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == -9, proc.stderr[-2000:]
        on_disk = sorted(os.listdir(os.path.join(server.root, "ckpt", "jobs", "a", "ckpt")))
        assert on_disk == [
            "checkpoint",
            "ckpt-1.data-00000-of-00001",
            "ckpt-1.index",
            "ckpt-2.data-00000-of-00001",
            "ckpt-2.index",
        ]
        # the restarted chief: the committed checkpoint is the latest; its first save sweeps
        d = ModelDir(url)
        m, step, data, ckpt = _state(seed=5)
        c = _staged(d, ckpt)
        assert c.restore_latest() == f"{url}/ckpt/ckpt-1"
        assert data.numpy() == b"committed" and int(step.numpy()) == 1
        expect = _state()
        _bump(*expect[:3], "committed")
        assert _equal(_values(m, step, data), _values(*expect[:3]))
        c.save(3)
        assert d.listdir("ckpt") == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index",
                                     "ckpt-3.data-00000-of-00001", "ckpt-3.index"]  # fmt: skip
        assert env["OSS_ACCESS_KEY_SECRET"] not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- on a cluster
def _cluster_job() -> int:
    """chief: checks where a staged save writes under ParameterServerStrategy; ps / worker: serve.

    ``ram://`` is TensorFlow's in-memory file system: each process has its own. A file the chief
    lists under ``ram://`` was written by the chief's own process, never by a PS.
    """
    import resource

    import tensorflow as tf

    from kubeai_train import cluster
    from kubeai_train.tf.coordinator.checkpoints import StagedObjectCheckpoints, chief_io_device
    from kubeai_train.tf.coordinator.trainer import DONE_MARKER, _serve
    from kubeai_train.tf.coordinator.types import CoordinatorOptions
    from kubeai_train.tf.model_dir import ModelDir

    out = ModelDir(sys.argv[1])
    info = cluster.current()
    if info.role in ("ps", "worker"):
        _serve(info, out, CoordinatorOptions(done_poll=0.2))
        return 0
    os.environ["GRPC_FAIL_FAST"] = "use_caller"
    strategy = tf.distribute.ParameterServerStrategy(tf.distribute.cluster_resolver.TFConfigClusterResolver())
    n = 8 << 20  # 32 MiB of float32 per PS
    with strategy.scope():
        big = [tf.Variable(tf.fill([n], float(i + 1)), name=f"big{i}") for i in range(2)]
    local = tf.Variable("chief-only", name="data_state")  # outside the scope: on the chief
    ckpt = tf.train.Checkpoint(big0=big[0], big1=big[1], data=local)
    report: dict = {"devices": [v.device for v in big]}
    c = StagedObjectCheckpoints(ModelDir("memory://verify/job"), ckpt, io_device=chief_io_device())

    def rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # the whole path first (its peak memory is measured): save into the chief's staging on disk,
    # upload, commit; restore downloads
    before = rss_mib()
    report["saved"] = c.save(5)
    report["peak_growth_mib"] = rss_mib() - before
    report["files"] = c.dir.listdir("ckpt")
    for v in big:
        v.assign(tf.zeros([n]))
    report["restored_latest"] = c.restore_latest()
    report["restored_again"] = [float(v[-1].numpy()) for v in big]
    report["written"] = c.write_local("ram://chief/ckpt-1")
    report["chief_ram"] = sorted(tf.io.gfile.listdir("ram://chief"))
    # control: TensorFlow's default placement writes each PS's shard from that PS
    try:
        ckpt.write("ram://ctl/ckpt-1")
        report["control_error"] = None
    except tf.errors.OpError as e:
        report["control_error"] = type(e).__name__
    report["control_chief_ram"] = sorted(
        str(p) for p in tf.io.gfile.glob("ram://ctl/*") + tf.io.gfile.glob("ram://ctl/*/*")
    )
    # restore reads on the chief too: the files exist in no PS process
    for v in big:
        v.assign(tf.zeros([n]))
    ckpt.restore("ram://chief/ckpt-1", options=c.options).assert_consumed()
    report["restored"] = [float(v[0].numpy()) for v in big] + [float(big[1][n - 1].numpy())]
    out.write_json("report.json", report)
    out.write_json(DONE_MARKER, {})
    return 0


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_staged_save_under_ps_strategy_does_all_io_on_the_chief(tmp_path):
    run_cluster(Path(__file__), [str(tmp_path)], workers=1, timeout=150, log_dir=tmp_path / "logs")
    report = json.loads((tmp_path / "report.json").read_text())
    assert [d.split("/device")[0] for d in report["devices"]] == [
        "/job:ps/replica:0/task:0",
        "/job:ps/replica:0/task:1",
    ]
    # one data file per task holding variables (ps 0, ps 1, the chief), all in the chief's process
    want = ["ckpt-1.data-00000-of-00003", "ckpt-1.data-00001-of-00003", "ckpt-1.data-00002-of-00003",
            "ckpt-1.index"]  # fmt: skip
    assert report["written"] == want and report["chief_ram"] == want
    # without the option the PS write their own shards: the chief has at most its own part
    assert report["control_error"] is not None  # the merge does not find the PS's parts
    assert [p.rsplit("/", 1)[1] for p in report["control_chief_ram"] if "." in p] == [
        "part-00002-of-00003.data-00000-of-00001",
        "part-00002-of-00003.index",
    ]
    assert report["restored"] == [1.0, 2.0, 2.0]
    assert report["saved"] == "memory://verify/job/ckpt/ckpt-5"
    assert report["files"] == ["checkpoint", *(w.replace("ckpt-1", "ckpt-5") for w in want)]
    assert report["restored_latest"] == report["saved"] and report["restored_again"] == [1.0, 2.0]
    # (report["peak_growth_mib"]: how much the chief's peak RSS grew in the save of 2 x 32 MiB held
    # on the PS; a lower bound, noisy, so reported by the job, not asserted)


if __name__ == "__main__":
    exit_now(_cluster_job())
