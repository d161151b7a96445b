"""Command line of the balancer: ``python -m kubeai_train.balance plan|report``.

``plan SPEC.json --num-ps P [--capacity BYTES ...] [--rows free|even]`` prints the plan as one
JSON document; ``report MODEL_DIR|VERSION_URI`` prints the placement report a trainer wrote
(``<model_dir>/placement.json``) or a published version recorded (its metadata's ``placement``).
Bad input prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import fsspec

from kubeai_train.balance.planner import Planner
from kubeai_train.balance.types import BalanceError, VariableLoad
from kubeai_train.repository import ModelRepository, RepositoryError

__all__ = ["main", "read_report"]

PROG = "python -m kubeai_train.balance"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Plan PS shards and placement; print placement reports.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = sub.add_parser("plan", help="plan shards and their PS for a spec of variables")
    plan.add_argument("spec", metavar="SPEC.json")
    plan.add_argument("--num-ps", type=int, required=True, metavar="P")
    plan.add_argument("--capacity", type=int, nargs="+", metavar="BYTES", help="memory capacity per PS")
    plan.add_argument(
        "--rows",
        choices=("free", "even"),
        default="free",
        help="free: shards of a variable may differ in rows; even: as TensorFlow cuts",
    )
    rep = sub.add_parser("report", help="print a placement report")
    rep.add_argument("where", metavar="MODEL_DIR|VERSION_URI")
    return p


def _load_spec(path: str) -> list[VariableLoad]:
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except OSError as e:
        raise BalanceError(f"cannot read spec {path!r}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise BalanceError(f"spec {path!r} is not JSON: {e.msg} at line {e.lineno}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("variables"), list):
        raise BalanceError(f"spec {path!r} must be an object with a 'variables' list")
    return [VariableLoad.from_json(v, f"variables[{i}]") for i, v in enumerate(spec["variables"])]


def read_report(where: str) -> dict[str, Any]:
    """The placement report of a model directory or of a published version (``<root>/<name>/<version>``).

    Raises:
        BalanceError: neither a ``placement.json`` nor a version with a placement record is there.
    """
    base = where.rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(base)
        target = f"{path}/placement.json"
        if fs.exists(target):
            with fs.open(target, "rt") as f:
                return json.load(f)
    except (OSError, ValueError) as e:
        raise BalanceError(f"cannot read {base}/placement.json: {e}") from e
    root, _, rest = base.rpartition("/")
    root, _, name = root.rpartition("/")
    if not rest.isdigit() or not name or not root:
        raise BalanceError(
            f"{where!r} has no placement.json and is not a version URI <root>/<name>/<version>"
        )
    try:
        meta = ModelRepository(root).get(name, int(rest)).metadata
    except RepositoryError as e:
        raise BalanceError(f"{where!r}: {e}") from e
    placement = meta.get("placement") or (meta.get("lineage") or {}).get("placement")
    if not placement:
        raise BalanceError(f"version {name}/{rest} under {root} records no placement")
    return placement


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-PS rows of the report in the issue's shape, from either the new or the trainers' current format."""
    out = []
    if "ps" in report:
        for e in report["ps"]:
            out.append(
                {
                    "task": e.get("task"),
                    "planned_bytes": e.get("planned_bytes", e.get("bytes")),
                    "planned_traffic": e.get("planned_traffic", e.get("traffic")),
                    "measured_bytes": e.get("measured_bytes"),
                    "measured_traffic": e.get("measured_traffic"),
                }
            )
    elif "bytes_per_ps" in report:
        out = [
            {
                "task": t,
                "planned_bytes": b,
                "planned_traffic": None,
                "measured_bytes": None,
                "measured_traffic": None,
            }
            for t, b in enumerate(report["bytes_per_ps"])
        ]
    return out


def _format(report: dict[str, Any]) -> str:
    rows = _rows(report)
    lines = [f"policy {report.get('policy')}  num_ps {report.get('num_ps', len(rows))}"]
    measured = any(r["measured_bytes"] is not None or r["measured_traffic"] is not None for r in rows)
    head = f"{'ps':>4} {'planned_bytes':>16} {'planned_traffic':>16}"
    if measured:
        head += f" {'measured_bytes':>16} {'measured_traffic':>16} {'bytes_ratio':>11} {'traffic_ratio':>13}"
    lines.append(head)

    def num(x: Any) -> str:
        return "-" if x is None else f"{x:.0f}"

    for r in rows:
        line = f"{r['task']:>4} {num(r['planned_bytes']):>16} {num(r['planned_traffic']):>16}"
        if measured:
            br = (
                r["measured_bytes"] / r["planned_bytes"]
                if r["measured_bytes"] is not None and r["planned_bytes"]
                else None
            )
            tr = (
                r["measured_traffic"] / r["planned_traffic"]
                if r["measured_traffic"] is not None and r["planned_traffic"]
                else None
            )
            line += f" {num(r['measured_bytes']):>16} {num(r['measured_traffic']):>16}"
            line += f" {('-' if br is None else f'{br:.3f}'):>11} {('-' if tr is None else f'{tr:.3f}'):>13}"
        lines.append(line)
    for key in ("planned_bytes", "planned_traffic", "measured_bytes", "measured_traffic"):
        vals = [r[key] for r in rows if r[key] is not None]
        if vals and len(vals) == len(rows) and sum(vals) > 0:
            lines.append(f"{key} max/mean {max(vals) / (sum(vals) / len(vals)):.3f}")
    if "applied" in report:
        lines.append(f"applied {report['applied']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0, or 2 after one line on stderr)."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "plan":
            variables = _load_spec(args.spec)
            plan = Planner(rows=args.rows).plan(variables, args.num_ps, args.capacity)
            print(json.dumps(plan.to_json(), indent=1))
        else:
            print(_format(read_report(args.where)))
        return 0
    except (_UsageError, BalanceError) as e:
        print(str(e).splitlines()[0] if str(e) else type(e).__name__, file=sys.stderr)
        return 2
