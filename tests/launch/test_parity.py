"""Env parity: a process started by the local launcher sees what the same process would see in
a pod of the rendered manifest, except the addresses.

The "pods" are real processes started from the rendered manifest: each replica's container
command (``python -u ...`` or ``torchrun ...``) with the container's env plus what the
training-operator v1.9.4 injects, computed here from the manifest alone by an independent
restatement of ``tensorflow.go`` / ``pytorch/envvar.go`` (not through ``launch.env``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubeai_train.launch import JobSpec, LocalJob, k8s
from kubeai_train.launch._ports import reserve_ports
from kubeai_train.launch.local import clean_base_env

ROOT = Path(__file__).resolve().parents[2]

DUMP = """
import dataclasses, json, os, re
from kubeai_train import cluster
info = cluster.current()
pat = re.compile(r"^(TF_CONFIG|PYTHONUNBUFFERED|MASTER_ADDR|MASTER_PORT|RANK|WORLD_SIZE|OMP_NUM_THREADS|"
                 r"(LOCAL|GROUP|ROLE)_[A-Z_]+|PET_[A-Z_]+|TORCHELASTIC_[A-Z_]+|TORCH_NCCL_[A-Z_]+)$")
env = {k: v for k, v in os.environ.items() if pat.match(k)}
label = f"{info.role}-{info.index}" + (f".{info.local_rank}" if info.local_world_size > 1 else "")
out = os.environ["OUT"]
with open(os.path.join(out, label + ".tmp"), "w") as f:
    json.dump({"info": dataclasses.asdict(info), "env": env}, f)
os.replace(os.path.join(out, label + ".tmp"), os.path.join(out, label + ".json"))
# everyone stays until all have dumped, so that no process is stopped before it could
import time
deadline = time.time() + 60
while len([n for n in os.listdir(out) if n.endswith(".json")]) < int(os.environ["EXPECT"]) and time.time() < deadline:
    time.sleep(0.02)
"""


# -- the operator, restated from its Go sources, reading only the manifest -------------------


def _port(rspec, container, port_name, default):
    for c in rspec["template"]["spec"]["containers"]:
        if c["name"] == container:
            for p in c.get("ports", []):
                if p.get("name") == port_name:
                    return p["containerPort"]
    return default


def operator_env(manifest, rtype, index):
    name, ns = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    spec = manifest["spec"]
    if manifest["kind"] == "TFJob":
        specs = spec["tfReplicaSpecs"]
        if sum(s.get("replicas", 1) for s in specs.values()) == 1:  # isDistributed
            return []
        cluster = {
            rt.lower(): [
                f"{name}-{rt.lower()}-{i}.{ns}.svc:{_port(s, 'tensorflow', 'tfjob-port', 2222)}"
                for i in range(s["replicas"])
            ]
            for rt, s in specs.items()
        }

        def q(text):
            return '"' + text + '"'

        def arr(addrs):
            return "[" + ",".join(q(a) for a in addrs) + "]"

        task = '"task":{"type":' + q(rtype.lower()) + ',"index":' + str(index) + "}"
        if spec.get("enableDynamicWorker"):
            worker, ps = "{}", "[]"
            if rtype.lower() == "ps":
                ps = arr([cluster["ps"][index]])
            elif rtype.lower() == "worker":
                ps = arr(cluster["ps"])
                worker = "{" + q(str(index)) + ":" + q(cluster["worker"][index]) + "}"
            return [("TF_CONFIG", '{"cluster":{"worker":' + worker + ',"ps":' + ps + "}," + task + "}")]
        body = ",".join(q(k) + ":" + arr(cluster[k]) for k in sorted(cluster))
        return [("TF_CONFIG", '{"cluster":{' + body + "}," + task + ',"environment":"cloud"}')]
    specs = spec["pytorchReplicaSpecs"]
    total = sum(s["replicas"] for s in specs.values())
    nproc_s = spec.get("nprocPerNode")
    nproc = int(nproc_s) if nproc_s and nproc_s.isdigit() else 1
    env = [("PYTHONUNBUFFERED", "1")]
    if "Master" in specs:
        port = str(_port(specs["Master"], "pytorch", "pytorchjob-port", -1))
        addr = f"{name}-master-0"
        rank = index + 1 if rtype == "Worker" else index
        env += [
            ("MASTER_PORT", port),
            ("PET_MASTER_PORT", port),
            ("MASTER_ADDR", addr),
            ("PET_MASTER_ADDR", addr),
        ]
        env += [("WORLD_SIZE", str(total * nproc)), ("RANK", str(rank)), ("PET_NODE_RANK", str(rank))]
    if nproc_s is not None:
        env.append(("PET_NPROC_PER_NODE", nproc_s))
    env.append(("PET_NNODES", str(total)))
    return env


def run_pods(manifest, out: Path, expect: int, entrypoint=False, timeout=90):
    """Every replica of the manifest as a local process, as its pod would run it (with
    ``entrypoint``: through launchers/entrypoint.sh, the script and its arguments as args)."""
    field = "tfReplicaSpecs" if manifest["kind"] == "TFJob" else "pytorchReplicaSpecs"
    master_host = f"{manifest['metadata']['name']}-master-0"
    procs = []
    for rtype, rspec in manifest["spec"][field].items():
        (c,) = rspec["template"]["spec"]["containers"]
        for i in range(rspec["replicas"]):
            env = clean_base_env(os.environ)
            env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
            for k, v in operator_env(manifest, rtype, i):
                env[k] = "127.0.0.1" if v == master_host else v  # the pod's DNS name, on this host
            env["OUT"] = str(out)
            env["EXPECT"] = str(expect)
            cmd = list(c["command"])
            if entrypoint:
                env["PYTHON"] = sys.executable
                cmd = [str(ROOT / "launchers" / "entrypoint.sh"), *cmd[(2 if cmd[0] == "python" else 1) :]]
            else:
                cmd[:1] = (
                    [sys.executable]
                    if cmd[0] == "python"
                    else [sys.executable, "-m", "torch.distributed.run"]
                )
            procs.append(
                subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            )
    for p in procs:
        out_text, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out_text.decode()[-3000:]


# -- comparison -------------------------------------------------------------------------------


def normalise(dump):
    info, env = dict(dump["info"]), dict(dump["env"])
    info["cluster"] = {r: [f"<{r}-{i}>" for i in range(len(a))] for r, a in info["cluster"].items()}
    info["master_addr"] = info["master_addr"] and "<master>"
    info["master_port"] = info["master_port"] and "<port>"
    if "TF_CONFIG" in env:
        cfg = json.loads(env["TF_CONFIG"])
        for role, addrs in cfg["cluster"].items():
            if isinstance(addrs, list):
                cfg["cluster"][role] = [f"<{role}-{i}>" for i in range(len(addrs))]
            else:
                cfg["cluster"][role] = {k: f"<{role}-{k}>" for k in addrs}
        env["TF_CONFIG"] = json.dumps(cfg)  # keeps the key order of the original
    for k in ("MASTER_ADDR", "PET_MASTER_ADDR", "MASTER_PORT", "PET_MASTER_PORT"):
        if k in env:
            env[k] = "<addr>"
    # torchrun's agent hosts the store; the local launcher has no agent, rank 0 hosts it
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    if "TORCHELASTIC_ERROR_FILE" in env:
        env["TORCHELASTIC_ERROR_FILE"] = "<path>"
    return {"info": info, "env": env}


def dumps(out: Path):
    return {p.stem: normalise(json.loads(p.read_text())) for p in sorted(out.glob("*.json"))}


SPECS = {
    "tf-chief-ps-evaluator": {"framework": "tf", "workers": 2, "ps": 2, "evaluator": True},
    "tf-no-chief": {"framework": "tf", "workers": 2, "ps": 1, "chief": False},
    "tf-single": {"framework": "tf", "workers": 1, "chief": False},
    "tf-dynamic-worker": {"framework": "tf", "workers": 2, "ps": 1, "enable_dynamic_worker": True},
    "torch-3": {"framework": "torch", "workers": 3},
    "torch-2x2-torchrun": {"framework": "torch", "workers": 2, "nproc_per_node": 2},
    "tf-entrypoint": {"framework": "tf", "workers": 1, "ps": 1, "entrypoint": True},
    "torch-1x2-entrypoint": {"framework": "torch", "workers": 1, "nproc_per_node": 2, "entrypoint": True},
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(SPECS))
def test_local_processes_see_what_pods_of_the_manifest_see(tmp_path, case, monkeypatch):
    kw = dict(SPECS[case])
    framework = kw.pop("framework")
    entrypoint = kw.pop("entrypoint", False)
    dump = tmp_path / "dump.py"
    dump.write_text(textwrap.dedent(DUMP))
    with reserve_ports(1) as lease:  # the pods' pytorchjob-port, free on this host
        spec = JobSpec.from_counts(
            framework,
            script=str(dump),
            name="par",
            namespace="ml",
            image="reg/img:1",
            port=lease.ports[0],
            env={"LR": "0.1"},
            **kw,
        )
        manifest = k8s.render(spec)
        pods = tmp_path / "pods"
        pods.mkdir()
        run_pods(manifest, pods, spec.total_replicas * spec.nproc_per_node, entrypoint)
    local = tmp_path / "local"
    local.mkdir()
    code = LocalJob(
        spec,
        log_dir=tmp_path / "logs",
        base_env={**os.environ, "OUT": str(local), "EXPECT": str(spec.total_replicas * spec.nproc_per_node)},
        timeout=90,
        success_grace=60,
        handle_signals=False,
    ).run()
    assert code == 0
    got, want = dumps(local), dumps(pods)
    assert sorted(got) == sorted(want) and len(got) == spec.total_replicas * spec.nproc_per_node
    for label in want:
        assert got[label] == want[label], label
