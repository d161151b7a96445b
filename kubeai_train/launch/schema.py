"""Strict schema checks of TFJob / PyTorchJob manifests, derived from the installed typed models.

The training-operator SDK (kubeflow-training) describes every field of a TFJob and a PyTorchJob
as a typed model (``KubeflowOrgV1TFJob`` ... with ``openapi_types`` and ``attribute_map``), and
those models reach down into the kubernetes client's own (``V1PodTemplateSpec``, ``V1Container``,
...). Walking them gives the whole schema of a manifest with nothing beside the installed
packages: every key must be a field of its model (a typo is an error, where the API server would
silently prune it), every value must have the field's type, and a field the models require (their
setters refuse ``None``) must be present. Value checks the models make themselves (setters that
raise ``ValueError``) are applied too, plus the operator's enums the SDK only documents.

The API server's own check (the CRD installed in the cluster) is applied at submit time by a
server-side dry run; see ``kubeai_train.launch.k8s.submit``.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Mapping
from typing import Any

from kubeflow.training import models as kf_models
from kubernetes import client as k8s_client

__all__ = ["ROOT_MODELS", "manifest_errors"]

ROOT_MODELS = {"TFJob": "KubeflowOrgV1TFJob", "PyTorchJob": "KubeflowOrgV1PyTorchJob"}
API_VERSION = "kubeflow.org/v1"

# Kubernetes quantities are int-or-string on the wire ("cpu: 2" is valid), while the client's
# models type them as plain strings.
_QUANTITIES = {
    ("V1ResourceRequirements", "limits"),
    ("V1ResourceRequirements", "requests"),
    ("V1VolumeResourceRequirements", "limits"),
    ("V1VolumeResourceRequirements", "requests"),
    ("V1EmptyDirVolumeSource", "size_limit"),
    ("V1PodSpec", "overhead"),
}

# Enums of the training-operator's CRDs (kubeflow/training-operator v1.9, pkg/apis/kubeflow.org/v1)
# that the SDK's models only name in their docstrings.
_ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("KubeflowOrgV1ReplicaSpec", "restart_policy"): ("Always", "OnFailure", "Never", "ExitCode"),
    ("KubeflowOrgV1RunPolicy", "clean_pod_policy"): ("None", "Running", "All"),
    ("KubeflowOrgV1TFJobSpec", "success_policy"): ("", "AllWorkers"),
    ("KubeflowOrgV1ElasticPolicy", "rdzv_backend"): ("c10d", "etcd", "etcd-v2"),
}

_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\(([^,]+), (.+)\)$")


def _model(name: str) -> Any:
    cls = getattr(kf_models, name, None) or getattr(k8s_client, name, None)
    if cls is None or not hasattr(cls, "openapi_types"):
        raise LookupError(f"no typed model {name} in kubeflow-training or the kubernetes client")
    return cls


@functools.cache
def _fields(name: str) -> tuple[dict[str, tuple[str, str]], frozenset[str]]:
    """``{json name: (python attribute, type)}`` and the json names the model requires."""
    cls = _model(name)
    fields = {cls.attribute_map[attr]: (attr, typ) for attr, typ in cls.openapi_types.items()}
    required = set()
    for json_name, (attr, _) in fields.items():
        try:
            _probe(cls, attr, None)
        except ValueError:
            required.add(json_name)
    return fields, frozenset(required)


def _probe(cls: Any, attr: str, value: Any) -> None:
    """Run the model's own setter on ``value`` (raises ValueError where the model refuses it)."""
    obj = object.__new__(cls)
    obj.local_vars_configuration = k8s_client.Configuration()
    setattr(obj, attr, value)


def _join(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


class _Walker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path or '<root>'}: {message}")

    def value(self, value: Any, typ: str, path: str, owner: tuple[str, str] | None = None) -> None:
        if value is None:
            return  # an explicit null is the same as leaving the field out
        if m := _LIST.match(typ):
            if not isinstance(value, list):
                self.error(path, f"must be a list, got {_type_name(value)}")
                return
            for i, item in enumerate(value):
                self.value(item, m.group(1), _join(path, i), owner)
            return
        if m := _DICT.match(typ):
            if not isinstance(value, Mapping):
                self.error(path, f"must be an object, got {_type_name(value)}")
                return
            for key, item in value.items():
                if not isinstance(key, str):
                    self.error(_join(path, key), f"keys must be strings, got {_type_name(key)}")
                self.value(item, m.group(2), _join(path, key), owner)
            return
        if typ == "object":
            return  # int-or-string and free-form values
        if typ in ("str", "datetime", "date"):
            quantity = owner in _QUANTITIES and isinstance(value, int | float) and not isinstance(value, bool)
            if not isinstance(value, str) and not quantity:
                self.error(path, f"must be a string, got {_type_name(value)} {value!r}")
            return
        if typ == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                self.error(path, f"must be an integer, got {_type_name(value)} {value!r}")
            return
        if typ == "float":
            if not isinstance(value, int | float) or isinstance(value, bool):
                self.error(path, f"must be a number, got {_type_name(value)} {value!r}")
            return
        if typ == "bool":
            if not isinstance(value, bool):
                self.error(path, f"must be true or false, got {_type_name(value)} {value!r}")
            return
        self.model(value, typ, path)

    def model(self, value: Any, name: str, path: str) -> None:
        if not isinstance(value, Mapping):
            self.error(path, f"must be an object ({name}), got {_type_name(value)}")
            return
        fields, required = _fields(name)
        unknown = sorted(str(k) for k in value if k not in fields)
        if unknown:
            named = []
            for key in unknown:
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.75)
                named.append(f"{key} (did you mean {close[0]}?)" if close else key)
            self.error(path, f"unknown field(s) {', '.join(named)}")
        for key in sorted(required - {k for k, v in value.items() if v is not None}):
            self.error(_join(path, key), "required field missing")
        cls = _model(name)
        for key, item in value.items():
            if key not in fields or item is None:
                continue
            attr, typ = fields[key]
            before = len(self.errors)
            self.value(item, typ, _join(path, key), (name, attr))
            if len(self.errors) > before:
                continue
            allowed = _ENUMS.get((name, attr))
            if allowed is not None and item not in allowed:
                self.error(_join(path, key), f"{item!r} is not one of {', '.join(map(repr, allowed))}")
            elif typ in ("str", "int", "bool", "float"):
                try:
                    _probe(cls, attr, item)
                except ValueError as e:
                    self.error(_join(path, key), str(e).replace("`", "'"))


def manifest_errors(manifest: Any) -> list[str]:
    """Every strict schema violation of a TFJob / PyTorchJob manifest, as ``path: problem`` lines
    (``[]`` when there is none). Paths use the manifest's own (JSON) field names, e.g.
    ``spec.tfReplicaSpecs.Worker: unknown field(s) replica (did you mean replicas?)``."""
    if not isinstance(manifest, Mapping):
        return [f"<root>: a manifest must be an object, got {_type_name(manifest)}"]
    kind = manifest.get("kind")
    if kind not in ROOT_MODELS:
        return [f"kind: must be TFJob or PyTorchJob, got {kind!r}"]
    walker = _Walker()
    if manifest.get("apiVersion") != API_VERSION:
        walker.error("apiVersion", f"must be {API_VERSION} for a {kind}, got {manifest.get('apiVersion')!r}")
    walker.model(manifest, ROOT_MODELS[str(kind)], "")
    meta = manifest.get("metadata")
    if not isinstance(meta, Mapping) or not (meta.get("name") or meta.get("generateName")):
        walker.error("metadata.name", "required field missing (or metadata.generateName)")
    return walker.errors
