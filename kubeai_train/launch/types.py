"""Contracts of the launcher: the ``JobSpec`` every target runs, its parts, and the errors.

A ``JobSpec`` is one training job, independent of where it runs: the framework, how many
replicas of each role, what to run, and the Kubernetes-only parts (image, resources, volumes,
scheduling). It validates itself in ``__post_init__`` so that a bad job is refused before any
process starts or any manifest is printed. It is built from CLI flags (``__main__``) or from a
YAML job file (``JobSpec.from_yaml``); the targets (``local``, ``k8s``) only read it.

Replica semantics follow the Kubeflow training-operator and its Python SDK:

* ``torch``: roles ``master`` (exactly 1) and ``worker``; ``--workers N`` means N processes in
  total, i.e. 1 master + N-1 workers, as ``TrainingClient.create_job(num_workers=N)`` does.
* ``tf``: roles ``chief`` (at most 1), ``ps``, ``worker``, ``evaluator``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "CLEAN_POD_POLICIES",
    "FRAMEWORKS",
    "RESTART_POLICIES",
    "ROLES",
    "Elastic",
    "JobFailedError",
    "JobFileError",
    "JobSpec",
    "LaunchError",
    "ManifestError",
    "ScriptNotFoundError",
    "SecretRef",
    "SpecError",
    "SubmitError",
    "Scheduling",
    "Volume",
]

FRAMEWORKS = ("tf", "torch")
ROLES: dict[str, tuple[str, ...]] = {
    # the order is also the process start order and the order of log prefixes
    "tf": ("chief", "worker", "ps", "evaluator"),
    "torch": ("master", "worker"),
}
RESTART_POLICIES = ("Never", "OnFailure", "ExitCode", "Always")
CLEAN_POD_POLICIES = ("None", "Running", "All")
GANG_SCHEDULERS = ("volcano", "kueue")
SUCCESS_POLICIES = ("", "AllWorkers")
DEFAULT_PORTS = {"tf": 2222, "torch": 23456}

# Variables the launcher (or the operator, or torchrun) owns; a job may not set them itself.
RESERVED_ENV = re.compile(
    r"^(TF_CONFIG|MASTER_ADDR|MASTER_PORT|RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|"
    r"GROUP_WORLD_SIZE|ROLE_RANK|ROLE_NAME|ROLE_WORLD_SIZE|PET_.*|TORCHELASTIC_.*)$"
)
# Names whose values are credentials: never put a value in a manifest or a log.
CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class LaunchError(Exception):
    """Base of every launcher error. Messages name the bad value and what to do."""


class SpecError(LaunchError, ValueError):
    """The job spec (flags or job file) is invalid."""


class JobFileError(SpecError):
    """A YAML job file is unreadable or not a valid job."""


class ScriptNotFoundError(LaunchError, FileNotFoundError):
    """The training script does not exist."""


class ManifestError(LaunchError, ValueError):
    """A rendered manifest breaks the CRD schema or the operator's admission rules."""


class SubmitError(LaunchError):
    """The Kubernetes API refused or could not take the job."""


class JobFailedError(LaunchError):
    """A job (or a process of it) ended with a non-zero exit code."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dns1035_error(name: str) -> str | None:
    """Why ``name`` is not a DNS-1035 label (what metadata.name must be), or None when it is."""
    if not name:
        return "must not be empty"
    if len(name) > 63:
        return f"must be at most 63 characters, got {len(name)}"
    if not _DNS1035.match(name):
        return "must consist of lower case letters, digits and '-', start with a letter and end with a letter or digit"
    return None


def name_from_script(script: str | None) -> str:
    """A DNS-1035 job name derived from a script path (``examples/tf_ps_ctr.py`` -> ``tf-ps-ctr``)."""
    stem = Path(script).stem if script else "job"
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    name = re.sub(r"-+", "-", name)
    if not name or not name[0].isalpha():
        name = f"job-{name}".rstrip("-")
    return name[:40].rstrip("-") or "job"


@dataclass(frozen=True)
class SecretRef:
    """A value read from a Kubernetes Secret (``secretKeyRef``); never the value itself.

    Locally the variable is taken from the launcher's own environment under the same name.
    """

    secret: str
    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.secret, str) or not _DNS1123.match(self.secret.replace(".", "-")):
            raise SpecError(f"secret name must be a DNS-1123 name, got {self.secret!r}")
        if not isinstance(self.key, str) or not re.match(r"^[-._a-zA-Z0-9]+$", self.key):
            raise SpecError(f"secret key must match [-._a-zA-Z0-9]+, got {self.key!r}")

    @classmethod
    def parse(cls, value: object, var: str) -> SecretRef:
        """From ``"secret/key"``, ``"secret:key"`` or ``{"secret": ..., "key": ...}``."""
        if isinstance(value, SecretRef):
            return value
        if isinstance(value, str):
            parts = re.split(r"[/:]", value, maxsplit=1)
            if len(parts) == 2:
                return cls(parts[0], parts[1])
        if isinstance(value, Mapping) and set(value) == {"secret", "key"}:
            return cls(str(value["secret"]), str(value["key"]))
        raise SpecError(
            f"secret_env.{var} must be 'secret-name/key' or {{secret: ..., key: ...}}, got a {type(value).__name__}"
        )


@dataclass(frozen=True)
class Volume:
    """A PersistentVolumeClaim mounted into every replica (datasets, checkpoints).

    Locally volumes are not mounted: the script sees the launcher's file system.
    """

    claim_name: str
    mount_path: str
    name: str = ""
    read_only: bool = False
    sub_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.claim_name, str) or not _DNS1123.match(self.claim_name.replace(".", "-")):
            raise SpecError(f"volume claim_name must be a DNS-1123 name, got {self.claim_name!r}")
        if not isinstance(self.mount_path, str) or not self.mount_path.startswith("/"):
            raise SpecError(f"volume mount_path must be an absolute path, got {self.mount_path!r}")
        if not self.name:
            object.__setattr__(self, "name", re.sub(r"[^a-z0-9-]", "-", self.claim_name.lower())[:63])
        if not _DNS1123.match(self.name) or len(self.name) > 63:
            raise SpecError(f"volume name must be a DNS-1123 label, got {self.name!r}")

    @classmethod
    def parse(cls, value: object) -> Volume:
        """From ``"claim:/mount/path[:ro]"`` or a mapping of the field names."""
        if isinstance(value, Volume):
            return value
        if isinstance(value, str):
            parts = value.split(":")
            if len(parts) in (2, 3) and (len(parts) == 2 or parts[2] in ("ro", "rw")):
                return cls(
                    claim_name=parts[0], mount_path=parts[1], read_only=len(parts) == 3 and parts[2] == "ro"
                )
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise SpecError(
                    f"unknown volume field(s) {sorted(unknown)}; fields: claim_name, mount_path, name, read_only, sub_path"
                )
            return cls(**dict(value))
        raise SpecError(f"a volume must be 'claim:/mount/path[:ro]' or a mapping, got {value!r}")


@dataclass(frozen=True)
class Scheduling:
    """Where and how the job queues on Kubernetes.

    Attributes:
        queue: the Volcano queue or the Kueue LocalQueue name.
        priority_class: a PriorityClass name for every pod (and the Volcano PodGroup).
        gang: ``"volcano"`` (runPolicy.schedulingPolicy; all replicas start together) or
            ``"kueue"`` (the ``kueue.x-k8s.io/queue-name`` label; Kueue admits the job as a
            whole) or None.
        min_available: Volcano only: the replicas that must fit before any starts (default all).
    """

    queue: str | None = None
    priority_class: str | None = None
    gang: str | None = None
    min_available: int | None = None

    def __post_init__(self) -> None:
        if self.gang is not None and self.gang not in GANG_SCHEDULERS:
            raise SpecError(f"scheduling.gang must be one of {', '.join(GANG_SCHEDULERS)}, got {self.gang!r}")
        if self.gang == "kueue" and not self.queue:
            raise SpecError("scheduling.gang 'kueue' needs scheduling.queue (the LocalQueue name)")
        for attr in ("queue", "priority_class"):
            value = getattr(self, attr)
            if value is not None and (
                not isinstance(value, str) or not _DNS1123.match(value.replace(".", "-"))
            ):
                raise SpecError(f"scheduling.{attr} must be a DNS-1123 name, got {value!r}")
        if self.queue and not self.gang:
            raise SpecError(
                "scheduling.queue needs scheduling.gang (volcano or kueue) to say which queue it is"
            )
        if self.min_available is not None:
            if self.gang != "volcano":
                raise SpecError(
                    "scheduling.min_available applies to gang 'volcano' only; set gang: volcano or drop it"
                )
            if not _is_int(self.min_available) or self.min_available < 1:
                raise SpecError(
                    f"scheduling.min_available must be an integer >= 1, got {self.min_available!r}"
                )


@dataclass(frozen=True)
class Elastic:
    """PyTorchJob ``elasticPolicy`` (rendered for Kubernetes; the local target runs the job at a
    fixed size of the replica counts and only injects the elastic variables)."""

    min_replicas: int | None = None
    max_replicas: int | None = None
    max_restarts: int | None = None
    rdzv_backend: str = "c10d"
    rdzv_id: str | None = None

    def __post_init__(self) -> None:
        for attr in ("min_replicas", "max_replicas", "max_restarts"):
            value = getattr(self, attr)
            if value is not None and (not _is_int(value) or value < (0 if attr == "max_restarts" else 1)):
                raise SpecError(
                    f"elastic.{attr} must be an integer >= {0 if attr == 'max_restarts' else 1}, got {value!r}"
                )
        if self.min_replicas and self.max_replicas and self.min_replicas > self.max_replicas:
            raise SpecError(
                f"elastic.min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.rdzv_backend not in ("c10d", "etcd", "etcd-v2"):
            raise SpecError(f"elastic.rdzv_backend must be c10d, etcd or etcd-v2, got {self.rdzv_backend!r}")


def _str_map(value: object, what: str, key_re: re.Pattern[str] | None = None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{what} must be a mapping of strings, got {type(value).__name__}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or (key_re is not None and not key_re.match(k)):
            raise SpecError(f"{what} has an invalid name {k!r}")
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise SpecError(f"{what}.{k} must be a string, got {type(v).__name__}")
        out[k] = str(v)
    return out


def _resources(value: object, what: str) -> dict[str, dict[str, str]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(
            f"{what} must be {{requests: {{cpu: ..}}, limits: {{..}}}}, got {type(value).__name__}"
        )
    out: dict[str, dict[str, str]] = {}
    for kind, quantities in value.items():
        if kind not in ("requests", "limits"):
            raise SpecError(f"{what} has unknown key {kind!r}; use requests and limits")
        q = _str_map(quantities, f"{what}.{kind}")
        for res, amount in q.items():
            if not _QUANTITY.match(amount):
                raise SpecError(
                    f"{what}.{kind}.{res} must be a Kubernetes quantity like 2, 500m or 4Gi, got {amount!r}"
                )
        out[kind] = q
    return out


_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _toleration(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"a toleration must be a mapping, got {value!r}")
    unknown = set(value) - _TOLERATION_KEYS
    if unknown:
        raise SpecError(
            f"unknown toleration field(s) {sorted(unknown)}; fields: {', '.join(sorted(_TOLERATION_KEYS))}"
        )
    if value.get("operator", "Equal") not in ("Equal", "Exists"):
        raise SpecError(f"toleration operator must be Equal or Exists, got {value.get('operator')!r}")
    if value.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise SpecError(
            f"toleration effect must be NoSchedule, PreferNoSchedule or NoExecute, got {value.get('effect')!r}"
        )
    if "tolerationSeconds" in value and not _is_int(value["tolerationSeconds"]):
        raise SpecError(
            f"toleration tolerationSeconds must be an integer, got {value['tolerationSeconds']!r}"
        )
    return {k: value[k] for k in sorted(value)}


@dataclass(frozen=True)
class JobSpec:
    """One training job; see the module docstring for the replica semantics.

    Exactly one of ``script`` (a Python file), ``module`` (``python -m``) or ``command`` (an
    argv) says what every process runs; ``args`` follow it.

    Raises (from the constructor):
        SpecError: naming the bad field, the value and what to do.
    """

    framework: str
    replicas: Mapping[str, int]
    script: str | None = None
    module: str | None = None
    command: Sequence[str] | None = None
    args: Sequence[str] = ()
    nproc_per_node: int = 1
    name: str = ""
    namespace: str = "default"
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, SecretRef] = field(default_factory=dict)
    env_from_secrets: Sequence[str] = ()
    image: str | None = None
    image_pull_policy: str | None = None
    working_dir: str | None = None
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    role_resources: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict)
    volumes: Sequence[Volume] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    service_account: str | None = None
    restart_policy: str = "Never"
    backoff_limit: int = 3
    ttl_seconds_after_finished: int | None = None
    active_deadline_seconds: int | None = None
    clean_pod_policy: str | None = None
    success_policy: str = ""
    scheduling: Scheduling = field(default_factory=Scheduling)
    port: int | None = None
    enable_dynamic_worker: bool = False
    elastic: Elastic | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.framework not in FRAMEWORKS:
            raise SpecError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {self.framework!r}")
        roles = ROLES[self.framework]
        if not isinstance(self.replicas, Mapping) or not self.replicas:
            raise SpecError(f"replicas must map roles ({', '.join(roles)}) to counts, got {self.replicas!r}")
        counts: dict[str, int] = {}
        for role, n in self.replicas.items():
            if role not in roles:
                hint = " (torch has no parameter servers: drop --ps)" if role == "ps" else ""
                raise SpecError(
                    f"role {role!r} is not a {self.framework} role; roles: {', '.join(roles)}{hint}"
                )
            if not _is_int(n) or n < 0:
                raise SpecError(f"replicas.{role} must be an integer >= 0, got {n!r}")
            if n:
                counts[role] = n
        # canonical order, zero counts dropped: the spec compares and renders the same way always
        set_(self, "replicas", {r: counts[r] for r in roles if r in counts})
        if self.framework == "torch":
            if counts.get("master") != 1:
                raise SpecError(
                    f"a torch job needs exactly 1 master, got {counts.get('master', 0)} (use --workers N for 1 master + N-1 workers)"
                )
        else:
            if counts.get("chief", 0) > 1:
                raise SpecError(f"a tf job has at most 1 chief, got {counts['chief']}")
            if not counts.get("chief") and not counts.get("worker"):
                raise SpecError("a tf job needs a chief or at least 1 worker (--workers must be >= 1)")
            if counts.get("evaluator", 0) > 1:
                raise SpecError(f"a tf job has at most 1 evaluator, got {counts['evaluator']}")
        if not _is_int(self.nproc_per_node) or self.nproc_per_node < 1:
            raise SpecError(f"nproc_per_node must be an integer >= 1, got {self.nproc_per_node!r}")
        if self.nproc_per_node > 1 and self.framework != "torch":
            raise SpecError(
                f"nproc_per_node applies to torch jobs only, got {self.nproc_per_node} for a tf job"
            )

        given = [k for k in ("script", "module", "command") if getattr(self, k)]
        if self.nproc_per_node > 1 and self.command:
            raise SpecError(
                "nproc_per_node > 1 runs a script or module under torchrun; give script or module, not command"
            )
        if len(given) != 1:
            raise SpecError(
                f"give exactly one of script, module or command, got {', '.join(given) or 'none'}"
            )
        if self.script is not None and (not isinstance(self.script, str) or not self.script.strip()):
            raise SpecError(f"script must be a path, got {self.script!r}")
        if self.command is not None:
            if isinstance(self.command, str) or not all(isinstance(c, str) and c for c in self.command):
                raise SpecError(f"command must be a list of non-empty strings, got {self.command!r}")
            set_(self, "command", tuple(self.command))
        if isinstance(self.args, str) or not all(isinstance(a, str | int | float) for a in self.args):
            raise SpecError(f"args must be a list of strings, got {self.args!r}")
        set_(self, "args", tuple(str(a) for a in self.args))

        if not self.name:
            set_(self, "name", name_from_script(self.script or self.module or (self.command or ["job"])[-1]))
        why = dns1035_error(self.name) if isinstance(self.name, str) else "must be a string"
        if why:
            raise SpecError(f"job name {self.name!r} is not a DNS-1035 label: it {why} (e.g. 'ctr-train-1')")
        if (
            not isinstance(self.namespace, str)
            or not _DNS1123.match(self.namespace)
            or len(self.namespace) > 63
        ):
            raise SpecError(
                f"namespace {self.namespace!r} is not a DNS-1123 label (lower case letters, digits, '-')"
            )

        env = _str_map(self.env, "env", _ENV_NAME)
        for k in env:
            if RESERVED_ENV.match(k):
                raise SpecError(
                    f"env {k} is set by the launcher/operator for every replica; remove it from env"
                )
        set_(self, "env", env)
        if not isinstance(self.secret_env, Mapping):
            raise SpecError(
                f"secret_env must map variable names to secret references, got {type(self.secret_env).__name__}"
            )
        secrets: dict[str, SecretRef] = {}
        for k, v in self.secret_env.items():
            if not isinstance(k, str) or not _ENV_NAME.match(k) or RESERVED_ENV.match(k):
                raise SpecError(f"secret_env has an invalid variable name {k!r}")
            if k in env:
                raise SpecError(f"{k} is in both env and secret_env; keep it in secret_env only")
            secrets[k] = SecretRef.parse(v, k)
        set_(self, "secret_env", dict(sorted(secrets.items())))
        if isinstance(self.env_from_secrets, str):
            raise SpecError("env_from_secrets must be a list of Secret names")
        for s in self.env_from_secrets:
            if not isinstance(s, str) or not _DNS1123.match(s.replace(".", "-")):
                raise SpecError(f"env_from_secrets has an invalid Secret name {s!r}")
        set_(self, "env_from_secrets", tuple(self.env_from_secrets))

        if self.image is not None and (
            not isinstance(self.image, str) or not self.image.strip() or " " in self.image
        ):
            raise SpecError(
                f"image must be a container image reference like 'registry/repo:tag', got {self.image!r}"
            )
        if self.image_pull_policy not in (None, "Always", "IfNotPresent", "Never"):
            raise SpecError(
                f"image_pull_policy must be Always, IfNotPresent or Never, got {self.image_pull_policy!r}"
            )
        set_(self, "resources", _resources(self.resources, "resources"))
        if not isinstance(self.role_resources, Mapping):
            raise SpecError("role_resources must map roles to resources")
        role_res = {}
        for role, res in self.role_resources.items():
            if role not in counts:
                raise SpecError(
                    f"role_resources.{role}: the job has no {role!r} replicas; roles: {', '.join(counts)}"
                )
            role_res[role] = _resources(res, f"role_resources.{role}")
        set_(self, "role_resources", role_res)
        set_(self, "volumes", tuple(Volume.parse(v) for v in self.volumes))
        names = [v.name for v in self.volumes]
        if len(set(names)) != len(names):
            raise SpecError(f"volume names must be unique, got {names}")
        set_(self, "node_selector", _str_map(self.node_selector, "node_selector"))
        set_(self, "tolerations", tuple(_toleration(t) for t in self.tolerations))
        set_(self, "labels", _str_map(self.labels, "labels"))
        for lk, lv in self.labels.items():
            if not _LABEL_VALUE.match(lv) or len(lv) > 63:
                raise SpecError(
                    f"label {lk}={lv!r}: a label value is at most 63 letters, digits, '-', '_' or '.'"
                )
        set_(self, "annotations", _str_map(self.annotations, "annotations"))

        if self.restart_policy not in RESTART_POLICIES:
            raise SpecError(
                f"restart_policy must be one of {', '.join(RESTART_POLICIES)}, got {self.restart_policy!r}"
            )
        if not _is_int(self.backoff_limit) or self.backoff_limit < 0:
            raise SpecError(f"backoff_limit must be an integer >= 0, got {self.backoff_limit!r}")
        for attr in ("ttl_seconds_after_finished", "active_deadline_seconds"):
            value = getattr(self, attr)
            if value is not None and (not _is_int(value) or value < (0 if attr.startswith("ttl") else 1)):
                raise SpecError(f"{attr} must be a whole number of seconds, got {value!r}")
        if self.clean_pod_policy is not None and self.clean_pod_policy not in CLEAN_POD_POLICIES:
            raise SpecError(
                f"clean_pod_policy must be one of {', '.join(CLEAN_POD_POLICIES)}, got {self.clean_pod_policy!r}"
            )
        if self.success_policy not in SUCCESS_POLICIES:
            raise SpecError(
                f"success_policy must be '' (chief, or worker 0) or 'AllWorkers', got {self.success_policy!r}"
            )
        if self.success_policy and self.framework != "tf":
            raise SpecError("success_policy applies to tf jobs only")
        if not isinstance(self.scheduling, Scheduling):
            raise SpecError("scheduling must be a Scheduling")
        total = sum(counts.values())
        if self.scheduling.min_available is not None and self.scheduling.min_available > total:
            raise SpecError(
                f"scheduling.min_available ({self.scheduling.min_available}) exceeds the {total} replicas of the job"
            )
        if self.port is not None and (not _is_int(self.port) or not 1 <= self.port <= 65535):
            raise SpecError(f"port must be an integer in 1..65535, got {self.port!r}")
        if self.enable_dynamic_worker:
            if self.framework != "tf":
                raise SpecError("enable_dynamic_worker applies to tf jobs only")
            if not counts.get("ps"):
                raise SpecError("enable_dynamic_worker needs parameter servers (--ps >= 1)")
        if self.elastic is not None:
            if self.framework != "torch":
                raise SpecError("elastic applies to torch jobs only")
            if not counts.get("worker"):
                raise SpecError("elastic needs a worker replica (--workers >= 2)")
        if self.service_account is not None and not _DNS1123.match(
            str(self.service_account).replace(".", "-")
        ):
            raise SpecError(f"service_account must be a DNS-1123 name, got {self.service_account!r}")

    # -- derived ------------------------------------------------------------------------------

    @property
    def total_replicas(self) -> int:
        """Pods on Kubernetes; replica groups locally (each runs ``nproc_per_node`` processes)."""
        return sum(self.replicas.values())

    @property
    def world_size(self) -> int:
        """Training processes: torch ``WORLD_SIZE``; tf chief + workers."""
        if self.framework == "torch":
            return self.total_replicas * self.nproc_per_node
        return self.replicas.get("chief", 0) + self.replicas.get("worker", 0)

    @property
    def container_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.framework]

    @property
    def effective_clean_pod_policy(self) -> str | None:
        """``Running`` for PS jobs unless set: parameter servers never exit on their own."""
        if self.clean_pod_policy is not None:
            return self.clean_pod_policy
        return "Running" if self.replicas.get("ps") else None

    def replica_keys(self) -> list[tuple[str, int]]:
        """Every replica as ``(role, index)`` in start order."""
        return [(role, i) for role, n in self.replicas.items() for i in range(n)]

    def argv(self) -> tuple[str, ...]:
        """What one replica runs, after the interpreter (``script args`` / ``-m mod args``)."""
        if self.script:
            return (self.script, *self.args)
        if self.module:
            return ("-m", self.module, *self.args)
        return (*(self.command or ()), *self.args)

    def with_args(self, extra: Iterable[str]) -> JobSpec:
        return replace(self, args=(*self.args, *extra))

    def summary(self) -> str:
        """One line describing the resolved job, safe to log: env values of credential-looking
        names are masked and secret references name the Secret only."""
        env = ",".join(f"{k}={'***' if CREDENTIAL_ENV.search(k) else v}" for k, v in sorted(self.env.items()))
        secret = ",".join(f"{k}<-secret:{r.secret}" for k, r in self.secret_env.items())
        parts = [
            f"job={self.name}",
            f"framework={self.framework}",
            "replicas=" + ",".join(f"{r}:{n}" for r, n in self.replicas.items()),
            f"nproc_per_node={self.nproc_per_node}",
            f"restart_policy={self.restart_policy}",
            f"backoff_limit={self.backoff_limit}",
            "run=" + " ".join(self.argv()),
        ]
        if env:
            parts.append(f"env={env}")
        if secret:
            parts.append(f"secret_env={secret}")
        if self.image:
            parts.append(f"image={self.image}")
        return " ".join(parts)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_counts(
        cls,
        framework: str,
        *,
        workers: int = 1,
        ps: int = 0,
        chief: bool = True,
        evaluator: bool = False,
        **kwargs: Any,
    ) -> JobSpec:
        """The CLI mapping: torch ``workers=N`` is 1 master + N-1 workers; tf is ``chief`` (1
        unless False) + ``ps`` + ``workers`` (+1 evaluator)."""
        if not _is_int(workers) or workers < (1 if framework == "torch" or not chief else 0):
            raise SpecError(f"--workers must be an integer >= 1, got {workers!r}")
        if not _is_int(ps) or ps < 0:
            raise SpecError(f"--ps must be an integer >= 0, got {ps!r}")
        if framework == "torch":
            if ps:
                raise SpecError(f"--ps {ps} is for tf jobs; a torch job has no parameter servers (drop --ps)")
            if evaluator:
                raise SpecError("--evaluator is for tf jobs; a torch job has no evaluator")
            replicas = {"master": 1, "worker": workers - 1}
        elif framework == "tf":
            replicas = {"chief": int(chief), "worker": workers, "ps": ps, "evaluator": int(evaluator)}
        else:
            raise SpecError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
        return cls(framework=framework, replicas=replicas, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "job") -> JobSpec:
        """Build from a job file's mapping: the field names of this class, where ``replicas`` may
        be replaced by the CLI shorthand ``workers`` / ``ps`` / ``chief`` / ``evaluator``.

        Raises:
            JobFileError: unknown keys, wrong types or an invalid job, naming ``source``.
        """
        if not isinstance(data, Mapping):
            raise JobFileError(
                f"{source}: a job file must hold a mapping of job fields, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        shorthand = {"workers", "ps", "chief", "evaluator"}
        unknown = set(data) - known - shorthand
        if unknown:
            raise JobFileError(
                f"{source}: unknown field(s) {', '.join(sorted(unknown))}; fields: {', '.join(sorted(known | shorthand))}"
            )
        kw = {k: v for k, v in data.items() if k in known}
        try:
            if isinstance(kw.get("scheduling"), Mapping):
                kw["scheduling"] = _sub(Scheduling, kw["scheduling"], "scheduling")
            if isinstance(kw.get("elastic"), Mapping):
                kw["elastic"] = _sub(Elastic, kw["elastic"], "elastic")
            for key in ("args", "volumes", "tolerations", "env_from_secrets", "command"):
                if key in kw and kw[key] is not None and not isinstance(kw[key], list | tuple):
                    raise SpecError(f"{key} must be a list, got {type(kw[key]).__name__}")
            if "replicas" in kw:
                if set(data) & shorthand:
                    raise SpecError(f"give replicas or {'/'.join(sorted(shorthand))}, not both")
                if "framework" not in kw:
                    raise SpecError("framework is required (tf or torch)")
                return cls(**kw)
            framework = kw.pop("framework", None)
            if framework is None:
                raise SpecError("framework is required (tf or torch)")
            counts = {k: data[k] for k in shorthand if k in data}
            return cls.from_counts(str(framework), **counts, **kw)
        except JobFileError:
            raise
        except SpecError as e:
            raise JobFileError(f"{source}: {e}") from e
        except TypeError as e:
            raise JobFileError(f"{source}: {e}") from e

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> JobSpec:
        """Read a YAML job file (see ``launchers/jobs/*.yaml``).

        Raises:
            JobFileError: the file is unreadable, not YAML, or not a valid job.
        """
        import yaml

        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise JobFileError(
                f"cannot read job file {os.fspath(path)}: {getattr(e, 'strerror', None) or e}"
            ) from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise JobFileError(
                f"job file {os.fspath(path)} is not valid YAML{where}: {getattr(e, 'problem', e)}"
            ) from e
        return cls.from_dict(data, source=f"job file {os.fspath(path)}")


def _sub(cls: type, data: Mapping[str, Any], what: str) -> Any:
    allowed = {f.name for f in fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise SpecError(f"unknown {what} field(s) {sorted(unknown)}; fields: {', '.join(sorted(allowed))}")
    return cls(**dict(data))


def exit_code_of(returncode: int) -> int:
    """A process's exit code as a container runtime reports it: a death by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode
