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

This module holds ``JobSpec``; its parts (``parts``), the errors (``errors``), the field rules
and constants (``_rules``) and job-file parsing (``jobfile``) live in sibling modules and every
name is importable from here as well.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kubeai_train.launch import jobfile
from kubeai_train.launch._rules import (
    CLEAN_POD_POLICIES,
    CPU_BIND_MODES,
    CREDENTIAL_ENV,
    DEFAULT_PORTS,
    DNS1123,
    ENV_NAME,
    FRAMEWORKS,
    LABEL_VALUE,
    RESERVED_ENV,
    RESTART_POLICIES,
    ROLES,
    SUCCESS_POLICIES,
    check_resources,
    check_str_map,
    check_toleration,
    dns1035_error,
    is_int,
    name_from_script,
)
from kubeai_train.launch._rules import GANG_SCHEDULERS as GANG_SCHEDULERS
from kubeai_train.launch.errors import (
    JobFailedError,
    JobFileError,
    LaunchError,
    ManifestError,
    ScriptNotFoundError,
    SpecError,
    SubmitError,
)
from kubeai_train.launch.parts import Elastic, Scheduling, SecretRef, Volume

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


@dataclass(frozen=True)
class JobSpec:
    """One training job; see the module docstring for the replica semantics.

    Exactly one of ``script`` (a Python file), ``module`` (``python -m``) or ``command`` (an
    argv) says what every process runs; ``args`` follow it.

    ``cpu_bind`` (local target only): ``"none"`` (the default) leaves every process on every
    core the launcher may use, as before; ``"cores"`` gives each process a disjoint share of
    them and sets its thread variables to match (``kubeai_train.launch.cpus``). ``none`` is the
    default because a binding assumes the job owns the cores it sees: two jobs launched side by
    side would both be bound to the same first cores. On Kubernetes the thread variables come
    from each role's CPU limit whatever this says; pinning there is the kubelet's CPU manager's.

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
    cpu_bind: str = "none"

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
            if not is_int(n) or n < 0:
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
        if not is_int(self.nproc_per_node) or self.nproc_per_node < 1:
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
            or not DNS1123.match(self.namespace)
            or len(self.namespace) > 63
        ):
            raise SpecError(
                f"namespace {self.namespace!r} is not a DNS-1123 label (lower case letters, digits, '-')"
            )

        env = check_str_map(self.env, "env", ENV_NAME)
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
            if not isinstance(k, str) or not ENV_NAME.match(k) or RESERVED_ENV.match(k):
                raise SpecError(f"secret_env has an invalid variable name {k!r}")
            if k in env:
                raise SpecError(f"{k} is in both env and secret_env; keep it in secret_env only")
            secrets[k] = SecretRef.parse(v, k)
        set_(self, "secret_env", dict(sorted(secrets.items())))
        if isinstance(self.env_from_secrets, str):
            raise SpecError("env_from_secrets must be a list of Secret names")
        for s in self.env_from_secrets:
            if not isinstance(s, str) or not DNS1123.match(s.replace(".", "-")):
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
        set_(self, "resources", check_resources(self.resources, "resources"))
        if not isinstance(self.role_resources, Mapping):
            raise SpecError("role_resources must map roles to resources")
        role_res = {}
        for role, res in self.role_resources.items():
            if role not in counts:
                raise SpecError(
                    f"role_resources.{role}: the job has no {role!r} replicas; roles: {', '.join(counts)}"
                )
            role_res[role] = check_resources(res, f"role_resources.{role}")
        set_(self, "role_resources", role_res)
        set_(self, "volumes", tuple(Volume.parse(v) for v in self.volumes))
        names = [v.name for v in self.volumes]
        if len(set(names)) != len(names):
            raise SpecError(f"volume names must be unique, got {names}")
        set_(self, "node_selector", check_str_map(self.node_selector, "node_selector"))
        set_(self, "tolerations", tuple(check_toleration(t) for t in self.tolerations))
        set_(self, "labels", check_str_map(self.labels, "labels"))
        for lk, lv in self.labels.items():
            if not LABEL_VALUE.match(lv) or len(lv) > 63:
                raise SpecError(
                    f"label {lk}={lv!r}: a label value is at most 63 letters, digits, '-', '_' or '.'"
                )
        set_(self, "annotations", check_str_map(self.annotations, "annotations"))

        if self.restart_policy not in RESTART_POLICIES:
            raise SpecError(
                f"restart_policy must be one of {', '.join(RESTART_POLICIES)}, got {self.restart_policy!r}"
            )
        if not is_int(self.backoff_limit) or self.backoff_limit < 0:
            raise SpecError(f"backoff_limit must be an integer >= 0, got {self.backoff_limit!r}")
        for attr in ("ttl_seconds_after_finished", "active_deadline_seconds"):
            value = getattr(self, attr)
            if value is not None and (not is_int(value) or value < (0 if attr.startswith("ttl") else 1)):
                raise SpecError(f"{attr} must be a whole number of seconds, got {value!r}")
        if self.clean_pod_policy is not None and self.clean_pod_policy not in CLEAN_POD_POLICIES:
            raise SpecError(
                f"clean_pod_policy must be one of {', '.join(CLEAN_POD_POLICIES)}, got {self.clean_pod_policy!r}"
            )
        if self.cpu_bind not in CPU_BIND_MODES:
            raise SpecError(
                f"cpu_bind must be 'none' (every process on every core) or 'cores' (a disjoint share of cores per process), got {self.cpu_bind!r}"
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
        if self.port is not None and (not is_int(self.port) or not 1 <= self.port <= 65535):
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
        if self.service_account is not None and not DNS1123.match(
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
        if self.cpu_bind != "none":
            parts.append(f"cpu_bind={self.cpu_bind}")
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
        if not is_int(workers) or workers < (1 if framework == "torch" or not chief else 0):
            raise SpecError(f"--workers must be an integer >= 1, got {workers!r}")
        if not is_int(ps) or ps < 0:
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
        return jobfile.from_dict(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> JobSpec:
        """Read a YAML job file (see ``launchers/jobs/*.yaml``).

        Raises:
            JobFileError: the file is unreadable, not YAML, or not a valid job.
        """
        return cls.from_dict(jobfile.read_yaml(path), source=f"job file {os.fspath(path)}")


def exit_code_of(returncode: int) -> int:
    """A process's exit code as a container runtime reports it: a death by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode
