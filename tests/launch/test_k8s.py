"""TFJob / PyTorchJob rendering: strict CRD validation, webhook rules, determinism, secrets,
and submission through the real kubernetes client to a local HTTP server."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeai_train.launch import cpus, k8s
from kubeai_train.launch.__main__ import main
from kubeai_train.launch.types import Elastic, JobSpec, ManifestError, Scheduling, SubmitError
from kubeai_train.testing.kube_api import KubeApiServer

ROOT = Path(__file__).resolve().parents[2]


def tf(**kw):
    kw.setdefault("script", "train.py")
    kw.setdefault("image", "reg/img:1")
    return JobSpec.from_counts("tf", name=kw.pop("name", "ctr"), **kw)


def torch(**kw):
    kw.setdefault("script", "train.py")
    kw.setdefault("image", "reg/img:1")
    return JobSpec.from_counts("torch", name=kw.pop("name", "ddp"), **kw)


def test_tfjob_shape():
    m = k8s.render(tf(workers=2, ps=2, evaluator=True, namespace="ml"))
    assert m["apiVersion"] == "kubeflow.org/v1" and m["kind"] == "TFJob"
    specs = m["spec"]["tfReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Chief": 1, "Worker": 2, "PS": 2, "Evaluator": 1}
    c = specs["PS"]["template"]["spec"]["containers"][0]
    assert c["name"] == "tensorflow" and c["ports"] == [{"containerPort": 2222, "name": "tfjob-port"}]
    assert c["command"] == ["python", "-u", "train.py"]
    assert m["spec"]["runPolicy"] == {"backoffLimit": 3, "cleanPodPolicy": "Running"}
    assert specs["Worker"]["restartPolicy"] == "Never"


def test_pytorchjob_shape():
    m = k8s.render(torch(workers=3, nproc_per_node=4, args=["--lr", "0.1"]))
    specs = m["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Master": 1, "Worker": 2}
    c = specs["Master"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["ports"] == [{"containerPort": 23456, "name": "pytorchjob-port"}]
    assert c["command"] == ["torchrun", "train.py", "--lr", "0.1"]
    assert m["spec"]["nprocPerNode"] == "4"
    assert "cleanPodPolicy" not in m["spec"]["runPolicy"]


def test_gang_scheduling():
    m = k8s.render(
        tf(workers=2, ps=1, scheduling=Scheduling(queue="q", priority_class="high", gang="volcano"))
    )
    assert m["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 4,
        "priorityClass": "high",
        "queue": "q",
    }
    pod = m["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["schedulerName"] == "volcano" and pod["priorityClassName"] == "high"
    m = k8s.render(torch(workers=2, scheduling=Scheduling(queue="team-a", gang="kueue")))
    assert m["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}
    assert "schedulingPolicy" not in m["spec"]["runPolicy"]


def test_credentials_only_as_secret_references():
    spec = torch(secret_env={"OSS_ACCESS_KEY_SECRET": "oss-cred/secret"}, env_from_secrets=["odps-cred"])
    m = k8s.render(spec)
    c = m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["env"] == [
        {
            "name": "OSS_ACCESS_KEY_SECRET",
            "valueFrom": {"secretKeyRef": {"key": "secret", "name": "oss-cred"}},
        }
    ]
    assert c["envFrom"] == [{"secretRef": {"name": "odps-cred"}}]
    with pytest.raises(ManifestError) as ei:
        k8s.render(torch(env={"OSS_ACCESS_KEY_SECRET": "hunter2"}))
    assert "hunter2" not in str(ei.value) and "secret_env" in str(ei.value)


def test_same_spec_same_bytes():
    def build():
        return tf(
            workers=2,
            ps=1,
            env={"B": "2", "A": "1"},
            volumes=["data:/data:ro"],
            node_selector={"pool": "cpu"},
        )

    assert k8s.to_yaml(k8s.render(build())) == k8s.to_yaml(k8s.render(build()))
    text = k8s.to_yaml(k8s.render(build()))
    assert yaml.safe_load(text) == k8s.render(build())


def test_strict_mode_rejects_typos_naming_the_field_and_the_near_miss():
    m = k8s.render(tf(workers=1, ps=1))
    for path, key, near in [
        (("spec", "runPolicy"), "cleanPodPolicyy", "cleanPodPolicy"),
        (("spec", "tfReplicaSpecs", "Worker"), "replica", "replicas"),
        (("spec", "tfReplicaSpecs", "Worker", "template", "spec"), "nodeSelecter", "nodeSelector"),
        (("spec", "tfReplicaSpecs", "PS", "template", "spec", "containers", 0), "imagePullPolicyy", "imagePullPolicy"),
        (("spec",), "successPolicyy", "successPolicy"),
    ]:  # fmt: skip
        bad = copy.deepcopy(m)
        node = bad
        for p in path:
            node = node[p]
        node[key] = "x"
        where = ".".join(str(p) for p in path).replace(".0", "[0]")
        with pytest.raises(ManifestError) as ei:
            k8s.validate(bad)
        assert f"{where}: unknown field(s) {key} (did you mean {near}?)" in str(ei.value)
        assert str(ei.value).count("\n") == 0


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (
            lambda m: m["spec"]["tfReplicaSpecs"]["Worker"].update(replicas="2"),
            "spec.tfReplicaSpecs.Worker.replicas: must be an integer, got a string '2'",
        ),
        (
            lambda m: m["spec"]["tfReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes"),
            "spec.tfReplicaSpecs.Worker.restartPolicy: 'Sometimes' is not one of",
        ),
        (
            lambda m: m["spec"]["tfReplicaSpecs"]["PS"]["template"]["spec"]["containers"][0].pop("name"),
            "spec.tfReplicaSpecs.PS.template.spec.containers[0].name: required field missing",
        ),
        (
            lambda m: m["spec"]["tfReplicaSpecs"]["PS"]["template"]["spec"].update(containers={"a": 1}),
            "spec.tfReplicaSpecs.PS.template.spec.containers: must be a list, got an object",
        ),
        (
            lambda m: m["spec"]["tfReplicaSpecs"]["PS"]["template"]["spec"]["containers"][0]["ports"][
                0
            ].update(containerPort="2222"),
            "containers[0].ports[0].containerPort: must be an integer",
        ),
        (lambda m: m["spec"].pop("runPolicy"), "spec.runPolicy: required field missing"),
        (lambda m: m.update(apiVersion="kubeflow.org/v2"), "apiVersion: must be kubeflow.org/v1"),
        (
            lambda m: m["spec"].update(enableDynamicWorker="yes"),
            "spec.enableDynamicWorker: must be true or false",
        ),
    ],
)
def test_strict_mode_types_and_required_fields(mutate, needle):
    m = k8s.render(tf(workers=2, ps=1))
    mutate(m)
    with pytest.raises(ManifestError) as ei:
        k8s.validate(m)
    assert needle in str(ei.value)


def test_quantities_may_be_numbers_and_free_form_fields_anything():
    m = k8s.render(tf(workers=1, resources={"requests": {"cpu": "2"}}))
    c = m["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    c["resources"] = {"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"cpu": 2.5}}
    c["livenessProbe"] = {"tcpSocket": {"port": 2222}}  # int-or-string
    k8s.validate(m)
    c["resources"]["limits"]["cpu"] = True
    with pytest.raises(ManifestError, match="resources.limits.cpu: must be a string"):
        k8s.validate(m)


def _env(m, rtype):
    field = "tfReplicaSpecs" if m["kind"] == "TFJob" else "pytorchReplicaSpecs"
    (c,) = m["spec"][field][rtype]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_thread_variables_follow_each_roles_cpu_limit():
    limits = {"requests": {"cpu": "2"}, "limits": {"cpu": "4", "memory": "8Gi"}}
    m = k8s.render(
        tf(
            workers=2,
            ps=1,
            resources=limits,
            role_resources={"ps": {"limits": {"cpu": "500m"}}, "chief": {"requests": {"cpu": "8"}}},
            env={"LR": "0.1"},
        )
    )
    tf_vars = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
    assert _env(m, "Worker") == {"LR": "0.1", **dict.fromkeys(tf_vars, "4")}
    assert _env(m, "PS") == {"LR": "0.1", **dict.fromkeys(tf_vars, "1")}  # 500m rounds up
    assert _env(m, "Chief") == {"LR": "0.1"}  # a request is no limit: nothing to size from
    assert list(_env(m, "Worker")) == sorted(_env(m, "Worker"))  # one sorted list, deterministic

    # torch: its variables only, the limit shared by the pod's torchrun processes
    m = k8s.render(torch(workers=2, nproc_per_node=2, resources={"limits": {"cpu": "2500m"}}))
    assert _env(m, "Master") == _env(m, "Worker") == {"MKL_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    m = k8s.render(torch(workers=2, resources={"limits": {"cpu": "1.5"}}))
    assert _env(m, "Worker") == {"MKL_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    assert (
        "env"
        not in k8s.render(torch(workers=2))["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"][
            "containers"
        ][0]
    )


def test_the_jobs_own_thread_variables_win_in_manifests():
    m = k8s.render(
        tf(
            workers=1,
            resources={"limits": {"cpu": "8"}},
            env={"TF_NUM_INTEROP_THREADS": "2"},
            secret_env={"TF_NUM_INTRAOP_THREADS": "tuning/intra"},
        )
    )
    env = _env(m, "Worker")
    assert env["TF_NUM_INTEROP_THREADS"] == "2" and env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "8"
    assert env["TF_NUM_INTRAOP_THREADS"] == {"secretKeyRef": {"key": "intra", "name": "tuning"}}
    m = k8s.render(torch(workers=2, resources={"limits": {"cpu": "8"}}, env={"OMP_NUM_THREADS": "3"}))
    # MKL_NUM_THREADS follows the given OMP_NUM_THREADS (torch would read ours first)
    assert _env(m, "Master") == {"OMP_NUM_THREADS": "3"}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda m: m["metadata"].update(name="Ctr_1"), "metadata.name: 'Ctr_1' is not a DNS-1035 label"),
        (
            lambda m: m["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].update(
                name="tf"
            ),
            "must have at least one container with name tensorflow",
        ),
        (
            lambda m: m["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].pop("image"),
            "containers[0].image: must be required",
        ),
        (
            lambda m: m["spec"]["tfReplicaSpecs"].update(
                Master=copy.deepcopy(m["spec"]["tfReplicaSpecs"]["Chief"])
            ),
            "must not have more than 1 Chief or Master",
        ),
        (
            lambda m: m["spec"]["tfReplicaSpecs"].update(
                Workr=copy.deepcopy(m["spec"]["tfReplicaSpecs"]["Worker"])
            ),
            "unknown replica type 'Workr'",
        ),
        (lambda m: m["spec"]["runPolicy"].update(managedBy="me"), "managedBy: 'me' is not supported"),
    ],
)
def test_tf_webhook_rules(mutate, needle):
    m = k8s.render(tf(workers=2, ps=1))
    mutate(m)
    with pytest.raises(ManifestError) as ei:
        k8s.validate(m)
    assert needle in str(ei.value)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (
            lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
            "Master.replicas: must be 1",
        ),
        (
            lambda m: m["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=0),
            "Worker.replicas: must be at least 1",
        ),
        (
            lambda m: m["spec"]["pytorchReplicaSpecs"].update(
                PS=copy.deepcopy(m["spec"]["pytorchReplicaSpecs"]["Worker"])
            ),
            "unknown replica type 'PS'",
        ),
        (
            lambda m: (
                m["spec"]["pytorchReplicaSpecs"].pop("Worker"),
                m["spec"].update(elasticPolicy={"maxReplicas": 2}),
            ),
            "must be configured if elastic policy is used",
        ),
        (
            lambda m: m["spec"].update(elasticPolicy={"nProcPerNode": 2}),
            "nProcPerNode: must not be used with spec.nprocPerNode",
        ),
    ],
)
def test_pytorch_webhook_rules(mutate, needle):
    m = k8s.render(torch(workers=2))
    mutate(m)
    with pytest.raises(ManifestError) as ei:
        k8s.validate(m)
    assert needle in str(ei.value)


# -- property sweep ---------------------------------------------------------------------------

names = st.from_regex(r"\A[a-z]([-a-z0-9]{0,20}[a-z0-9])?\Z")
env_names = st.from_regex(r"\A[A-Z][A-Z0-9_]{0,10}\Z").filter(
    lambda n: (
        not k8s.CREDENTIAL_ENV.search(n)
        and n not in ("RANK", "WORLD_SIZE", "TF_CONFIG", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME")
        and not n.startswith(("PET_", "TORCHELASTIC_", "MASTER_"))
    )
)
quantities = st.sampled_from(["1", "500m", "2", "4Gi", "512Mi", "1.5"])
resources = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"requests": st.fixed_dictionaries({"cpu": quantities, "memory": quantities})}),
    st.fixed_dictionaries(
        {
            "requests": st.fixed_dictionaries({"cpu": quantities}),
            "limits": st.fixed_dictionaries({"memory": quantities}),
        }
    ),
    st.fixed_dictionaries({"limits": st.fixed_dictionaries({"cpu": quantities})}),
)
tolerations = st.lists(
    st.fixed_dictionaries(
        {"key": names, "operator": st.sampled_from(["Equal", "Exists"])},
        optional={
            "effect": st.sampled_from(["NoSchedule", "NoExecute"]),
            "tolerationSeconds": st.integers(0, 3600),
        },
    ),
    max_size=2,
)


@st.composite
def specs(draw):
    framework = draw(st.sampled_from(["tf", "torch"]))
    common = {
        "name": draw(names),
        "namespace": draw(names),
        "script": draw(st.sampled_from(["train.py", "examples/tf_ps_ctr.py", "a b/c.py"])),
        "args": draw(st.lists(st.text(min_size=0, max_size=8), max_size=3)),
        "image": draw(
            st.sampled_from(["reg/img:1", "registry.example.com:5000/team/img@sha256:" + "a" * 64])
        ),
        "env": draw(st.dictionaries(env_names, st.text(max_size=10), max_size=3)),
        "secret_env": draw(
            st.dictionaries(
                env_names.map(lambda n: "S_" + n),
                st.builds(lambda a, b: f"{a}/{b}", names, names),
                max_size=2,
            )
        ),
        "resources": draw(resources),
        "volumes": draw(
            st.lists(
                st.builds(lambda c, p, ro: f"{c}:/{p}{':ro' if ro else ''}", names, names, st.booleans()),
                max_size=2,
                unique_by=lambda v: v.split(":")[0],
            )
        ),
        "node_selector": draw(st.dictionaries(names, names, max_size=2)),
        "tolerations": draw(tolerations),
        "restart_policy": draw(st.sampled_from(["Never", "OnFailure", "ExitCode", "Always"])),
        "backoff_limit": draw(st.integers(0, 10)),
        "ttl_seconds_after_finished": draw(st.none() | st.integers(0, 10**6)),
        "active_deadline_seconds": draw(st.none() | st.integers(1, 10**6)),
        "clean_pod_policy": draw(st.none() | st.sampled_from(["None", "Running", "All"])),
        "port": draw(st.none() | st.integers(1024, 65535)),
    }
    common["env"] = {k: v for k, v in common["env"].items() if k not in common["secret_env"]}
    gang = draw(st.sampled_from([None, "volcano", "kueue"]))
    if framework == "tf":
        chief = draw(st.booleans())
        ps = draw(st.integers(0, 3))
        workers = draw(st.integers(0 if chief else 1, 4))
        kw = {"workers": workers, "ps": ps, "chief": chief, "evaluator": draw(st.booleans())}
        if ps and draw(st.booleans()):
            kw["enable_dynamic_worker"] = True
        if not chief and draw(st.booleans()):
            kw["success_policy"] = "AllWorkers"
        total = int(chief) + ps + workers + int(kw["evaluator"])
    else:
        workers = draw(st.integers(1, 5))
        kw = {"workers": workers, "nproc_per_node": draw(st.integers(1, 4))}
        if workers > 1 and draw(st.booleans()):
            lo = draw(st.integers(1, workers - 1))
            kw["elastic"] = Elastic(
                min_replicas=lo,
                max_replicas=draw(st.integers(lo, 8)),
                max_restarts=draw(st.none() | st.integers(0, 5)),
            )
        total = workers
    sched = Scheduling(
        queue=draw(names) if gang else None,
        priority_class=draw(st.none() | names),
        gang=gang,
        min_available=draw(st.none() | st.integers(1, total)) if gang == "volcano" else None,
    )
    return JobSpec.from_counts(framework, scheduling=sched, **common, **kw)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs())
def test_sweep_every_spec_renders_a_strictly_valid_manifest(spec):
    m = k8s.render(spec)  # validates: strict CRD schema + webhook rules
    k8s.validate(m)
    kind = "TFJob" if spec.framework == "tf" else "PyTorchJob"
    replica_specs = m["spec"][k8s.REPLICA_FIELD[kind]]
    assert sum(r["replicas"] for r in replica_specs.values()) == spec.total_replicas
    for r in replica_specs.values():
        (c,) = r["template"]["spec"]["containers"]
        assert c["name"] == k8s.CONTAINER[kind] and c["image"] == spec.image
        assert c["ports"][0] == {"containerPort": spec.container_port, "name": k8s.PORT_NAME[kind]}
        assert r["restartPolicy"] == spec.restart_policy
        for e in c.get("env", []):
            assert ("value" in e) != ("valueFrom" in e)
            if e["name"] in spec.secret_env:
                assert "value" not in e
        env = {e["name"]: e.get("value") for e in c.get("env", []) if e["name"] not in spec.secret_env}
        limit = (spec.resources.get("limits") or {}).get("cpu")
        omp = spec.env.get("OMP_NUM_THREADS")
        if omp is None and "OMP_NUM_THREADS" not in spec.secret_env and limit is not None:
            omp = str(max(1, math.ceil(cpus.cpu_cores(limit) / spec.nproc_per_node)))
        assert env.get("OMP_NUM_THREADS") == omp
        assert {k for k in env if k not in spec.env} <= set(cpus.THREAD_VARS[spec.framework])
    if spec.replicas.get("ps") and spec.clean_pod_policy is None:
        assert m["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    text = k8s.to_yaml(m)
    assert text == k8s.to_yaml(k8s.render(spec)) and yaml.safe_load(text) == m


@settings(max_examples=40, deadline=None)
@given(spec=specs(), data=st.data())
def test_sweep_an_unknown_field_anywhere_typed_is_rejected(spec, data):
    m = k8s.render(spec)
    # every dict in the manifest whose schema lists properties (all but maps of names)
    spots = []

    def walk(node, path):
        if isinstance(node, dict):
            if path and path[-1] not in (
                "labels",
                "annotations",
                "nodeSelector",
                "requests",
                "limits",
                "tfReplicaSpecs",
                "pytorchReplicaSpecs",
                "metadata",
            ):
                spots.append(node)
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for v in node:
                walk(v, path)

    walk(m["spec"], ("spec",))
    target = data.draw(st.sampled_from(spots))
    target["zzTypo"] = 1
    with pytest.raises(ManifestError, match="unknown field\\(s\\) zzTypo"):
        k8s.validate(m)


# -- CLI --------------------------------------------------------------------------------------


def test_dry_run_prints_the_validated_manifest(capsys, tmp_path):
    argv = [
        "--framework",
        "tf",
        "--ps",
        "1",
        "--workers",
        "2",
        "--target",
        "k8s",
        "--image",
        "reg/img:1",
        "--name",
        "ctr",
        "--dry-run",
        "train.py",
        "--epochs",
        "3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    spec = tf(workers=2, ps=1, args=["--epochs", "3"])
    assert out == k8s.to_yaml(k8s.render(spec))
    job = tmp_path / "job.yaml"
    job.write_text("framework: tf\nname: ctr\nps: 1\nworkers: 2\nscript: train.py\nimage: reg/img:1\n")
    assert main(["--job", str(job), "--target", "k8s", "--dry-run", "--epochs", "3"]) == 0
    assert capsys.readouterr().out == out


def test_k8s_without_image_is_bad_input(capsys):
    assert main(["--framework", "torch", "--workers", "2", "--target", "k8s", "--dry-run", "train.py"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image" in err


def _rendered_jobs(tmp_path, capsys):
    """Every job file in launchers/jobs rendered by --dry-run, as files."""
    out = []
    for job in sorted((ROOT / "launchers" / "jobs").glob("*.yaml")):
        assert main(["--job", str(job), "--target", "k8s", "--dry-run"]) == 0
        path = tmp_path / job.name
        path.write_text(capsys.readouterr().out)
        out.append(path)
    assert len(out) >= 2
    return out


def test_validate_accepts_every_rendered_job_file(tmp_path, capsys):
    files = _rendered_jobs(tmp_path, capsys)
    both = tmp_path / "both.yaml"
    both.write_text("\n---\n".join(p.read_text() for p in files))
    assert main(["validate", *map(str, files), str(both)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{files[0]}#0 TFJob tf-ps-ctr: valid", f"{files[1]}#0 PyTorchJob torch-ddp-ctr: valid",
                     f"{both}#0 TFJob tf-ps-ctr: valid", f"{both}#1 PyTorchJob torch-ddp-ctr: valid"]  # fmt: skip


def test_validate_refuses_replica_for_replicas_naming_the_field(tmp_path, capsys):
    (good, _) = _rendered_jobs(tmp_path, capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("    replicas: 2\n", "    replica: 2\n", 1))
    assert bad.read_text() != good.read_text()
    assert main(["validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{good}#0 TFJob tf-ps-ctr: valid"
    assert out[1:] == [
        f"{bad}#0 TFJob tf-ps-ctr: spec.tfReplicaSpecs.Worker: unknown field(s) replica (did you mean replicas?)"
    ]


@pytest.mark.integration
def test_validate_and_dry_run_are_strict_from_any_directory(tmp_path, capsys):
    import subprocess
    import sys

    (good, _) = _rendered_jobs(tmp_path, capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("restartPolicy: ExitCode", "restartPolicyy: ExitCode", 1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "kubeai_train.launch", "validate", str(bad)],
        cwd=elsewhere, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        run.returncode == 1 and "unknown field(s) restartPolicyy (did you mean restartPolicy?)" in run.stdout
    )
    run = subprocess.run(
        [sys.executable, "-m", "kubeai_train.launch", "--job", str(ROOT / "launchers/jobs/tf_ps_ctr.yaml"),
         "--target", "k8s", "--dry-run"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout == good.read_text() and run.stderr == ""


def test_validate_reports_each_document_and_bad_usage(tmp_path, capsys):
    f = tmp_path / "mixed.yaml"
    f.write_text("kind: Deployment\napiVersion: apps/v1\n---\n---\n[1, 2]\n")
    assert main(["validate", str(f)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{f}#0 Deployment: kind: must be TFJob or PyTorchJob, got 'Deployment'",
        f"{f}#2: <root>: a manifest must be an object, got a list",
    ]
    g = tmp_path / "broken.yaml"
    g.write_text("kind: TFJob\n  bad: [\n")
    assert main(["validate", str(g)]) == 1
    assert capsys.readouterr().out.startswith(f"{g}: not YAML at line")
    assert main(["validate"]) == 2
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "usage" in err[0] and "nope.yaml" in err[1]


# -- submission through the real client, to the local API server -----------------------------


def _client(api):
    from kubernetes import client

    return client.ApiClient(client.Configuration(host=api.url))


def _posts(api):
    return [r for r in api.requests if r["method"] == "POST"]


@pytest.mark.integration
def test_submit_asks_for_a_server_side_dry_run_then_creates():
    spec = tf(workers=2, ps=1, namespace="ml")
    manifest = k8s.render(spec)
    with KubeApiServer() as api:
        created = k8s.submit(manifest, api_client=_client(api))
        stored = api.objects("tfjobs")
    dry, real = _posts(api)
    assert dry["path"] == real["path"] == "/apis/kubeflow.org/v1/namespaces/ml/tfjobs"
    assert dry["query"] == {"dryRun": "All"} and real["query"] == {}
    assert dry["body"] == real["body"] == manifest
    assert created["metadata"]["uid"] and [o["metadata"]["name"] for o in stored] == ["ctr"]


@pytest.mark.integration
def test_a_dry_run_the_cluster_refuses_is_a_validation_error_and_creates_nothing():
    def cluster_crd(obj):  # this cluster's CRD caps PS replicas (the offline schema does not)
        if obj["spec"]["tfReplicaSpecs"]["PS"]["replicas"] > 1:
            yield "spec.tfReplicaSpecs.PS.replicas: Invalid value: 2: must be less than or equal to 1"

    with KubeApiServer(admit=cluster_crd) as api:
        with pytest.raises(ManifestError) as ei:
            k8s.submit(k8s.render(tf(workers=1, ps=2, namespace="ml")), api_client=_client(api))
        assert api.objects() == []
    msg = str(ei.value)
    assert "(server-side dry run): 422" in msg and "spec.tfReplicaSpecs.PS.replicas: Invalid value: 2" in msg
    assert "\n" not in msg
    (dry,) = _posts(api)
    assert dry["query"] == {"dryRun": "All"}


@pytest.mark.integration
def test_cli_submit_with_a_kubeconfig(tmp_path, capsys):
    with KubeApiServer(token="s3cr3t-token") as api:
        code = main(
            ["--framework", "torch", "--workers", "2", "--target", "k8s", "--image", "reg/img:1",
             "--name", "ddp", "--kubeconfig", str(api.kubeconfig(tmp_path / "kc")), "train.py"]
        )  # fmt: skip
        stored = api.objects("pytorchjobs")
    assert code == 0
    dry, real = _posts(api)
    assert real["path"] == "/apis/kubeflow.org/v1/namespaces/default/pytorchjobs"
    assert dry["headers"]["authorization"] == real["headers"]["authorization"] == "Bearer s3cr3t-token"
    assert real["body"] == k8s.render(torch(workers=2)) and len(stored) == 1
    assert "PyTorchJob default/ddp created" in capsys.readouterr().out


@pytest.mark.integration
def test_cli_dry_run_refusal_exits_2_with_one_line(tmp_path, capsys):
    with KubeApiServer(
        admit=lambda obj: ["spec.runPolicy.suspend: Forbidden: this cluster runs no suspended jobs"]
    ) as api:
        code = main(
            ["--framework", "tf", "--workers", "1", "--target", "k8s", "--image", "reg/img:1", "--name", "ctr",
             "--kubeconfig", str(api.kubeconfig(tmp_path / "kc")), "train.py"]
        )  # fmt: skip
        assert api.objects() == []
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Forbidden: this cluster runs no suspended jobs" in err[-1]


@pytest.mark.integration
def test_cli_submit_refused_is_one_line_without_credentials(tmp_path, capsys):
    argv = ["--framework", "tf", "--workers", "1", "--target", "k8s", "--image", "reg/img:1", "--name", "ctr"]
    with KubeApiServer(token="s3cr3t-token") as api:
        kc = str(api.kubeconfig(tmp_path / "kc"))
        assert main([*argv, "--kubeconfig", kc, "train.py"]) == 0
        capsys.readouterr()
        code = main([*argv, "--kubeconfig", kc, "train.py"])  # the same job again
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "409 Conflict" in err[-1] and "already exists" in err[-1]
    assert all("s3cr3t" not in line for line in err)


@pytest.mark.integration
def test_submit_unreachable_server(tmp_path):
    with KubeApiServer() as api:
        client = _client(api)
    with pytest.raises(SubmitError, match="cannot reach the Kubernetes API at http://127.0.0.1"):
        k8s.submit(k8s.render(tf(workers=1)), api_client=client)


@pytest.mark.integration
def test_submit_sh_validates_and_prints_or_refuses(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {
        **__import__("os").environ,
        "PYTHON": __import__("sys").executable,
    }
    res = subprocess.run(
        [str(root / "launchers" / "submit.sh"), "launchers/jobs/tf_ps_ctr.yaml", "--name", "ctr-20261129", "--dry-run", "--", "--epochs", "3"],
        cwd=root, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    m = yaml.safe_load(res.stdout)
    k8s.validate(m)
    assert m["metadata"]["name"] == "ctr-20261129" and m["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    c = m["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["command"][-2:] == ["--epochs", "3"]
    assert all("value" not in e for e in c["env"] if "ACCESS_KEY" in e["name"])
    bad = subprocess.run(
        [str(root / "launchers" / "submit.sh"), str(tmp_path / "nope.yaml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


@pytest.mark.integration
@pytest.mark.parametrize(
    ("final", "code", "needle"),
    [
        (
            [("Created", ""), ("Running", ""), ("Succeeded", "TFJob ml/ctr successfully completed.")],
            0,
            "Succeeded: TFJob ml/ctr successfully completed.",
        ),
        (
            [("Created", ""), ("Failed", "TFJob ml/ctr has failed because 1 Worker replica(s) failed.")],
            1,
            "failed: TFJob ml/ctr has failed because 1 Worker",
        ),
    ],
)
def test_cli_submit_and_wait(tmp_path, capsys, final, code, needle):
    states = [[], [final[0]], final[:2], final]
    with KubeApiServer() as api:
        api.script_conditions("tfjobs", "ml", "ctr", states)
        kc = api.kubeconfig(tmp_path / "kc")
        argv = [
            "--framework",
            "tf",
            "--workers",
            "1",
            "--ps",
            "1",
            "--target",
            "k8s",
            "--image",
            "reg/img:1",
            "--name",
            "ctr",
            "--namespace",
            "ml",
        ]
        got = main([*argv, "--kubeconfig", str(kc), "--wait", "--poll-interval", "0.01", "train.py"])
    assert got == code
    err = capsys.readouterr().err
    assert needle in err
    assert "[launch] TFJob ml/ctr: Pending" in err and "[launch] TFJob ml/ctr: Created" in err
    gets = [r for r in api.requests if r["method"] == "GET"]
    assert gets[0]["path"] == "/apis/kubeflow.org/v1/namespaces/ml/tfjobs/ctr" and len(gets) >= 3


@pytest.mark.integration
def test_cli_wait_times_out(tmp_path, capsys):
    with KubeApiServer() as api:
        api.script_conditions("tfjobs", "default", "ctr", [[("Running", "")]])
        kc = api.kubeconfig(tmp_path / "kc")
        argv = [
            "--framework",
            "tf",
            "--workers",
            "1",
            "--target",
            "k8s",
            "--image",
            "reg/img:1",
            "--name",
            "ctr",
        ]
        got = main(
            [
                *argv,
                "--kubeconfig",
                str(kc),
                "--wait",
                "--poll-interval",
                "0.05",
                "--timeout",
                "0.3",
                "train.py",
            ]
        )
    assert got == 124
    assert "still Running after 0.3s; it keeps running" in capsys.readouterr().err
