"""TFJob / PyTorchJob rendering: strict CRD validation, webhook rules, determinism, secrets,
and submission through the real kubernetes client to a local HTTP server."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeai_train.launch import k8s
from kubeai_train.launch.__main__ import main
from kubeai_train.launch.types import Elastic, JobSpec, ManifestError, Scheduling, SubmitError

CRDS = Path(__file__).resolve().parents[2] / ".." / "shared" / "crds"


@pytest.fixture(autouse=True)
def _crds(monkeypatch):
    assert (CRDS / "kubeflow.org_tfjobs.yaml").is_file(), f"CRDs expected at {CRDS}"
    monkeypatch.setenv("KUBEAI_TRAIN_CRD_DIR", str(CRDS))


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


def test_strict_mode_rejects_typos_the_crd_would_prune():
    m = k8s.render(tf(workers=1, ps=1))
    loose = yaml.safe_load((CRDS / "kubeflow.org_tfjobs.yaml").read_text())
    import jsonschema

    schema = next(v for v in loose["spec"]["versions"] if v.get("storage"))["schema"]["openAPIV3Schema"]
    for path, key in [
        (("spec", "runPolicy"), "cleanPodPolicyy"),
        (("spec", "tfReplicaSpecs", "Worker"), "replica"),
        (("spec", "tfReplicaSpecs", "Worker", "template", "spec"), "nodeSelecter"),
        (("spec", "tfReplicaSpecs", "PS", "template", "spec", "containers", 0), "imagePullPolicyy"),
        (("spec",), "successPolicyy"),
    ]:
        bad = copy.deepcopy(m)
        node = bad
        for p in path:
            node = node[p]
        node[key] = "x"
        jsonschema.Draft7Validator(schema).validate(bad)  # the cluster's own schema lets it through
        with pytest.raises(ManifestError, match=f"unknown field\\(s\\) {key}"):
            k8s.validate(bad)


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
    k8s.validate(m, CRDS)
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


# -- submission through the real client -------------------------------------------------------


class _ApiServer:
    """A tiny Kubernetes API stand-in: records every request, answers POSTs with ``status``."""

    def __init__(self, status=201, states=()):
        self.requests: list[dict] = []
        self.status = status
        self.states = list(states)  # job conditions returned by successive GETs (the last repeats)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append({"path": self.path, "method": "GET"})
                state = outer.states.pop(0) if len(outer.states) > 1 else outer.states[0]
                conditions = [{"type": t, "status": "True", "message": m} for t, m in state]
                data = json.dumps({"kind": "TFJob", "status": {"conditions": conditions}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": json.loads(body),
                    }
                )
                if outer.status == 201:
                    reply = dict(json.loads(body))
                    reply["metadata"] = {**reply["metadata"], "uid": "1234", "resourceVersion": "1"}
                else:
                    reply = {
                        "kind": "Status",
                        "status": "Failure",
                        "message": 'tfjobs.kubeflow.org "ctr" already exists',
                        "reason": "AlreadyExists",
                        "code": 409,
                    }
                data = json.dumps(reply).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _kubeconfig(tmp_path, url, token="s3cr3t-token"):
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": {"server": url}}],
                "users": [{"name": "me", "user": {"token": token}}],
                "contexts": [{"name": "local", "context": {"cluster": "local", "user": "me"}}],
                "current-context": "local",
            }
        )
    )
    return path


@pytest.mark.integration
def test_submit_posts_the_manifest_through_the_kubernetes_client(tmp_path):
    from kubernetes import client

    spec = tf(workers=2, ps=1, namespace="ml")
    manifest = k8s.render(spec)
    with _ApiServer() as api:
        created = k8s.submit(manifest, api_client=client.ApiClient(client.Configuration(host=api.url)))
    (req,) = api.requests
    assert req["path"] == "/apis/kubeflow.org/v1/namespaces/ml/tfjobs"
    assert req["body"] == manifest
    assert created["metadata"]["uid"] == "1234"


@pytest.mark.integration
def test_cli_submit_with_a_kubeconfig(tmp_path, capsys):
    with _ApiServer() as api:
        kc = _kubeconfig(tmp_path, api.url)
        code = main(
            [
                "--framework",
                "torch",
                "--workers",
                "2",
                "--target",
                "k8s",
                "--image",
                "reg/img:1",
                "--name",
                "ddp",
                "--kubeconfig",
                str(kc),
                "train.py",
            ]
        )
    assert code == 0
    (req,) = api.requests
    assert req["path"] == "/apis/kubeflow.org/v1/namespaces/default/pytorchjobs"
    assert req["headers"]["authorization"] == "Bearer s3cr3t-token"
    assert req["body"] == k8s.render(torch(workers=2))
    assert "PyTorchJob default/ddp created" in capsys.readouterr().out


@pytest.mark.integration
def test_cli_submit_refused_is_one_line_without_credentials(tmp_path, capsys):
    with _ApiServer(status=409) as api:
        kc = _kubeconfig(tmp_path, api.url)
        code = main(
            [
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
                "--kubeconfig",
                str(kc),
                "train.py",
            ]
        )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "409 Conflict" in err[-1] and "already exists" in err[-1]
    assert all("s3cr3t" not in line for line in err)


@pytest.mark.integration
def test_submit_unreachable_server(tmp_path):
    from kubernetes import client

    with _ApiServer() as api:
        url = api.url
    with pytest.raises(SubmitError, match="cannot reach the Kubernetes API at http://127.0.0.1"):
        k8s.submit(k8s.render(tf(workers=1)), api_client=client.ApiClient(client.Configuration(host=url)))


@pytest.mark.integration
def test_submit_sh_validates_and_prints_or_refuses(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {
        **__import__("os").environ,
        "KUBEAI_TRAIN_CRD_DIR": str(CRDS),
        "PYTHON": __import__("sys").executable,
    }
    res = subprocess.run(
        [str(root / "launchers" / "submit.sh"), "launchers/jobs/tf_ps_ctr.yaml", "--name", "ctr-20261129", "--dry-run", "--", "--epochs", "3"],
        cwd=root, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    m = yaml.safe_load(res.stdout)
    k8s.validate(m, CRDS)
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
    with _ApiServer(states=states) as api:
        kc = _kubeconfig(tmp_path, api.url)
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
    gets = [r for r in api.requests if r.get("method") == "GET"]
    assert gets[0]["path"] == "/apis/kubeflow.org/v1/namespaces/ml/tfjobs/ctr" and len(gets) >= 3


@pytest.mark.integration
def test_cli_wait_times_out(tmp_path, capsys):
    with _ApiServer(states=[[("Running", "")]]) as api:
        kc = _kubeconfig(tmp_path, api.url)
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
