"""Pure builders of what each replica runs and sees: ``(argv, env)`` for every process.

This is the Kubeflow training-operator v1.9.4 (``pkg/controller.v1/tensorflow/tensorflow.go``,
``pkg/controller.v1/pytorch/{envvar,master,elastic}.go``) and torchrun, restated in Python:

* TFJob: only ``TF_CONFIG``, only when the job has more than one replica in total; compact JSON
  byte-identical to Go's ``json.Marshal`` of the operator's struct (``cluster`` with roles
  sorted, ``task``, ``environment: "cloud"``), or the enableDynamicWorker sparse shape.
* PyTorchJob: ``PYTHONUNBUFFERED``, ``MASTER_PORT``/``PET_MASTER_PORT``, ``MASTER_ADDR``/
  ``PET_MASTER_ADDR``, ``WORLD_SIZE``, ``RANK``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``,
  ``PET_NNODES`` (or the elastic set), in the operator's order.
* torchrun (``nproc_per_node > 1``): per process ``LOCAL_RANK``, ``RANK = node * nproc +
  local``, ``GROUP_RANK``, ``WORLD_SIZE``, ... as its local agent sets them.

Only the addresses differ between targets: ``k8s_endpoints`` gives the operator's service
names, ``local_endpoints`` 127.0.0.1 and the ports the local target reserved. Nothing here
spawns a process or reads the environment.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kubeai_train.launch.types import JobSpec

__all__ = [
    "Endpoints",
    "ProcessPlan",
    "go_json",
    "k8s_endpoints",
    "local_endpoints",
    "local_plan",
    "operator_env",
    "ports_needed",
    "tf_config",
    "torchrun_env",
]


def go_json(value: object) -> str:
    """``json.Marshal`` output of Go's encoding/json for plain values: compact, the key order
    given by the caller (Go sorts map keys; struct fields keep declaration order), non-ASCII kept,
    and ``<``, ``>``, ``&``, U+2028, U+2029 escaped as Go does."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


@dataclass(frozen=True)
class Endpoints:
    """Where each replica listens: ``(role, index) -> (host, port)``.

    For TF every replica has an entry; for torch the master (and, with an elastic policy,
    worker 0, the operator's default rendezvous host).
    """

    addresses: Mapping[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    def address(self, role: str, index: int) -> str:
        host, port = self.addresses[(role, index)]
        return f"{host}:{port}"


def k8s_endpoints(spec: JobSpec, cluster_domain: str = "") -> Endpoints:
    """The addresses the operator puts in the environment on Kubernetes.

    TF: ``<job>-<role>-<i>.<namespace>.svc[.<CUSTOM_CLUSTER_DOMAIN>]:<port>``;
    torch: ``MASTER_ADDR = <job>-master-0`` (no namespace), the pytorchjob-port.
    """
    out: dict[tuple[str, int], tuple[str, int]] = {}
    port = spec.container_port
    if spec.framework == "tf":
        for role, i in spec.replica_keys():
            host = f"{spec.name}-{role}-{i}.{spec.namespace}.svc"
            if cluster_domain:
                host += "." + cluster_domain
            out[(role, i)] = (host, port)
    else:
        out[("master", 0)] = (f"{spec.name}-master-0", port)
        if spec.elastic is not None:
            out[("worker", 0)] = (f"{spec.name}-worker-0", port)
    return Endpoints(out)


def ports_needed(spec: JobSpec) -> list[tuple[str, int]]:
    """The ``(role, index)`` keys that need a port of their own on one host."""
    if spec.framework == "tf":
        return spec.replica_keys()
    keys = [("master", 0)]
    if spec.elastic is not None:
        keys.append(("worker", 0))
    return keys


def local_endpoints(spec: JobSpec, ports: Sequence[int], host: str = "127.0.0.1") -> Endpoints:
    """The local target's addresses: ``host`` and one reserved port per ``ports_needed`` key."""
    keys = ports_needed(spec)
    if len(ports) != len(keys):
        raise ValueError(f"need {len(keys)} ports for {keys}, got {len(ports)}")
    return Endpoints({k: (host, p) for k, p in zip(keys, ports, strict=True)})


def tf_config(spec: JobSpec, role: str, index: int, endpoints: Endpoints) -> str | None:
    """The ``TF_CONFIG`` the operator injects into replica ``role``/``index``, or None when the
    job has a single replica (the operator does not set it for non-distributed jobs)."""
    if spec.total_replicas == 1:
        return None
    cluster = {r: [endpoints.address(r, i) for i in range(n)] for r, n in sorted(spec.replicas.items())}
    task = {"type": role, "index": index}
    if spec.enable_dynamic_worker:
        # SparseTFConfig: Cluster{Worker map[int32]string `json:"worker"`; PS []string `json:"ps"`}
        sparse_worker: dict[str, str] = {}
        sparse_ps: list[str] | None = []
        if role == "ps":
            sparse_ps = [cluster["ps"][index]]
        elif role == "worker":
            sparse_ps = cluster.get("ps")  # nil slice -> null, as in Go
            sparse_worker[str(index)] = cluster["worker"][index]
        return go_json({"cluster": {"worker": sparse_worker, "ps": sparse_ps}, "task": task})
    return go_json({"cluster": cluster, "task": task, "environment": "cloud"})


def operator_env(spec: JobSpec, role: str, index: int, endpoints: Endpoints) -> list[tuple[str, str]]:
    """The variables the operator appends to the replica's container env, in its order."""
    if spec.framework == "tf":
        cfg = tf_config(spec, role, index, endpoints)
        return [] if cfg is None else [("TF_CONFIG", cfg)]
    env: list[tuple[str, str]] = [("PYTHONUNBUFFERED", "1")]
    nproc = spec.nproc_per_node
    world = spec.total_replicas * nproc
    master_host, master_port = endpoints.addresses[("master", 0)]
    rank = index + 1 if role == "worker" else index
    env += [
        ("MASTER_PORT", str(master_port)),
        ("PET_MASTER_PORT", str(master_port)),
        ("MASTER_ADDR", master_host),
        ("PET_MASTER_ADDR", master_host),
        ("WORLD_SIZE", str(world)),
        ("RANK", str(rank)),
        ("PET_NODE_RANK", str(rank)),
        # the manifest always sets spec.nprocPerNode, so the operator always injects it
        ("PET_NPROC_PER_NODE", str(nproc)),
    ]
    el = spec.elastic
    if el is None:
        env.append(("PET_NNODES", str(spec.total_replicas)))
        return env
    workers = spec.replicas.get("worker", 0)
    env.append(("PET_RDZV_ENDPOINT", endpoints.address("worker", 0)))
    env.append(("PET_RDZV_BACKEND", el.rdzv_backend))
    lo = el.min_replicas or el.max_replicas or workers
    hi = el.max_replicas or el.min_replicas or workers
    env.append(("PET_NNODES", f"{lo}:{hi}"))  # the operator's defaulting fills min and max
    if el.max_restarts is not None:
        env.append(("PET_MAX_RESTARTS", str(el.max_restarts)))
    if el.rdzv_id is not None:
        env.append(("PET_RDZV_ID", el.rdzv_id))
    return env


def torchrun_env(
    spec: JobSpec, node_rank: int, local_rank: int, master_addr: str, master_port: int
) -> list[tuple[str, str]]:
    """What torchrun's local agent sets for one of the ``nproc_per_node`` processes of a node
    (static rendezvous, no restarts). Differs from torchrun only in
    ``TORCHELASTIC_USE_AGENT_STORE=False``: there is no agent store, rank 0 hosts the TCPStore.
    ``TORCHELASTIC_ERROR_FILE`` (a path) is added by the local target."""
    nproc = spec.nproc_per_node
    nnodes = spec.total_replicas
    rank = node_rank * nproc + local_rank
    return [
        ("LOCAL_RANK", str(local_rank)),
        ("RANK", str(rank)),
        ("GROUP_RANK", str(node_rank)),
        ("ROLE_RANK", str(rank)),
        ("ROLE_NAME", "default"),
        ("LOCAL_WORLD_SIZE", str(nproc)),
        ("WORLD_SIZE", str(nnodes * nproc)),
        ("GROUP_WORLD_SIZE", str(nnodes)),
        ("ROLE_WORLD_SIZE", str(nnodes * nproc)),
        ("MASTER_ADDR", master_addr),
        ("MASTER_PORT", str(master_port)),
        ("TORCHELASTIC_RESTART_COUNT", "0"),
        ("TORCHELASTIC_MAX_RESTARTS", "0"),
        ("TORCHELASTIC_RUN_ID", "none"),  # torchrun's default --rdzv-id
        ("TORCHELASTIC_USE_AGENT_STORE", "False"),
        ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        ("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT"),
    ]


@dataclass(frozen=True)
class ProcessPlan:
    """One local process: which replica it is, what it runs, the variables it gets on top of
    the launcher's environment (with inherited cluster variables removed), and the cores it may
    run on (``()``: every core the launcher may use; set by ``cpus.bind``)."""

    role: str
    index: int
    local_rank: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    nproc: int = 1
    cpus: tuple[int, ...] = ()

    @property
    def replica(self) -> tuple[str, int]:
        return (self.role, self.index)

    @property
    def label(self) -> str:
        """``worker:1`` (``worker:1.0`` for one of several processes per node)."""
        base = f"{self.role}:{self.index}"
        return f"{base}.{self.local_rank}" if self.nproc > 1 else base


def local_argv(spec: JobSpec, python: str = sys.executable) -> tuple[str, ...]:
    """``python -u script args`` (unbuffered so that a killed process loses no output, without
    putting PYTHONUNBUFFERED into a TF job's environment, which the operator would not do)."""
    if spec.command:
        return spec.argv()
    return (python, "-u", *spec.argv())


def local_plan(spec: JobSpec, endpoints: Endpoints, python: str = sys.executable) -> list[ProcessPlan]:
    """Every local process of the job with exactly the operator's (and torchrun's) variables."""
    argv = local_argv(spec, python)
    plans: list[ProcessPlan] = []
    for role, index in spec.replica_keys():
        base = dict(operator_env(spec, role, index, endpoints))
        base.update(spec.env)
        nproc = spec.nproc_per_node
        if nproc == 1:
            plans.append(ProcessPlan(role, index, 0, argv, base))
            continue
        host, port = endpoints.addresses[("master", 0)]
        node_rank = int(base["PET_NODE_RANK"])
        for local in range(nproc):
            env = dict(base)
            env.update(torchrun_env(spec, node_rank, local, host, port))
            env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default with several processes per node
            plans.append(ProcessPlan(role, index, local, argv, env, nproc))
    return plans
