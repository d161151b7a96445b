"""What a valid job is made of: the frameworks, roles and policies the training-operator
accepts, the names and quantities Kubernetes accepts, and the checks of single fields that the
``JobSpec`` and its parts share. Every check raises ``SpecError`` naming the field and the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubeai_train.launch.errors import SpecError

__all__ = [
    "CLEAN_POD_POLICIES",
    "CPU_BIND_MODES",
    "CREDENTIAL_ENV",
    "DEFAULT_PORTS",
    "DNS1035",
    "DNS1123",
    "ENV_NAME",
    "FRAMEWORKS",
    "GANG_SCHEDULERS",
    "LABEL_VALUE",
    "QUANTITY",
    "RESERVED_ENV",
    "RESTART_POLICIES",
    "ROLES",
    "SUCCESS_POLICIES",
    "check_resources",
    "check_str_map",
    "check_toleration",
    "dns1035_error",
    "is_int",
    "name_from_script",
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
# local target: "none" leaves every process on every core; "cores" gives each a share (launch.cpus)
CPU_BIND_MODES = ("none", "cores")
DEFAULT_PORTS = {"tf": 2222, "torch": 23456}

# Variables the launcher (or the operator, or torchrun) owns; a job may not set them itself.
RESERVED_ENV = re.compile(
    r"^(TF_CONFIG|MASTER_ADDR|MASTER_PORT|RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|"
    r"GROUP_WORLD_SIZE|ROLE_RANK|ROLE_NAME|ROLE_WORLD_SIZE|PET_.*|TORCHELASTIC_.*)$"
)
# Names whose values are credentials: never put a value in a manifest or a log.
CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dns1035_error(name: str) -> str | None:
    """Why ``name`` is not a DNS-1035 label (what metadata.name must be), or None when it is."""
    if not name:
        return "must not be empty"
    if len(name) > 63:
        return f"must be at most 63 characters, got {len(name)}"
    if not DNS1035.match(name):
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


def check_str_map(value: object, what: str, key_re: re.Pattern[str] | None = None) -> dict[str, str]:
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


def check_resources(value: object, what: str) -> dict[str, dict[str, str]]:
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
        q = check_str_map(quantities, f"{what}.{kind}")
        for res, amount in q.items():
            if not QUANTITY.match(amount):
                raise SpecError(
                    f"{what}.{kind}.{res} must be a Kubernetes quantity like 2, 500m or 4Gi, got {amount!r}"
                )
        out[kind] = q
    return out


_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def check_toleration(value: object) -> dict[str, Any]:
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
    if "tolerationSeconds" in value and not is_int(value["tolerationSeconds"]):
        raise SpecError(
            f"toleration tolerationSeconds must be an integer, got {value['tolerationSeconds']!r}"
        )
    return {k: value[k] for k in sorted(value)}
