"""Command line of the model repository: ``python -m kubeai_train.repository COMMAND ROOT ...``.

Commands: ``list``, ``show``, ``alias``, ``deploy``, ``download``, ``verify``, ``gc`` and
``publish``. Output is for people by default and one JSON document with ``--json``. Bad input
(unsafe names, unknown models / versions / aliases, bad arguments) prints one line on stderr
and exits 2; a failed integrity check exits 1 naming the file. Credentials come from the
environment or ``-o key=value`` and are never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from kubeai_train.repository.errors import (
    IntegrityError,
    InvalidArgumentError,
    RepositoryError,
)
from kubeai_train.repository.repo import ModelRepository
from kubeai_train.repository.types import Deployment, ModelVersion

__all__ = ["build_parser", "main"]

PROG = "python -m kubeai_train.repository"


class _UsageError(Exception):
    """Bad command-line input; becomes one stderr line and exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _version_arg(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"version must be an integer >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"version must be an integer >= 1, got {s!r}")
    return v


def _option(s: str) -> tuple[str, str]:
    key, sep, value = s.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"storage option must be KEY=VALUE, got {s.split('=')[0]!r}...")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "root", metavar="ROOT", help="repository root: local path or fsspec URL (oss://bucket/models)"
    )
    common.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    common.add_argument(
        "-o",
        "--storage-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (wins over the environment); repeatable",
    )
    common.add_argument(
        "--commit", choices=("auto", "rename", "marker"), default="auto", help=argparse.SUPPRESS
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log what the repository does")

    p = _Parser(
        prog=PROG, description="Versioned model repository: list, inspect, alias, deploy, verify, gc."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("list", parents=[common], help="models, or the versions of one model")
    s.add_argument("name", nargs="?", metavar="NAME")

    s = sub.add_parser("show", parents=[common], help="one version: metadata, lineage, aliases, deployments")
    s.add_argument("name", metavar="NAME")
    s.add_argument("version", nargs="?", type=_version_arg, metavar="VERSION", help="default: the newest")
    s.add_argument("--alias")

    s = sub.add_parser("alias", parents=[common], help="list, show, set or delete aliases")
    s.add_argument("name", metavar="NAME")
    s.add_argument("alias", nargs="?", metavar="ALIAS")
    s.add_argument("version", nargs="?", type=_version_arg, metavar="VERSION", help="point ALIAS here")
    s.add_argument("--delete", action="store_true", help="remove ALIAS")

    s = sub.add_parser("deploy", parents=[common], help="record a deployment, or list where versions run")
    s.add_argument("name", metavar="NAME")
    s.add_argument(
        "version", nargs="?", type=_version_arg, metavar="VERSION", help="without it: list deployments"
    )
    s.add_argument("--service", help="the inference service (required with VERSION)")
    s.add_argument("--environment")
    s.add_argument("--endpoint")
    s.add_argument("--note")
    s.add_argument("--undeploy", action="store_true", help="record that the service no longer runs VERSION")
    s.add_argument("--history", action="store_true", help="list every record, not only current deployments")

    s = sub.add_parser("download", parents=[common], help="copy a version to a local directory, verified")
    s.add_argument("name", metavar="NAME")
    s.add_argument("dest", metavar="DEST")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--version", type=_version_arg)
    g.add_argument("--alias")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("verify", parents=[common], help="check every file's sha256 against the manifest")
    s.add_argument("name", metavar="NAME")
    s.add_argument("version", nargs="?", type=_version_arg, metavar="VERSION", help="default: the newest")
    s.add_argument("--alias")
    s.add_argument("--all", action="store_true", help="every committed version")

    s = sub.add_parser("gc", parents=[common], help="remove killed publishers' debris and old versions")
    s.add_argument("name", nargs="?", metavar="NAME", help="default: every model")
    s.add_argument(
        "--keep-last", type=int, metavar="N", help="keep the newest N versions (and aliased/deployed)"
    )
    s.add_argument(
        "--grace", type=float, metavar="SECONDS", help="debris younger than this is left (default 3600)"
    )
    s.add_argument("--dry-run", action="store_true")

    s = sub.add_parser("publish", parents=[common], help="publish a directory as the next version")
    s.add_argument("name", metavar="NAME")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--metadata", help="JSON object, or @file.json")
    s.add_argument("--parent", help="parent version (N or model:N)")
    s.add_argument("--dataset", help="training data URI")
    return p


# ------------------------------------------------------------------------------------ output
def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _kv(d: Any) -> str:
    if not d:
        return "-"
    if isinstance(d, dict):
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
    return str(d)


def _lineage(repo: ModelRepository, mv: ModelVersion, limit: int = 20) -> list[dict[str, Any]]:
    """The parent chain, newest first, as far as the repository still holds it."""
    chain: list[dict[str, Any]] = []
    parent = mv.parent
    while parent and len(chain) < limit:
        entry: dict[str, Any] = {"name": parent["name"], "version": parent["version"], "present": True}
        try:
            p = repo.get(parent["name"], parent["version"])
        except RepositoryError:
            entry["present"] = False
            chain.append(entry)
            break
        entry["metrics"] = p.metrics
        chain.append(entry)
        parent = p.parent
    return chain


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _deployed_by_version(deps: list[Deployment]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for d in deps:
        out.setdefault(d.version, []).append(d.service + (f"({d.environment})" if d.environment else ""))
    return out


# ------------------------------------------------------------------------------------ commands
def _cmd_list(repo: ModelRepository, a: argparse.Namespace) -> Any:
    if a.name is None:
        rows: list[dict[str, Any]] = []
        for n in repo.models():
            vs = repo.versions(n)
            rows.append(
                {
                    "name": n,
                    "versions": len(vs),
                    "latest": vs[-1].version if vs else None,
                    "aliases": repo.aliases(n),
                }
            )
        if not a.json:
            if not rows:
                print(f"no models under {repo.root_uri}")
            _print_table(
                [[r["name"], str(r["versions"]), str(r["latest"] or "-"), _kv(r["aliases"])] for r in rows],
                ["MODEL", "VERSIONS", "LATEST", "ALIASES"],
            )
        return {"root": repo.root_uri, "models": rows}
    versions = repo.versions(a.name)
    aliases = repo.aliases(a.name)
    deployed = _deployed_by_version(repo.deployments(a.name))
    by_version: dict[int, list[str]] = {}
    for al, v in aliases.items():
        by_version.setdefault(v, []).append(al)
    out: list[dict[str, Any]] = [
        {
            "version": mv.version,
            "created": mv.created,
            "size": mv.size,
            "metrics": mv.metrics,
            "aliases": by_version.get(mv.version, []),
            "deployed": deployed.get(mv.version, []),
            "uri": mv.uri,
        }
        for mv in versions
    ]
    if not a.json:
        if not out:
            print(f"model {a.name!r} has no committed versions under {repo.root_uri}")
        _print_table(
            [
                [
                    str(r["version"]),
                    (r["created"] or "-")[:19],
                    _human_size(r["size"]),
                    _kv(r["metrics"]),
                    ",".join(r["aliases"]) or "-",
                    ",".join(r["deployed"]) or "-",
                ]
                for r in out
            ],
            ["VERSION", "CREATED", "SIZE", "METRICS", "ALIASES", "DEPLOYED"],
        )
    return {"name": a.name, "versions": out}


def _cmd_show(repo: ModelRepository, a: argparse.Namespace) -> Any:
    mv = repo.get(a.name, a.version, a.alias)
    aliases = sorted(al for al, v in repo.aliases(a.name).items() if v == mv.version)
    deps = [d for d in repo.deployments(a.name) if d.version == mv.version]
    lineage = _lineage(repo, mv)
    doc = mv.to_json()
    doc.update(aliases=aliases, deployments=[d.to_json() for d in deps], lineage=lineage)
    if a.json:
        return doc
    m = mv.metadata
    ds = m.get("dataset") or {}
    parent = mv.parent
    rows = [
        ("uri", mv.uri),
        ("created", mv.created or "-"),
        ("framework", m.get("framework") or "-"),
        ("metrics", _kv(mv.metrics)),
        ("params", _kv(m.get("params"))),
        ("signature", json.dumps(m.get("signature")) if m.get("signature") is not None else "-"),
        (
            "dataset",
            " ".join(f"{k}={ds[k]}" for k in ("uri", "partition", "digest") if ds.get(k)) if ds else "-",
        ),
        ("code version", m.get("code_version") or "-"),
        ("parent", f"{parent['name']}/{parent['version']}" if parent else "-"),
        (
            "lineage",
            " <- ".join(
                [f"{mv.name}/{mv.version}"]
                + [f"{e['name']}/{e['version']}" + ("" if e["present"] else " (gone)") for e in lineage]
            ),
        ),
        ("aliases", ", ".join(aliases) or "-"),
        (
            "deployed",
            ", ".join(d.service + (f" ({d.environment})" if d.environment else "") for d in deps) or "-",
        ),
        (
            "files",
            f"{len(mv.manifest)} files, {_human_size(mv.size)}, digest {m.get('manifest_digest', '-')[:16]}",
        ),
    ]
    print(f"{mv.name}/{mv.version}")
    for k, v in rows:
        print(f"  {k:<13}{v}")
    return doc


def _cmd_alias(repo: ModelRepository, a: argparse.Namespace) -> Any:
    if a.delete:
        if a.alias is None or a.version is not None:
            raise _UsageError(f"{PROG} alias: --delete needs ALIAS and no VERSION")
        repo.remove_alias(a.name, a.alias)
        if not a.json:
            print(f"removed alias {a.name}/{a.alias}")
        return {"name": a.name, "alias": a.alias, "deleted": True}
    if a.alias is None:
        aliases = repo.aliases(a.name)
        if not a.json:
            for al, v in aliases.items():
                print(f"{al} -> {v}")
            if not aliases:
                print(f"model {a.name!r} has no aliases")
        return {"name": a.name, "aliases": aliases}
    if a.version is None:
        mv = repo.get(a.name, alias=a.alias)
        if not a.json:
            print(f"{a.alias} -> {mv.version}  {mv.uri}")
        return {"name": a.name, "alias": a.alias, "version": mv.version, "uri": mv.uri}
    mv = repo.set_alias(a.name, a.alias, a.version)
    if not a.json:
        print(f"{a.name}/{a.alias} -> {mv.version}")
    return {"name": a.name, "alias": a.alias, "version": mv.version, "uri": mv.uri}


def _cmd_deploy(repo: ModelRepository, a: argparse.Namespace) -> Any:
    if a.version is None:
        if a.service or a.undeploy:
            raise _UsageError(f"{PROG} deploy: --service/--undeploy need a VERSION")
        deps = repo.deployments(a.name, history=a.history)
        if not a.json:
            _print_table(
                [
                    [
                        str(d.version),
                        d.service,
                        d.environment or "-",
                        d.status,
                        d.recorded[:19],
                        d.endpoint or "-",
                    ]
                    for d in deps
                ],
                ["VERSION", "SERVICE", "ENV", "STATUS", "RECORDED", "ENDPOINT"],
            )
        return {"name": a.name, "deployments": [d.to_json() for d in deps]}
    if not a.service:
        raise _UsageError(f"{PROG} deploy: recording a deployment needs --service NAME")
    d = repo.record_deployment(
        a.name,
        a.version,
        a.service,
        environment=a.environment,
        endpoint=a.endpoint,
        status="undeployed" if a.undeploy else "deployed",
        note=a.note,
    )
    if not a.json:
        print(
            f"{d.name}/{d.version} {d.status} on {d.service}"
            + (f" ({d.environment})" if d.environment else "")
        )
    return d.to_json()


def _cmd_download(repo: ModelRepository, a: argparse.Namespace) -> Any:
    path = repo.download(a.name, a.version, a.dest, alias=a.alias, overwrite=a.overwrite)
    mv = repo.get(a.name, a.version, a.alias)
    if not a.json:
        print(
            f"{mv.name}/{mv.version} -> {path} ({len(mv.manifest)} files, {_human_size(mv.size)}, verified)"
        )
    return {
        "name": mv.name,
        "version": mv.version,
        "path": str(path),
        "files": len(mv.manifest),
        "bytes": mv.size,
    }


def _cmd_verify(repo: ModelRepository, a: argparse.Namespace) -> Any:
    if a.all and (a.version is not None or a.alias is not None):
        raise _UsageError(f"{PROG} verify: --all takes no VERSION or --alias")
    targets = [mv.version for mv in repo.versions(a.name)] if a.all else [None]
    results: list[dict[str, Any]] = []
    failed: IntegrityError | None = None
    for v in targets:
        try:
            mv = repo.verify(a.name, v, alias=a.alias)
            results.append({"version": mv.version, "ok": True, "files": len(mv.manifest)})
            if not a.json:
                print(f"{mv.name}/{mv.version}: ok ({len(mv.manifest)} files, {_human_size(mv.size)})")
        except IntegrityError as e:
            results.append({"version": e.version, "ok": False, "file": e.path, "error": str(e)})
            failed = failed or e
            if not a.json:
                print(f"{a.name}/{e.version}: FAILED: {e}")
    doc = {"name": a.name, "results": results, "ok": failed is None}
    if failed is not None:
        if a.json:
            print(json.dumps(doc, indent=1))
        raise failed
    return doc


def _cmd_gc(repo: ModelRepository, a: argparse.Namespace) -> Any:
    report = repo.gc(a.name, keep_last=a.keep_last, grace_seconds=a.grace, dry_run=a.dry_run)
    if not a.json:
        verb = "would remove" if a.dry_run else "removed"
        for n, v in report.removed_versions:
            print(f"{verb} version {n}/{v}")
        for p in report.removed_debris:
            print(f"{verb} debris {p}")
        for n, v, why in report.kept:
            print(f"kept {n}/{v} ({why})")
        for n, v, why in report.damaged:
            print(f"damaged {n}/{v}: {why} (left in place; run verify)")
        if not (report.removed_versions or report.removed_debris or report.kept or report.damaged):
            print("nothing to collect")
    return report.to_json()


def _cmd_publish(repo: ModelRepository, a: argparse.Namespace) -> Any:
    metadata = None
    if a.metadata:
        text = a.metadata
        if text.startswith("@"):
            try:
                with open(text[1:], encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise _UsageError(
                    f"{PROG} publish: cannot read --metadata file {text[1:]!r}: {e.strerror}"
                ) from e
        try:
            metadata = json.loads(text)
        except ValueError as e:
            raise _UsageError(f"{PROG} publish: --metadata is not JSON ({e})") from e
        if not isinstance(metadata, dict):
            raise _UsageError(
                f"{PROG} publish: --metadata must be a JSON object, got {type(metadata).__name__}"
            )
    parent: int | str | None = a.parent
    if a.parent is not None and a.parent.isdigit():
        parent = int(a.parent)
    mv = repo.publish(a.name, a.path, metadata, parent=parent, dataset=a.dataset)
    if not a.json:
        print(
            f"published {mv.name}/{mv.version} at {mv.uri} ({len(mv.manifest)} files, {_human_size(mv.size)})"
        )
    return mv.to_json()


_COMMANDS = {
    "list": _cmd_list,
    "show": _cmd_show,
    "alias": _cmd_alias,
    "deploy": _cmd_deploy,
    "download": _cmd_download,
    "verify": _cmd_verify,
    "gc": _cmd_gc,
    "publish": _cmd_publish,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 integrity or storage failure, 2 bad input)."""
    try:
        a = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
        repo = ModelRepository(a.root, dict(a.storage_option), commit=a.commit)
        doc = _COMMANDS[a.command](repo, a)
        if a.json:
            print(json.dumps(doc, indent=1))
        return 0
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except IntegrityError as e:
        print(f"{PROG}: integrity check failed: {e}", file=sys.stderr)
        return 1
    except (ValueError, LookupError, FileNotFoundError, InvalidArgumentError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except (RepositoryError, OSError) as e:
        print(f"{PROG}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
