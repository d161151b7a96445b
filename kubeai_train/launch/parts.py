"""The parts of a ``JobSpec`` that are values of their own: a Secret reference, a mounted
volume, the Kubernetes scheduling settings and the PyTorchJob elastic policy. Each validates
itself and (``SecretRef``, ``Volume``) parses the CLI and job-file shorthands."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from kubeai_train.launch._rules import DNS1123, GANG_SCHEDULERS, is_int
from kubeai_train.launch.errors import SpecError

__all__ = ["Elastic", "Scheduling", "SecretRef", "Volume"]


@dataclass(frozen=True)
class SecretRef:
    """A value read from a Kubernetes Secret (``secretKeyRef``); never the value itself.

    Locally the variable is taken from the launcher's own environment under the same name.
    """

    secret: str
    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.secret, str) or not DNS1123.match(self.secret.replace(".", "-")):
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
        if not isinstance(self.claim_name, str) or not DNS1123.match(self.claim_name.replace(".", "-")):
            raise SpecError(f"volume claim_name must be a DNS-1123 name, got {self.claim_name!r}")
        if not isinstance(self.mount_path, str) or not self.mount_path.startswith("/"):
            raise SpecError(f"volume mount_path must be an absolute path, got {self.mount_path!r}")
        if not self.name:
            object.__setattr__(self, "name", re.sub(r"[^a-z0-9-]", "-", self.claim_name.lower())[:63])
        if not DNS1123.match(self.name) or len(self.name) > 63:
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
                not isinstance(value, str) or not DNS1123.match(value.replace(".", "-"))
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
            if not is_int(self.min_available) or self.min_available < 1:
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
            if value is not None and (not is_int(value) or value < (0 if attr == "max_restarts" else 1)):
                raise SpecError(
                    f"elastic.{attr} must be an integer >= {0 if attr == 'max_restarts' else 1}, got {value!r}"
                )
        if self.min_replicas and self.max_replicas and self.min_replicas > self.max_replicas:
            raise SpecError(
                f"elastic.min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.rdzv_backend not in ("c10d", "etcd", "etcd-v2"):
            raise SpecError(f"elastic.rdzv_backend must be c10d, etcd or etcd-v2, got {self.rdzv_backend!r}")
