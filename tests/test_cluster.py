import json

import pytest

from kubeai_train import cluster
from kubeai_train.cluster import ClusterError, from_env

OPERATOR_WORKER_1 = (
    '{"cluster":{"chief":["ctr-chief-0.ml.svc:2222"],"ps":["ctr-ps-0.ml.svc:2222","ctr-ps-1.ml.svc:2222"],'
    '"worker":["ctr-worker-0.ml.svc:2222","ctr-worker-1.ml.svc:2222"]},"task":{"type":"worker","index":1},'
    '"environment":"cloud"}'
)


def test_nothing_is_one_local_process():
    info = from_env({})
    assert (info.framework, info.role, info.rank, info.world_size) == ("local", "local", 0, 1)
    assert info.is_chief and info.is_trainer and not info.is_distributed


def test_operator_tf_config_worker():
    info = from_env({"TF_CONFIG": OPERATOR_WORKER_1})
    assert (info.framework, info.role, info.index) == ("tf", "worker", 1)
    assert (info.rank, info.world_size) == (2, 3)
    assert info.address == "ctr-worker-1.ml.svc:2222"
    assert info.cluster_spec()["ps"] == ["ctr-ps-0.ml.svc:2222", "ctr-ps-1.ml.svc:2222"]
    assert not info.is_chief and info.is_trainer and info.is_distributed


def test_tf_chief_ps_evaluator_and_no_chief():
    cfg = json.loads(OPERATOR_WORKER_1)
    cfg["task"] = {"type": "chief", "index": 0}
    chief = from_env({"TF_CONFIG": json.dumps(cfg)})
    assert chief.is_chief and chief.rank == 0
    cfg["task"] = {"type": "ps", "index": 1}
    ps = from_env({"TF_CONFIG": json.dumps(cfg)})
    assert not ps.is_trainer and ps.address == "ctr-ps-1.ml.svc:2222"
    del cfg["cluster"]["chief"]
    cfg["task"] = {"type": "worker", "index": 0}
    w0 = from_env({"TF_CONFIG": json.dumps(cfg)})
    assert w0.is_chief and (w0.rank, w0.world_size) == (0, 2)


def test_dynamic_worker_sparse_shape():
    raw = (
        '{"cluster":{"worker":{"3":"w3:2222"},"ps":["p0:2222","p1:2222"]},"task":{"type":"worker","index":3}}'
    )
    info = from_env({"TF_CONFIG": raw})
    assert info.sparse and info.address == "w3:2222" and info.rank == 3


@pytest.mark.parametrize(
    "raw, needle",
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ("[]", "JSON object"),
        ('{"task":{"type":"worker","index":0}}', "'cluster'"),
        ('{"cluster":{"worker":["a:1"]}}', "'task'"),
        ('{"cluster":{"worker":["a:1"]},"task":{"type":"boss","index":0}}', "'boss'"),
        ('{"cluster":{"worker":["a:1"]},"task":{"type":"worker","index":1}}', "out of range"),
        ('{"cluster":{"worker":["a:1"]},"task":{"type":"worker","index":-1}}', "index"),
        ('{"cluster":{"worker":"a:1"},"task":{"type":"worker","index":0}}', "cluster.worker"),
        ('{"cluster":{"chief":["a:1","b:1"]},"task":{"type":"chief","index":0}}', "more than one chief"),
    ],
)
def test_bad_tf_config_names_the_variable(raw, needle):
    with pytest.raises(ClusterError, match="TF_CONFIG") as e:
        from_env({"TF_CONFIG": raw})
    assert needle in str(e.value)


def test_pytorchjob_variables():
    env = {
        "MASTER_ADDR": "job-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "3",
        "RANK": "2",
        "PET_NODE_RANK": "2",
        "PET_NNODES": "3",
        "PYTHONUNBUFFERED": "1",
    }
    info = from_env(env)
    assert (info.framework, info.role, info.index, info.rank, info.world_size) == ("torch", "worker", 1, 2, 3)
    assert (info.master_addr, info.master_port, info.num_nodes) == ("job-master-0", 23456, 3)


def test_torchrun_variables():
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": "4",
        "RANK": "3",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "PET_NODE_RANK": "1",
    }
    info = from_env(env)
    assert (info.rank, info.local_rank, info.node_rank, info.num_nodes) == (3, 1, 1, 2)
    assert info.role == "worker" and not info.is_chief


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"MASTER_ADDR": "m", "MASTER_PORT": "1", "RANK": "0"}, "WORLD_SIZE"),
        (
            {"MASTER_ADDR": "m", "MASTER_PORT": "1", "RANK": "2", "WORLD_SIZE": "2"},
            "RANK must be < WORLD_SIZE",
        ),
        (
            {"MASTER_ADDR": "m", "MASTER_PORT": "x", "RANK": "0", "WORLD_SIZE": "1"},
            "MASTER_PORT must be an integer",
        ),
        ({"RANK": "0", "WORLD_SIZE": "1"}, "MASTER_ADDR and MASTER_PORT"),
        ({"MASTER_ADDR": "m", "MASTER_PORT": "1", "RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
    ],
)
def test_inconsistent_torch_variables(env, needle):
    with pytest.raises(ClusterError) as e:
        from_env(env)
    assert needle in str(e.value)


def test_current_reads_os_environ(clean_cluster_env):
    clean_cluster_env.setenv("TF_CONFIG", OPERATOR_WORKER_1)
    assert cluster.current().rank == 2


def test_errors_pickle():
    import pickle

    err = ClusterError("TF_CONFIG bad")
    assert str(pickle.loads(pickle.dumps(err))) == "TF_CONFIG bad"


def _tf_env(role: str, index: int, ps: tuple[str, ...] = ("p0:1", "p1:1")) -> dict[str, str]:
    spec = {"chief": ["c:1"], "ps": list(ps), "worker": ["w0:1", "w1:1"]}
    return {"TF_CONFIG": json.dumps({"cluster": spec, "task": {"type": role, "index": index}})}


def test_job_id_is_the_same_in_every_process_of_a_job_and_differs_between_jobs():
    roles = [("chief", 0), ("ps", 0), ("ps", 1), ("worker", 0), ("worker", 1)]
    ids = {cluster.job_id(_tf_env(r, i)) for r, i in roles}
    assert len(ids) == 1 and len(ids.pop()) == 12
    assert cluster.job_id(_tf_env("chief", 0)) != cluster.job_id(_tf_env("chief", 0, ps=("p0:2", "p1:1")))
    # the operator's sparse shape: a worker that sees only the PS and itself agrees with the chief
    sparse = '{"cluster":{"worker":{"1":"w1:1"},"ps":["p0:1","p1:1"]},"task":{"type":"worker","index":1}}'
    assert cluster.job_id({"TF_CONFIG": sparse}) == cluster.job_id(_tf_env("chief", 0))
    torch = {"MASTER_ADDR": "m", "MASTER_PORT": "29500", "WORLD_SIZE": "2"}
    t0, t1 = cluster.job_id({**torch, "RANK": "0"}), cluster.job_id({**torch, "RANK": "1"})
    assert t0 == t1 and t0 != cluster.job_id({**torch, "RANK": "0", "MASTER_PORT": "29501"})
    assert cluster.job_id({}) is None


def test_default_job_dir_is_shared_by_a_job_new_without_a_cluster_and_printed_by_the_chief(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(cluster.tempfile, "tempdir", None)  # re-read TMPDIR
    chief = cluster.default_job_dir("ctr", _tf_env("chief", 0))
    assert capsys.readouterr().err.count(chief) == 2  # one line: the path and how to resume it
    assert cluster.default_job_dir("ctr", _tf_env("ps", 1)) == chief  # a restarted replica too
    assert capsys.readouterr().err == ""  # only the chief prints
    assert chief == str(tmp_path / "kubeai_train" / f"ctr-{cluster.job_id(_tf_env('chief', 0))}")
    assert (tmp_path / "kubeai_train").is_dir() and (tmp_path / chief).is_dir()
    a, b = cluster.default_job_dir("ctr", {}), cluster.default_job_dir("ctr", {})
    assert a != b and all(p.startswith(str(tmp_path / "kubeai_train" / "ctr-")) for p in (a, b))
    with pytest.raises(ClusterError, match="'a/b'"):
        cluster.default_job_dir("a/b", {})
