"""The operator's environment, restated: golden values from the operator's sources."""

from __future__ import annotations

import json

import pytest

from kubeai_train import cluster
from kubeai_train.launch import env
from kubeai_train.launch.types import Elastic, JobSpec

# crds/SOURCES.md: worker 1 of job ctr in namespace ml (chief + 2 ps + 2 workers)
GOLDEN = (
    '{"cluster":{"chief":["ctr-chief-0.ml.svc:2222"],"ps":["ctr-ps-0.ml.svc:2222","ctr-ps-1.ml.svc:2222"],'
    '"worker":["ctr-worker-0.ml.svc:2222","ctr-worker-1.ml.svc:2222"]},"task":{"type":"worker","index":1},'
    '"environment":"cloud"}'
)


def tf_spec(**kw):
    kw.setdefault("script", "train.py")
    return JobSpec.from_counts("tf", name="ctr", namespace="ml", **kw)


def test_tf_config_is_byte_identical_to_the_operator():
    spec = tf_spec(workers=2, ps=2)
    assert env.tf_config(spec, "worker", 1, env.k8s_endpoints(spec)) == GOLDEN


def test_tf_config_evaluator_in_cluster_and_custom_domain():
    spec = tf_spec(workers=1, ps=1, evaluator=True)
    cfg = json.loads(env.tf_config(spec, "evaluator", 0, env.k8s_endpoints(spec, "cluster.local")) or "")
    assert list(cfg["cluster"]) == ["chief", "evaluator", "ps", "worker"]  # Go sorts map keys
    assert cfg["cluster"]["evaluator"] == ["ctr-evaluator-0.ml.svc.cluster.local:2222"]


def test_no_tf_config_for_a_single_replica():
    spec = tf_spec(workers=1, chief=False)
    assert env.operator_env(spec, "worker", 0, env.k8s_endpoints(spec)) == []


def test_sparse_tf_config_shapes():
    spec = tf_spec(workers=2, ps=2, enable_dynamic_worker=True)
    ep = env.k8s_endpoints(spec)
    assert env.tf_config(spec, "worker", 1, ep) == (
        '{"cluster":{"worker":{"1":"ctr-worker-1.ml.svc:2222"},"ps":["ctr-ps-0.ml.svc:2222","ctr-ps-1.ml.svc:2222"]},'
        '"task":{"type":"worker","index":1}}'
    )
    assert env.tf_config(spec, "ps", 1, ep) == (
        '{"cluster":{"worker":{},"ps":["ctr-ps-1.ml.svc:2222"]},"task":{"type":"ps","index":1}}'
    )
    assert (
        env.tf_config(spec, "chief", 0, ep)
        == '{"cluster":{"worker":{},"ps":[]},"task":{"type":"chief","index":0}}'
    )
    info = cluster.parse_tf_config(env.tf_config(spec, "worker", 1, ep) or "")
    assert info.sparse and info.address == "ctr-worker-1.ml.svc:2222"


def test_go_json_escapes_like_go():
    assert env.go_json({"a": "<&>\u2028é"}) == '{"a":"\\u003c\\u0026\\u003e\\u2028é"}'


def test_pytorchjob_env_order_and_values():
    spec = JobSpec.from_counts("torch", workers=3, nproc_per_node=2, script="t.py", name="ddp")
    got = env.operator_env(spec, "worker", 1, env.k8s_endpoints(spec))
    assert got == [
        ("PYTHONUNBUFFERED", "1"),
        ("MASTER_PORT", "23456"),
        ("PET_MASTER_PORT", "23456"),
        ("MASTER_ADDR", "ddp-master-0"),
        ("PET_MASTER_ADDR", "ddp-master-0"),
        ("WORLD_SIZE", "6"),
        ("RANK", "2"),
        ("PET_NODE_RANK", "2"),
        ("PET_NPROC_PER_NODE", "2"),
        ("PET_NNODES", "3"),
    ]


def test_elastic_env():
    spec = JobSpec.from_counts(
        "torch",
        workers=3,
        script="t.py",
        name="el",
        elastic=Elastic(min_replicas=1, max_replicas=4, max_restarts=2, rdzv_id="r"),
    )
    got = dict(env.operator_env(spec, "master", 0, env.k8s_endpoints(spec)))
    assert got["PET_RDZV_ENDPOINT"] == "el-worker-0:23456"
    assert got["PET_RDZV_BACKEND"] == "c10d"
    assert got["PET_NNODES"] == "1:4"
    assert got["PET_MAX_RESTARTS"] == "2" and got["PET_RDZV_ID"] == "r"
    defaulted = JobSpec.from_counts("torch", workers=3, script="t.py", elastic=Elastic())
    assert dict(env.operator_env(defaulted, "master", 0, env.k8s_endpoints(defaulted)))["PET_NNODES"] == "2:2"


@pytest.mark.parametrize("nproc", [1, 3])
def test_local_plan_ranks_are_a_permutation(nproc):
    spec = JobSpec.from_counts("torch", workers=3, nproc_per_node=nproc, script="t.py")
    plans = env.local_plan(spec, env.local_endpoints(spec, [20001]))
    infos = [cluster.from_env(p.env) for p in plans]
    assert sorted(i.rank for i in infos) == list(range(3 * nproc))
    assert {i.world_size for i in infos} == {3 * nproc}
    assert all(i.local_world_size == nproc and i.num_nodes == 3 for i in infos)
    assert plans[nproc].label == ("worker:0" if nproc == 1 else "worker:0.0")
    assert plans[nproc - 1].label == ("master:0" if nproc == 1 else "master:0.2")
