"""The Kubernetes target: a ``JobSpec`` as a kubeflow.org/v1 TFJob or PyTorchJob.

``render`` builds the manifest with the training-operator SDK's typed models
(kubeflow-training 1.9.4) and the kubernetes client's pod models, serialised by
``ApiClient.sanitize_for_serialization``; the same spec always gives byte-identical YAML
(``to_yaml``). ``validate`` checks a manifest offline, in strict mode, against the schema the
installed typed models describe (``kubeai_train.launch.schema``: unknown fields, wrong types and
missing required fields are errors naming the field's path, where the API server would prune a
typo silently) and against the operator's admission-webhook rules (v1.9.4). ``submit`` first
asks the API server for a server-side dry run (``dryRun=All``: the cluster's own CRD and
admission applied, nothing stored), then posts it with the official client
(``CustomObjectsApi.create_namespaced_custom_object``); ``wait`` polls the job's conditions
until it Succeeded or Failed (``--wait``, for schedulers).

Rendering choices: containers are named ``tensorflow`` / ``pytorch`` with the port
``tfjob-port`` 2222 / ``pytorchjob-port`` 23456; ``restartPolicy`` and ``backoffLimit`` are
always explicit; PS jobs default to ``cleanPodPolicy: Running`` (parameter servers never exit);
``nprocPerNode`` is always explicit and several processes per node run under ``torchrun``;
credentials appear only as Secret references (``secretKeyRef`` / ``envFrom``); a role with a
CPU limit gets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (TF: ``TF_NUM_INTRAOP_THREADS`` /
``TF_NUM_INTEROP_THREADS`` too) of ``ceil(limit / nprocPerNode)``, at least 1, unless the job
sets them itself (``cpus.limit_threads``); without a limit none are set. Gang
scheduling: Volcano through ``runPolicy.schedulingPolicy`` (+ ``schedulerName: volcano``),
Kueue through the ``kueue.x-k8s.io/queue-name`` label.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml
from kubeflow.training import models as kf
from kubernetes import client as k8s_client

from kubeai_train.launch import cpus
from kubeai_train.launch.schema import manifest_errors
from kubeai_train.launch.types import (
    CREDENTIAL_ENV,
    JobSpec,
    ManifestError,
    SubmitError,
    dns1035_error,
)

__all__ = [
    "api_client_for",
    "check_documents",
    "job_state",
    "manifest_problems",
    "render",
    "submit",
    "to_yaml",
    "validate",
    "wait",
]

GROUP = "kubeflow.org"
VERSION = "v1"
KINDS = {"tf": "TFJob", "torch": "PyTorchJob"}
PLURALS = {"TFJob": "tfjobs", "PyTorchJob": "pytorchjobs"}
CONTAINER = {"TFJob": "tensorflow", "PyTorchJob": "pytorch"}
PORT_NAME = {"TFJob": "tfjob-port", "PyTorchJob": "pytorchjob-port"}
REPLICA_FIELD = {"TFJob": "tfReplicaSpecs", "PyTorchJob": "pytorchReplicaSpecs"}
REPLICA_TYPES = {
    "TFJob": {"chief": "Chief", "master": "Master", "ps": "PS", "worker": "Worker", "evaluator": "Evaluator"},
    "PyTorchJob": {"master": "Master", "worker": "Worker"},
}
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MANAGED_BY = ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue")


# -- rendering --------------------------------------------------------------------------------


def _command(spec: JobSpec) -> list[str]:
    if spec.command:
        return [*spec.command, *spec.args]
    if spec.nproc_per_node > 1:
        # torchrun reads PET_NNODES / PET_NODE_RANK / PET_NPROC_PER_NODE / PET_MASTER_* set by the operator
        target = [spec.script] if spec.script else ["-m", spec.module or ""]
        return ["torchrun", *target, *spec.args]
    return ["python", "-u", *spec.argv()]


def _container(spec: JobSpec, kind: str, role: str) -> k8s_client.V1Container:
    for name in spec.env:
        if CREDENTIAL_ENV.search(name):
            raise ManifestError(
                f"env {name} looks like a credential; a manifest may only reference it: "
                f"use secret_env: {{{name}: <secret-name>/<key>}} (or --secret-env {name}=<secret>/<key>)"
            )
    res = spec.role_resources.get(role) or spec.resources
    values = dict(spec.env)
    threads = cpus.limit_threads((res.get("limits") or {}).get("cpu"), spec.nproc_per_node)
    if threads is not None:
        # the runtimes would size their pools from the node's cores, not the limit
        values.update(cpus.thread_env(spec.framework, threads, keep={*spec.env, *spec.secret_env}))
    env = [k8s_client.V1EnvVar(name=k, value=v) for k, v in sorted(values.items())]
    env += [
        k8s_client.V1EnvVar(
            name=k,
            value_from=k8s_client.V1EnvVarSource(
                secret_key_ref=k8s_client.V1SecretKeySelector(name=ref.secret, key=ref.key)
            ),
        )
        for k, ref in spec.secret_env.items()
    ]
    env_from = [
        k8s_client.V1EnvFromSource(secret_ref=k8s_client.V1SecretEnvSource(name=s))
        for s in spec.env_from_secrets
    ]
    resources = (
        k8s_client.V1ResourceRequirements(
            requests=dict(res.get("requests") or {}) or None, limits=dict(res.get("limits") or {}) or None
        )
        if res
        else None
    )
    mounts = [
        k8s_client.V1VolumeMount(
            name=v.name, mount_path=v.mount_path, read_only=v.read_only or None, sub_path=v.sub_path
        )
        for v in spec.volumes
    ]
    return k8s_client.V1Container(
        name=CONTAINER[kind],
        image=spec.image,
        image_pull_policy=spec.image_pull_policy,
        command=_command(spec),
        working_dir=spec.working_dir,
        env=env or None,
        env_from=env_from or None,
        ports=[k8s_client.V1ContainerPort(name=PORT_NAME[kind], container_port=spec.container_port)],
        resources=resources,
        volume_mounts=mounts or None,
    )


def _pod_template(spec: JobSpec, kind: str, role: str) -> k8s_client.V1PodTemplateSpec:
    volumes = [
        k8s_client.V1Volume(
            name=v.name,
            persistent_volume_claim=k8s_client.V1PersistentVolumeClaimVolumeSource(
                claim_name=v.claim_name, read_only=v.read_only or None
            ),
        )
        for v in spec.volumes
    ]
    tolerations = [
        k8s_client.V1Toleration(
            key=t.get("key"),
            operator=t.get("operator"),
            value=t.get("value"),
            effect=t.get("effect"),
            toleration_seconds=t.get("tolerationSeconds"),
        )
        for t in spec.tolerations
    ]
    pod = k8s_client.V1PodSpec(
        containers=[_container(spec, kind, role)],
        volumes=volumes or None,
        node_selector=dict(spec.node_selector) or None,
        tolerations=tolerations or None,
        priority_class_name=spec.scheduling.priority_class,
        scheduler_name="volcano" if spec.scheduling.gang == "volcano" else None,
        service_account_name=spec.service_account,
    )
    return k8s_client.V1PodTemplateSpec(spec=pod)


def _run_policy(spec: JobSpec) -> Any:
    sched = spec.scheduling
    scheduling_policy = None
    if sched.gang == "volcano":
        scheduling_policy = kf.KubeflowOrgV1SchedulingPolicy(
            min_available=sched.min_available or spec.total_replicas,
            queue=sched.queue,
            priority_class=sched.priority_class,
        )
    return kf.KubeflowOrgV1RunPolicy(
        backoff_limit=spec.backoff_limit,
        clean_pod_policy=spec.effective_clean_pod_policy,
        ttl_seconds_after_finished=spec.ttl_seconds_after_finished,
        active_deadline_seconds=spec.active_deadline_seconds,
        scheduling_policy=scheduling_policy,
    )


def render(spec: JobSpec) -> dict[str, Any]:
    """The TFJob / PyTorchJob for ``spec`` as a plain dict, validated (``validate``).

    Raises:
        ManifestError: no image, a credential in ``env``, or a manifest the CRD / webhook refuse.
    """
    kind = KINDS[spec.framework]
    if not spec.image:
        raise ManifestError(
            "the k8s target needs a container image: --image registry/repo:tag (or image: in the job file)"
        )
    labels = dict(spec.labels)
    if spec.scheduling.gang == "kueue" and spec.scheduling.queue:
        labels[KUEUE_QUEUE_LABEL] = spec.scheduling.queue
    metadata = k8s_client.V1ObjectMeta(
        name=spec.name,
        namespace=spec.namespace,
        labels=labels or None,
        annotations=dict(spec.annotations) or None,
    )
    replica_specs = {
        REPLICA_TYPES[kind][role]: kf.KubeflowOrgV1ReplicaSpec(
            replicas=n, restart_policy=spec.restart_policy, template=_pod_template(spec, kind, role)
        )
        for role, n in spec.replicas.items()
    }
    job: Any
    if kind == "TFJob":
        job = kf.KubeflowOrgV1TFJob(
            api_version=f"{GROUP}/{VERSION}",
            kind=kind,
            metadata=metadata,
            spec=kf.KubeflowOrgV1TFJobSpec(
                run_policy=_run_policy(spec),
                success_policy=spec.success_policy or None,
                enable_dynamic_worker=spec.enable_dynamic_worker or None,
                tf_replica_specs=replica_specs,
            ),
        )
    else:
        elastic = None
        if spec.elastic is not None:
            el = spec.elastic
            elastic = kf.KubeflowOrgV1ElasticPolicy(
                min_replicas=el.min_replicas,
                max_replicas=el.max_replicas,
                max_restarts=el.max_restarts,
                rdzv_backend=el.rdzv_backend,
                rdzv_id=el.rdzv_id,
            )
        job = kf.KubeflowOrgV1PyTorchJob(
            api_version=f"{GROUP}/{VERSION}",
            kind=kind,
            metadata=metadata,
            spec=kf.KubeflowOrgV1PyTorchJobSpec(
                run_policy=_run_policy(spec),
                elastic_policy=elastic,
                nproc_per_node=str(spec.nproc_per_node),
                pytorch_replica_specs=replica_specs,
            ),
        )
    manifest: dict[str, Any] = k8s_client.ApiClient().sanitize_for_serialization(job)
    validate(manifest)
    return manifest


class _Dumper(yaml.SafeDumper):
    """Double-quotes strings holding line breaks or unprintable characters: PyYAML's plain and
    single-quoted styles fold U+0085 / U+2028 and alike into spaces on the way back."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = '"' if not value.isprintable() or any(c in value for c in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(manifest: Mapping[str, Any]) -> str:
    """Deterministic YAML: the same manifest always gives the same bytes (no line wrapping,
    non-ASCII escaped) and loads back to the same manifest."""
    return yaml.dump(
        dict(manifest),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=1 << 30,
        allow_unicode=False,
    )


# -- validation -------------------------------------------------------------------------------


def schema_errors(manifest: Mapping[str, Any]) -> list[str]:
    """Strict schema violations of ``manifest`` (``path: problem``), or [] when none: unknown
    fields, wrong types and missing required fields, from the installed typed models
    (``kubeai_train.launch.schema``)."""
    return manifest_errors(manifest)


def webhook_errors(manifest: Mapping[str, Any]) -> list[str]:
    """The operator's admission-webhook rules (pkg/webhooks/{tensorflow,pytorch}, v1.9.4), plus
    known replica type names (a typo would otherwise be accepted and never run)."""
    errs: list[str] = []
    kind = manifest.get("kind")
    if kind not in PLURALS:
        return [f"kind: must be TFJob or PyTorchJob, got {kind!r}"]
    meta = manifest.get("metadata") or {}
    name = meta.get("name", "") if isinstance(meta, Mapping) else ""
    why = dns1035_error(str(name))
    if why:
        errs.append(f"metadata.name: {name!r} is not a DNS-1035 label: it {why}")
    spec = manifest.get("spec") or {}
    run_policy = spec.get("runPolicy") or {}
    managed = run_policy.get("managedBy") if isinstance(run_policy, Mapping) else None
    if managed is not None and managed not in MANAGED_BY:
        errs.append(f"spec.runPolicy.managedBy: {managed!r} is not supported; use {' or '.join(MANAGED_BY)}")
    field = REPLICA_FIELD[str(kind)]
    replicas = spec.get(field)
    if not replicas:
        return [*errs, f"spec.{field}: must be required"]
    container_name = CONTAINER[str(kind)]
    known = {v.lower(): v for v in REPLICA_TYPES[str(kind)].values()}
    chief_or_master = 0
    for rtype, rspec in replicas.items():
        path = f"spec.{field}.{rtype}"
        if str(rtype).lower() not in known:
            errs.append(f"{path}: unknown replica type {rtype!r}; types: {', '.join(known.values())}")
        if str(rtype).lower() in ("chief", "master"):
            chief_or_master += 1
        containers = (((rspec or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            errs.append(f"{path}.template.spec.containers: must be specified")
        for i, c in enumerate(containers):
            if not (c or {}).get("image"):
                errs.append(f"{path}.template.spec.containers[{i}].image: must be required")
        if containers and not any((c or {}).get("name") == container_name for c in containers):
            errs.append(
                f"{path}.template.spec.containers: must have at least one container with name {container_name}"
            )
        if kind == "PyTorchJob":
            n = (rspec or {}).get("replicas")
            if str(rtype).lower() == "master" and n != 1:
                errs.append(f"{path}.replicas: must be 1")
            elif n is not None and isinstance(n, int) and n < 1:
                errs.append(f"{path}.replicas: must be at least 1")
    if kind == "TFJob" and chief_or_master > 1:
        errs.append(f"spec.{field}: must not have more than 1 Chief or Master role")
    if kind == "PyTorchJob" and spec.get("elasticPolicy") is not None:
        if not any(str(r).lower() == "worker" for r in replicas):
            errs.append(f"spec.{field}.Worker: must be configured if elastic policy is used")
        if (spec.get("elasticPolicy") or {}).get("nProcPerNode") is not None and spec.get(
            "nprocPerNode"
        ) is not None:
            errs.append("spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
    return errs


def manifest_problems(manifest: Any) -> list[str]:
    """Every problem of ``manifest``, one per entry: the strict schema's, or, for a manifest of
    the right shape, the webhook rules' (the API server's order: structure, then admission)."""
    return schema_errors(manifest) or webhook_errors(manifest)


def check_documents(text: str, source: str = "<stdin>") -> list[tuple[str, list[str]]]:
    """Each YAML document of ``text`` (empty ones skipped) as ``(label, problems)``; the label
    names the source, the document's index and, when it has them, its kind and name
    (``jobs.yaml#1 TFJob ctr``). A document that is not YAML is one problem."""
    out: list[tuple[str, list[str]]] = []
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        return [(source, [f"not YAML{at}: {problem}"])]
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        label = f"{source}#{i}"
        if isinstance(doc, Mapping):
            meta = doc.get("metadata")
            name = meta.get("name") if isinstance(meta, Mapping) else None
            label += "".join(f" {v}" for v in (doc.get("kind"), name) if isinstance(v, str) and v)
        out.append((label, manifest_problems(doc)))
    return out


def validate(manifest: Mapping[str, Any]) -> None:
    """Check ``manifest`` against the strict schema of the installed typed models and the
    operator's webhook rules, offline (the cluster's own CRD is applied by ``submit``'s dry run).

    Raises:
        ManifestError: listing every violation by path (one line).
    """
    errors = manifest_problems(manifest)
    if errors:
        name = (manifest.get("metadata") or {}).get("name", "?")
        raise ManifestError(f"{manifest.get('kind', 'manifest')} {name} is invalid: " + "; ".join(errors))


# -- submission -------------------------------------------------------------------------------


def _status_message(body: object) -> str:
    try:
        data = json.loads(body) if isinstance(body, str | bytes) else {}
    except ValueError:
        data = {}
    msg = data.get("message") if isinstance(data, dict) else None
    return re.sub(r"\s+", " ", str(msg))[:500] if msg else ""


def api_client_for(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient`` from a kubeconfig ($KUBECONFIG / ~/.kube/config by
    default) or, failing that, the in-cluster service account.

    Raises:
        SubmitError: neither works (the message names the file, never its credentials).
    """
    from kubernetes import config as k8s_config

    try:
        k8s_config.load_kube_config(config_file=kubeconfig, context=context)
    except (k8s_config.ConfigException, OSError) as e:
        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise SubmitError(
                f"no Kubernetes configuration: {where} unusable ({type(e).__name__}) and not in a cluster; pass --kubeconfig"
            ) from e
    return k8s_client.ApiClient()


def submit(
    manifest: Mapping[str, Any],
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    api_client: Any = None,
    server_dry_run: bool = True,
) -> dict[str, Any]:
    """Create the job through the Kubernetes API; returns the created object.

    The manifest is validated offline first; then the API server is asked for a server-side dry
    run (``dryRun=All``), which applies the cluster's own installed CRD and admission webhooks
    without storing anything; only when that passes is the job created.

    Args:
        manifest: a rendered (and validated) TFJob / PyTorchJob.
        kubeconfig, context: which cluster (see ``api_client_for``).
        api_client: a ready ``kubernetes.client.ApiClient`` (overrides kubeconfig).
        server_dry_run: ask for the dry run before the create (default on).

    Raises:
        ManifestError: the manifest is invalid offline, or the API server's dry run refused it
            as invalid (nothing is created).
        SubmitError: no cluster configuration, the API refused the job (status and reason), or
            the server could not be reached. Credentials never appear in the message.
    """
    validate(manifest)
    if api_client is None:
        api_client = api_client_for(kubeconfig, context)
    if server_dry_run:
        _create(manifest, api_client, dry_run=True)
    return _create(manifest, api_client, dry_run=False)


# Status reasons with which the API server refuses an object as such (not the request's context).
_INVALID_REASONS = {"Invalid", "BadRequest", "FieldValueInvalid", "UnsupportedMediaType"}


def _create(manifest: Mapping[str, Any], api_client: Any, *, dry_run: bool) -> dict[str, Any]:
    from kubernetes.client.rest import ApiException

    api = k8s_client.CustomObjectsApi(api_client)
    kind = str(manifest["kind"])
    meta = manifest.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    what = f"{kind} {namespace}/{meta.get('name')}"
    extra = {"dry_run": "All"} if dry_run else {}
    try:
        created = api.create_namespaced_custom_object(
            group=GROUP,
            version=VERSION,
            namespace=namespace,
            plural=PLURALS[kind],
            body=dict(manifest),
            _request_timeout=30,
            **extra,
        )
    except ApiException as e:
        detail = _status_message(e.body)
        reason = _status_reason(e.body)
        stage = " (server-side dry run)" if dry_run else ""
        message = (
            f"the API server refused {what}{stage}: {e.status} {e.reason}{': ' + detail if detail else ''}"
        )
        if dry_run and (e.status == 422 or reason in _INVALID_REASONS):
            raise ManifestError(message) from e
        raise SubmitError(message) from e
    except Exception as e:  # urllib3 connection errors and alike: name the server, not the credentials
        raise SubmitError(
            f"cannot reach the Kubernetes API at {_host(api_client)}: {type(e).__name__}"
        ) from e
    return dict(created) if isinstance(created, Mapping) else {}


def _status_reason(body: object) -> str:
    try:
        data = json.loads(body) if isinstance(body, str | bytes) else {}
    except ValueError:
        return ""
    return str(data.get("reason") or "") if isinstance(data, dict) else ""


def _host(api_client: Any) -> str:
    return str(getattr(getattr(api_client, "configuration", None), "host", "?"))


def job_state(obj: Mapping[str, Any]) -> tuple[str, str]:
    """The job's current condition ``(type, message)`` from its status (``Pending`` before any):
    the last condition whose status is "True", as the operator appends them."""
    conditions = ((obj.get("status") or {}).get("conditions")) or []
    current = [c for c in conditions if isinstance(c, Mapping) and c.get("status") == "True"]
    if not current:
        return "Pending", ""
    last = current[-1]
    return str(last.get("type", "Unknown")), str(last.get("message", "") or "")


def wait(
    kind: str,
    name: str,
    namespace: str,
    *,
    api_client: Any,
    poll: float = 10.0,
    timeout: float | None = None,
    on_change: Any = None,
    max_errors: int = 5,
) -> tuple[str, str]:
    """Poll a submitted job until it is ``Succeeded`` or ``Failed`` (or ``timeout`` seconds
    pass: ``Timeout``); returns ``(state, message)``. ``on_change(state, message)`` is called
    whenever the state changes.

    Raises:
        SubmitError: the job disappeared, or the API failed ``max_errors`` times in a row.
    """
    import time as _time

    from kubernetes.client.rest import ApiException

    api = k8s_client.CustomObjectsApi(api_client)
    deadline = None if timeout is None else _time.monotonic() + timeout
    last: tuple[str, str] | None = None
    errors = 0
    while True:
        try:
            obj = api.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURALS[kind], name, _request_timeout=30
            )
            errors = 0
        except ApiException as e:
            if e.status == 404:
                raise SubmitError(
                    f"{kind} {namespace}/{name} no longer exists (deleted while waiting?)"
                ) from e
            errors += 1
            if errors >= max_errors:
                raise SubmitError(
                    f"reading {kind} {namespace}/{name} failed {errors} times: {e.status} {e.reason}"
                ) from e
            obj = None
        except Exception as e:
            errors += 1
            if errors >= max_errors:
                raise SubmitError(
                    f"cannot reach the Kubernetes API at {_host(api_client)}: {type(e).__name__}"
                ) from e
            obj = None
        if obj is not None:
            state = job_state(obj)
            if state != last:
                last = state
                if on_change is not None:
                    on_change(*state)
            if state[0] in ("Succeeded", "Failed"):
                return state
        if deadline is not None and _time.monotonic() >= deadline:
            return "Timeout", f"still {last[0] if last else 'unknown'} after {timeout:g}s"
        _time.sleep(poll)
