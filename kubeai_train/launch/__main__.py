"""``python -m kubeai_train.launch``: one job spec, from flags or a YAML file, to a target.

::

    python -m kubeai_train.launch --framework tf --ps 2 --workers 2 [--no-chief] [--evaluator] script.py [args...]
    python -m kubeai_train.launch --framework torch --workers 2 [--nproc-per-node N] script.py [args...]
    python -m kubeai_train.launch --cpu-bind cores ...   # locally, a disjoint share of cores per process
    python -m kubeai_train.launch ... --target k8s --image IMG --name NAME [--namespace NS] --dry-run
    python -m kubeai_train.launch ... --target k8s --image IMG --name NAME
    python -m kubeai_train.launch --job job.yaml [script args...]
    python -m kubeai_train.launch validate FILE.yaml [FILE.yaml ...]

Everything after the script (or after ``-m MODULE``, or after ``--``) belongs to the script,
even when it looks like a launcher flag. Bad input prints one line on stderr and exits 2
before anything starts; a failed job exits with the failing process's exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from kubeai_train.launch.types import (
    JobSpec,
    LaunchError,
    ManifestError,
    Scheduling,
    ScriptNotFoundError,
    SecretRef,
    SpecError,
    SubmitError,
)

PROG = "python -m kubeai_train.launch"


class UsageError(SpecError):
    """Bad command-line usage."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [launcher flags] (script.py | -m module) [script args...]\n       {PROG} --job FILE [launcher flags] [script args...]",
        description="Run one training job locally (supervised processes) or on Kubernetes (TFJob / PyTorchJob). "
        "Everything after the script (or after --) is the script's.",
    )
    p.add_argument("--framework", help="tf or torch")
    p.add_argument(
        "--workers", type=int, help="torch: processes in total (1 master + N-1 workers); tf: worker replicas"
    )
    p.add_argument("--ps", type=int, help="tf: parameter servers")
    p.add_argument(
        "--chief",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tf: a chief replica (default on)",
    )
    p.add_argument("--evaluator", action="store_true", default=None, help="tf: one evaluator replica")
    p.add_argument("--nproc-per-node", type=int, help="torch: processes per replica, as torchrun")
    p.add_argument("-m", "--module", help="run a module (python -m MODULE) instead of a script")
    p.add_argument("--job", help="a YAML job file (launchers/jobs/*.yaml)")
    p.add_argument("--target", choices=("local", "k8s"), default="local")
    p.add_argument("--name", help="job name (a DNS-1035 label); default from the script name")
    p.add_argument("--namespace")
    p.add_argument("--image", help="k8s: container image")
    p.add_argument(
        "--dry-run", action="store_true", help="k8s: print the validated manifest instead of submitting"
    )
    p.add_argument(
        "--kubeconfig", help="k8s: kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster)"
    )
    p.add_argument("--context", help="k8s: kubeconfig context")
    p.add_argument(
        "--wait",
        action="store_true",
        help="k8s: after submitting, wait for the job to end; exit 0 Succeeded, 1 Failed, 124 after --timeout",
    )
    p.add_argument(
        "--poll-interval", type=float, default=10.0, help="k8s --wait: seconds between status reads"
    )
    p.add_argument("--restart-policy", help="Never (default), OnFailure, ExitCode or Always")
    p.add_argument("--backoff-limit", type=int, help="restarts allowed per job (default 3)")
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable (repeatable)"
    )
    p.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="KEY=SECRET/KEY",
        help="k8s: a variable from a Secret (repeatable); locally taken from this environment",
    )
    p.add_argument("--cpu", help="k8s: cpu request and limit per replica, e.g. 4 or 500m")
    p.add_argument("--memory", help="k8s: memory request and limit per replica, e.g. 8Gi")
    p.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="CLAIM:/PATH[:ro]",
        help="k8s: mount a PVC (repeatable)",
    )
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--queue", help="k8s: Volcano queue or Kueue LocalQueue")
    p.add_argument("--priority-class")
    p.add_argument("--gang", help="k8s: gang scheduling through volcano or kueue")
    p.add_argument("--min-available", type=int, help="k8s: volcano minAvailable (default all replicas)")
    p.add_argument("--ttl-seconds-after-finished", type=int)
    p.add_argument("--clean-pod-policy", help="k8s: None, Running (default for PS jobs) or All")
    p.add_argument(
        "--cpu-bind",
        metavar="none|cores",
        help="local: 'cores' gives each process a disjoint share of the launcher's cores (round-robin when "
        "there are fewer cores than processes) and thread variables to match; default 'none' (every core)",
    )
    p.add_argument("--log-dir", help="local: per-process logs (default a new temporary directory)")
    p.add_argument(
        "--timeout",
        type=float,
        help="stop the local job (k8s --wait: stop waiting) after this many seconds (exit 124)",
    )
    p.add_argument("--grace-period", type=float, default=5.0, help="local: seconds from SIGTERM to SIGKILL")
    p.add_argument(
        "--success-grace",
        type=float,
        default=10.0,
        help="local: seconds workers may run on after the job succeeded",
    )
    return p


def split_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into the launcher's flags and the script with its arguments.

    The first token that is neither a launcher flag nor a flag's value starts the script part;
    so does ``--``; ``-m MODULE`` ends the launcher part after MODULE. With ``--job`` (the file
    names the script) an unknown flag also starts the script's arguments.
    """
    actions = parser._option_string_actions  # argparse's own table of flags -> actions
    own: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return own, list(argv[i + 1 :])
        if not tok.startswith("-") or tok == "-":
            return own, list(argv[i:])
        flag = tok.split("=", 1)[0]
        action = actions.get(flag)
        if action is None and any(a.split("=", 1)[0] == "--job" for a in own):
            return own, list(argv[i:])  # --job FILE [script args...]: the file names the script
        if action is None:
            raise UsageError(f"unknown launcher flag {tok}; script flags go after the script ({PROG} --help)")
        own.append(tok)
        takes_value = action.nargs != 0 and "=" not in tok
        if takes_value:
            if i + 1 >= len(argv):
                raise UsageError(f"{flag} needs a value")
            own.append(argv[i + 1])
            i += 1
        i += 1
        if action.dest == "module":
            return own, list(argv[i:])
    return own, []


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {v!r}")
        out[key] = val
    return out


def spec_from_args(ns: argparse.Namespace, rest: list[str]) -> JobSpec:
    """The JobSpec the flags describe (``rest``: the script and its arguments)."""
    overrides: dict[str, Any] = {}
    if ns.name is not None:
        overrides["name"] = ns.name
    if ns.namespace is not None:
        overrides["namespace"] = ns.namespace
    if ns.image is not None:
        overrides["image"] = ns.image
    if ns.restart_policy is not None:
        overrides["restart_policy"] = ns.restart_policy
    if ns.backoff_limit is not None:
        overrides["backoff_limit"] = ns.backoff_limit
    if ns.ttl_seconds_after_finished is not None:
        overrides["ttl_seconds_after_finished"] = ns.ttl_seconds_after_finished
    if ns.clean_pod_policy is not None:
        overrides["clean_pod_policy"] = ns.clean_pod_policy
    if ns.cpu_bind is not None:
        overrides["cpu_bind"] = ns.cpu_bind
    if ns.volume:
        overrides["volumes"] = tuple(ns.volume)
    if ns.node_selector:
        overrides["node_selector"] = _pairs(ns.node_selector, "--node-selector")
    if ns.cpu or ns.memory:
        q = {k: v for k, v in (("cpu", ns.cpu), ("memory", ns.memory)) if v}
        overrides["resources"] = {"requests": q, "limits": dict(q)}
    if any(v is not None for v in (ns.queue, ns.priority_class, ns.gang, ns.min_available)):
        overrides["scheduling"] = Scheduling(
            queue=ns.queue, priority_class=ns.priority_class, gang=ns.gang, min_available=ns.min_available
        )
    env = _pairs(ns.env, "--env")
    secrets = {k: SecretRef.parse(v, k) for k, v in _pairs(ns.secret_env, "--secret-env").items()}

    if ns.job:
        shaping = [
            f
            for f, v in (
                ("--framework", ns.framework),
                ("--workers", ns.workers),
                ("--ps", ns.ps),
                ("--chief/--no-chief", ns.chief),
                ("--evaluator", ns.evaluator),
                ("--nproc-per-node", ns.nproc_per_node),
                ("--module", ns.module),
            )
            if v is not None
        ]
        if shaping:
            raise UsageError(
                f"{shaping[0]} conflicts with --job {ns.job}: the job file defines the replicas and the command; edit it instead"
            )
        spec = JobSpec.from_yaml(ns.job)
        if env or secrets:
            overrides["env"] = {**spec.env, **env}
            overrides["secret_env"] = {**spec.secret_env, **secrets}
        spec = replace(spec, **overrides) if overrides else spec
        return spec.with_args(rest) if rest else spec

    if ns.framework is None:
        raise UsageError("--framework is required (tf or torch), or give --job FILE")
    if ns.module is None and not rest:
        raise UsageError(
            "no script given: put the training script (and its arguments) after the launcher flags"
        )
    kw: dict[str, Any] = dict(overrides)
    if ns.module is not None:
        kw["module"], kw["args"] = ns.module, tuple(rest)
    else:
        kw["script"], kw["args"] = rest[0], tuple(rest[1:])
    if env:
        kw["env"] = env
    if secrets:
        kw["secret_env"] = secrets
    if ns.nproc_per_node is not None:
        kw["nproc_per_node"] = ns.nproc_per_node
    workers = ns.workers if ns.workers is not None else (1 if ns.framework == "torch" else 1)
    return JobSpec.from_counts(
        ns.framework,
        workers=workers,
        ps=ns.ps or 0,
        chief=ns.chief is not False,
        evaluator=bool(ns.evaluator),
        **kw,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["validate"]:
        return validate_main(argv[1:])
    parser = build_parser()
    try:
        own, rest = split_argv(parser, argv)
        ns = parser.parse_args(own)
        if ns.workers is not None and ns.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {ns.workers}")
        spec = spec_from_args(ns, rest)
        if ns.target == "k8s":
            return _k8s(spec, ns)
        from kubeai_train.launch.local import LocalJob

        job = LocalJob(
            spec,
            log_dir=ns.log_dir,
            timeout=ns.timeout,
            grace_period=ns.grace_period,
            success_grace=ns.success_grace,
        )
        job.check_inputs()
    except (SpecError, ScriptNotFoundError, ManifestError) as e:
        _fail(str(e))
        return 2
    except LaunchError as e:
        _fail(str(e))
        return 1
    try:
        return job.run()
    except LaunchError as e:
        _fail(str(e))
        return 1


def _k8s(spec: JobSpec, ns: argparse.Namespace) -> int:
    try:
        from kubeai_train.launch import k8s
    except ImportError as e:
        raise SpecError(
            f"--target k8s needs the kubernetes clients: pip install 'kubeai_train[k8s]' ({e.name} missing)"
        ) from e
    manifest = k8s.render(spec)
    text = k8s.to_yaml(manifest)
    if ns.dry_run:
        sys.stdout.write(text)
        return 0
    sys.stderr.write(f"[launch] {spec.summary()} target=k8s\n")
    kind = manifest["kind"]
    try:
        api_client = k8s.api_client_for(ns.kubeconfig, ns.context)
        created = k8s.submit(manifest, api_client=api_client)
        meta = created.get("metadata", {}) if isinstance(created, dict) else {}
        where = f"{meta.get('namespace', spec.namespace)}/{meta.get('name', spec.name)}"
        sys.stdout.write(f"{kind} {where} created\n")
        sys.stdout.flush()
        if not ns.wait:
            return 0

        def show(state: str, message: str) -> None:
            sys.stderr.write(f"[launch] {kind} {where}: {state}{': ' + message if message else ''}\n")
            sys.stderr.flush()

        state, message = k8s.wait(
            kind,
            spec.name,
            spec.namespace,
            api_client=api_client,
            poll=ns.poll_interval,
            timeout=ns.timeout,
            on_change=show,
        )
    except SubmitError as e:
        _fail(str(e))
        return 1
    if state == "Succeeded":
        return 0
    if state == "Timeout":
        _fail(
            f"{kind} {where}: {message}; it keeps running (kubectl delete {kind.lower()} -n {spec.namespace} {spec.name} stops it)"
        )
        return 124
    _fail(f"{kind} {where} failed: {message or 'see kubectl describe'}")
    return 1


def validate_main(paths: Sequence[str]) -> int:
    """``validate FILE...``: check existing TFJob / PyTorchJob manifests (several documents per
    file, ``-`` for stdin) offline and strictly, like kubeconform: one line per problem naming the
    document and the field path, one ``valid`` line per valid document. Exit 0 when all are
    valid, 1 when any is not, 2 on bad usage (no file, a file that cannot be read)."""
    if not paths or any(p.startswith("-") and p != "-" for p in paths):
        bad = next((p for p in paths if p.startswith("-") and p != "-"), None)
        _fail(f"usage: {PROG} validate FILE.yaml [FILE.yaml ...]" + (f" (unknown flag {bad})" if bad else ""))
        return 2
    try:
        from kubeai_train.launch import k8s
    except ImportError as e:
        _fail(f"validate needs the kubernetes clients: pip install 'kubeai_train[k8s]' ({e.name} missing)")
        return 2
    texts = {}
    for path in paths:
        try:
            texts[path] = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as e:
            _fail(f"cannot read {path}: {e.strerror or e}")
            return 2
    invalid = 0
    for path, text in texts.items():
        for where, problems in k8s.check_documents(text, path):
            if problems:
                invalid += 1
                for problem in problems:
                    sys.stdout.write(f"{where}: {' '.join(problem.split())}\n")
            else:
                sys.stdout.write(f"{where}: valid\n")
    sys.stdout.flush()
    return 1 if invalid else 0


def _fail(message: str) -> None:
    line = " ".join(message.split())  # one line, whatever the message held
    sys.stderr.write(f"{PROG}: error: {line}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
