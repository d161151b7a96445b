"""Who am I: role, index, rank, world size and the addresses of the others.

Every other module asks here. The answer comes from exactly what the Kubeflow
training-operator injects (``TF_CONFIG`` for TFJob, ``MASTER_ADDR``/``RANK``/``PET_*``
for PyTorchJob), from torchrun's variables, or from nothing (one local process).
The local launcher injects the same variables, so a script cannot tell local from
Kubernetes except by the addresses.

Precedence: ``TF_CONFIG`` when set and non-empty; else the torch variables
(torchrun's ``LOCAL_RANK``/``GROUP_RANK`` are honoured over the PyTorchJob-only
``PET_NODE_RANK``); else a single local process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "DISPATCHER_ENV",
    "ClusterError",
    "ClusterInfo",
    "current",
    "default_job_dir",
    "from_env",
    "job_id",
    "parse_tf_config",
]

TF_ROLES = ("chief", "master", "worker", "ps", "evaluator")
# ``host:port`` of the job's data dispatcher (``data.read(..., assignment="dynamic")``), when it
# cannot be derived from the cluster: the local launcher sets it (all tasks share 127.0.0.1)
DISPATCHER_ENV = "KUBEAI_TRAIN_DISPATCHER"
# the directory a job's processes share the split plan of their file datasets through
# (kubeai_train.data.plan); the local launcher sets one per job
PLAN_DIR_ENV = "KUBEAI_TRAIN_PLAN_DIR"
TORCH_ROLES = ("master", "worker")


class ClusterError(ValueError):
    """The environment describes no consistent cluster; the message names the variable."""


@dataclass(frozen=True)
class ClusterInfo:
    """This process's place in the job.

    Attributes:
        framework: ``"tf"``, ``"torch"`` or ``"local"``.
        role: ``chief`` / ``master`` / ``worker`` / ``ps`` / ``evaluator`` (TF), ``master`` /
            ``worker`` (torch), ``local`` (no cluster).
        index: the task index within its role (TF) or the replica index (torch).
        rank: the global rank among the processes that train and read training data. TF: the
            chief (or master) is 0 and worker i is i + 1 (i when there is no chief); ps and
            evaluator processes do not train and get rank 0 of a world of 1. Torch: ``RANK``.
        world_size: the number of training processes (TF: chief + workers; torch: ``WORLD_SIZE``).
        cluster: role -> list of ``host:port`` (TF); for torch ``{"master": [MASTER_ADDR:PORT]}``.
        local_rank / local_world_size: the process within its node (torchrun); 0 / 1 otherwise.
        node_rank / num_nodes: the node (pod) within the job.
        master_addr / master_port: the torch rendezvous address, when there is one.
        sparse: True when TF_CONFIG came in the operator's enableDynamicWorker shape, in which a
            worker knows only the PS and itself.
    """

    framework: str = "local"
    role: str = "local"
    index: int = 0
    rank: int = 0
    world_size: int = 1
    cluster: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    sparse: bool = False

    @property
    def is_chief(self) -> bool:
        """True for the one process that owns checkpoints, export and logging."""
        if self.framework == "tf":
            has_chief = bool(self.cluster.get("chief") or self.cluster.get("master"))
            if has_chief:
                return self.role in ("chief", "master")
            return self.role == "worker" and self.index == 0
        return self.rank == 0

    @property
    def is_trainer(self) -> bool:
        """True when this process trains and reads a share of the training data."""
        return self.role not in ("ps", "evaluator")

    @property
    def is_distributed(self) -> bool:
        return self.framework != "local" and (self.world_size > 1 or bool(self.cluster.get("ps")))

    @property
    def address(self) -> str | None:
        """This task's own ``host:port`` in a TF cluster, else None."""
        addrs = self.cluster.get(self.role, ())
        if self.sparse and self.role == "worker":
            # the sparse shape keeps only this worker, keyed by its index
            return addrs[0] if addrs else None
        return addrs[self.index] if self.index < len(addrs) else None

    def cluster_spec(self) -> dict[str, list[str]]:
        """The cluster as a plain dict, the shape ``tf.train.ClusterSpec`` takes."""
        return {role: list(addrs) for role, addrs in self.cluster.items()}


def _int_var(env: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ClusterError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ClusterError(f"{name} must be >= {minimum}, got {value}")
    return value


def parse_tf_config(raw: str) -> ClusterInfo:
    """Parse a ``TF_CONFIG`` value (the operator's normal or enableDynamicWorker shape).

    Raises:
        ClusterError: naming TF_CONFIG and what is wrong with it.
    """
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ClusterError(
            f"TF_CONFIG is not valid JSON ({e.msg} at char {e.pos}): set it to "
            '{"cluster": {...}, "task": {"type": ..., "index": ...}}'
        ) from None
    if not isinstance(cfg, dict):
        raise ClusterError(f"TF_CONFIG must be a JSON object, got {type(cfg).__name__}")
    cluster_raw = cfg.get("cluster")
    task = cfg.get("task")
    if not isinstance(cluster_raw, dict) or not cluster_raw:
        raise ClusterError("TF_CONFIG has no 'cluster' object mapping roles to address lists")
    if not isinstance(task, dict) or "type" not in task:
        raise ClusterError("TF_CONFIG has no 'task' object with 'type' and 'index'")
    role = task["type"]
    index = task.get("index", 0)
    if role not in TF_ROLES:
        raise ClusterError(f"TF_CONFIG task.type must be one of {', '.join(TF_ROLES)}, got {role!r}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ClusterError(f"TF_CONFIG task.index must be an integer >= 0, got {index!r}")

    cluster: dict[str, tuple[str, ...]] = {}
    sparse = False
    for name, addrs in cluster_raw.items():
        if name not in TF_ROLES:
            raise ClusterError(f"TF_CONFIG cluster has unknown role {name!r}; roles: {', '.join(TF_ROLES)}")
        if isinstance(addrs, dict):
            # enableDynamicWorker: {"worker": {"<index>": "host:port"}}
            sparse = True
            try:
                items = sorted((int(k), v) for k, v in addrs.items())
            except ValueError:
                raise ClusterError(
                    f"TF_CONFIG cluster.{name} keys must be task indices, got {list(addrs)}"
                ) from None
            addrs = [v for _, v in items]
        if not isinstance(addrs, list) or not all(isinstance(a, str) and a for a in addrs):
            raise ClusterError(
                f"TF_CONFIG cluster.{name} must be a list of 'host:port' strings, got {addrs!r}"
            )
        cluster[name] = tuple(addrs)
    if not sparse and role not in cluster:
        raise ClusterError(f"TF_CONFIG task.type {role!r} is not in cluster roles {sorted(cluster)}")
    if not sparse and index >= len(cluster[role]):
        raise ClusterError(
            f"TF_CONFIG task.index {index} is out of range: cluster.{role} has {len(cluster[role])} tasks"
        )
    if len(cluster.get("chief", ())) + len(cluster.get("master", ())) > 1:
        raise ClusterError("TF_CONFIG cluster has more than one chief/master task; a TF job has at most one")

    n_chief = len(cluster.get("chief", ())) + len(cluster.get("master", ()))
    n_worker = len(cluster.get("worker", ()))
    if role in ("chief", "master"):
        rank, world = 0, n_chief + n_worker
    elif role == "worker":
        rank, world = n_chief + index, n_chief + n_worker
        if sparse:
            world = max(world, rank + 1)  # the sparse shape does not tell the worker count
    else:
        rank, world = 0, 1
    return ClusterInfo(
        framework="tf", role=role, index=index, rank=rank, world_size=world, cluster=cluster, sparse=sparse
    )


def _torch_from_env(env: Mapping[str, str]) -> ClusterInfo:
    rank = _int_var(env, "RANK")
    world = _int_var(env, "WORLD_SIZE", minimum=1)
    if rank is None or world is None:
        missing = [n for n, v in (("RANK", rank), ("WORLD_SIZE", world)) if v is None]
        raise ClusterError(
            f"{' and '.join(missing)} must be set alongside MASTER_ADDR/MASTER_PORT "
            "(a PyTorchJob or torchrun sets all four)"
        )
    if rank >= world:
        raise ClusterError(f"RANK must be < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world}")
    addr = env.get("MASTER_ADDR") or None
    port = _int_var(env, "MASTER_PORT", minimum=1)
    if addr is None or port is None:
        raise ClusterError("MASTER_ADDR and MASTER_PORT must both be set when RANK/WORLD_SIZE are")
    local_rank = _int_var(env, "LOCAL_RANK")
    local_world = _int_var(env, "LOCAL_WORLD_SIZE", minimum=1)
    if local_rank is not None:
        # torchrun: GROUP_RANK is the node
        node_rank = _int_var(env, "GROUP_RANK")
        if node_rank is None:
            node_rank = _int_var(env, "PET_NODE_RANK") or 0
        local_world = local_world or 1
    else:
        local_rank, local_world = 0, 1
        node_rank = _int_var(env, "PET_NODE_RANK")
        node_rank = rank if node_rank is None else node_rank
    if local_rank >= local_world:
        raise ClusterError(f"LOCAL_RANK must be < LOCAL_WORLD_SIZE, got {local_rank} and {local_world}")
    num_nodes_raw = env.get("PET_NNODES") or env.get("GROUP_WORLD_SIZE")
    num_nodes = max(1, world // local_world)
    if num_nodes_raw and ":" not in num_nodes_raw:  # elastic nnodes come as "min:max"
        num_nodes = _int_var({"PET_NNODES": num_nodes_raw}, "PET_NNODES", minimum=1) or num_nodes
    role = "master" if node_rank == 0 else "worker"
    index = 0 if role == "master" else node_rank - 1
    return ClusterInfo(
        framework="torch",
        role=role,
        index=index,
        rank=rank,
        world_size=world,
        cluster={"master": (f"{addr}:{port}",)},
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=addr,
        master_port=port,
    )


def from_env(env: Mapping[str, str] | None = None) -> ClusterInfo:
    """Read the cluster from ``env`` (default ``os.environ``); see the module docstring.

    Raises:
        ClusterError: a malformed TF_CONFIG or inconsistent torch variables, naming the variable.
    """
    env = os.environ if env is None else env
    raw = env.get("TF_CONFIG", "").strip()
    if raw:
        return parse_tf_config(raw)
    if any(env.get(n) for n in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return _torch_from_env(env)
    return ClusterInfo()


def current() -> ClusterInfo:
    """This process's cluster, read from ``os.environ`` now (cheap; not cached, so a test or a
    launcher that changes the environment sees the change)."""
    return from_env(os.environ)


def job_id(env: Mapping[str, str] | None = None) -> str | None:
    """12 hex digits naming this job, the same in every process of it, or None without a cluster.

    Derived from what every process of one job is given and no other job shares: the TF cluster
    spec (only its ``ps`` tasks when there are some, because in the operator's sparse
    ``enableDynamicWorker`` shape a worker sees only the PS and itself), or torch's
    ``MASTER_ADDR:MASTER_PORT:WORLD_SIZE``. A replica restarted with the same environment gets the
    same id; the local launcher picks fresh ports per launch, so a new launch gets a new one.

    Raises:
        ClusterError: a malformed cluster environment (see :func:`from_env`).
    """
    info = from_env(env)
    if info.framework == "tf":
        spec = info.cluster_spec()
        key = json.dumps({"ps": spec["ps"]} if spec.get("ps") else spec, sort_keys=True)
    elif info.framework == "torch":
        key = f"{info.master_addr}:{info.master_port}:{info.world_size}"
    else:
        return None
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def default_job_dir(name: str, env: Mapping[str, str] | None = None) -> str:
    """A model directory of its own for this job, created, when the user gave none.

    ``<temp dir>/kubeai_train/<name>-<job_id()>`` in a cluster (every process derives the same
    path without talking; a restarted replica finds it again), a fresh ``mkdtemp`` in one local
    process. The chief (rank 0) prints it once to stderr, so resuming it is an explicit choice.

    Args:
        name: what the directory is named after (e.g. ``tf_ps_ctr-ctr``); path separators are
            not allowed.
        env: the environment (default ``os.environ``).

    Raises:
        ClusterError: a malformed cluster environment, or a ``name`` with a path separator.
    """
    if not name or "/" in name or os.sep in name:
        raise ClusterError(f"job dir name must be a plain name without '/', got {name!r}")
    root = os.path.join(tempfile.gettempdir(), "kubeai_train")
    os.makedirs(root, exist_ok=True)
    jid = job_id(env)
    if jid is None:
        path = tempfile.mkdtemp(prefix=f"{name}-", dir=root)
    else:
        path = os.path.join(root, f"{name}-{jid}")
        os.makedirs(path, exist_ok=True)
    if from_env(env).is_chief:
        print(
            f"kubeai_train: model_dir {path} (new for this job; --model-dir {path} resumes it)",
            file=sys.stderr,
        )
    return path
