"""``python -m kubeai_train.balance`` in a subprocess: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kubeai_train.repository import ModelRepository


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "kubeai_train.balance", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=cwd,
        timeout=120,
    )


SPEC = {
    "batch_size": 512,
    "variables": [
        {
            "name": "emb",
            "shape": [1000000, 16],
            "dtype": "float32",
            "kind": "embedding",
            "nbytes": 192000000,
            "traffic": 131072,
        },
        {
            "name": "mlp/kernel",
            "shape": [512, 256],
            "dtype": "float32",
            "kind": "dense",
            "nbytes": 1572864,
            "traffic": 1048576,
        },
        {"name": "global_step", "shape": [], "dtype": "int64", "kind": "state", "nbytes": 8, "traffic": 16},
    ],
}


def _spec(tmp_path, spec):
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(spec))
    return str(p)


def test_plan_prints_shards_whose_rows_add_up(tmp_path):
    r = _run("plan", _spec(tmp_path, SPEC), "--num-ps", "4")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["num_ps"] == 4 and out["lower_bound"] >= 1.0
    rows = {}
    for s in out["shards"]:
        assert 0 <= s["ps"] < 4
        rows[s["variable"]] = rows.get(s["variable"], 0) + s["rows"]
    assert rows == {"emb": 1000000, "mlp/kernel": 512, "global_step": 1}
    assert set(out["max_over_mean"]) == {"memory", "traffic"}


def test_plan_with_capacities(tmp_path):
    r = _run("plan", _spec(tmp_path, SPEC), "--num-ps", "2", "--capacity", "150000000", "50000000")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ps"][0]["planned_bytes"] <= 150000000 and out["ps"][1]["planned_bytes"] <= 50000000


@pytest.mark.parametrize(
    ("change", "args", "needle"),
    [
        (lambda s: s["variables"][0].update(nbytes=-5), ["--num-ps", "2"], "nbytes must be >= 0"),
        (None, ["--num-ps", "0"], "num_ps must be an integer >= 1"),
        (lambda s: s["variables"][0].update(kind="sparse"), ["--num-ps", "2"], "kind must be one of"),
        (None, ["--num-ps", "2", "--capacity", "1000", "1000"], "capacities add up"),
        (
            lambda s: s["variables"][2].update(nbytes=70_000_000),  # a state variable is never cut
            ["--num-ps", "4", "--capacity", *["68000000"] * 4],
            "'global_step'",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, change, args, needle):
    spec = json.loads(json.dumps(SPEC))
    if change:
        change(spec)
    r = _run("plan", _spec(tmp_path, spec), *args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr


def test_missing_spec_and_usage_errors(tmp_path):
    r = _run("plan", str(tmp_path / "none.json"), "--num-ps", "2")
    assert r.returncode == 2 and "cannot read spec" in r.stderr and len(r.stderr.splitlines()) == 1
    r = _run("plan")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1


def test_report_from_model_dir_in_the_trainers_format(tmp_path):
    report = {
        "policy": "round_robin",
        "num_ps": 2,
        "bytes_max_over_mean": 1.5,
        "ps": [
            {"task": 0, "bytes": 300, "traffic": 10.0, "variables": ["a"]},
            {"task": 1, "bytes": 100, "traffic": 30.0, "variables": ["b"]},
        ],
    }
    (tmp_path / "placement.json").write_text(json.dumps(report))
    r = _run("report", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "policy round_robin" in r.stdout and "planned_bytes max/mean 1.500" in r.stdout


def test_report_from_a_published_version_with_measured_loads(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "saved_model.pb").write_bytes(b"x")
    placement = {
        "policy": "balanced",
        "num_ps": 2,
        "ps": [
            {
                "task": 0,
                "planned_bytes": 200,
                "planned_traffic": 10,
                "measured_bytes": 210,
                "measured_traffic": 12,
            },
            {
                "task": 1,
                "planned_bytes": 200,
                "planned_traffic": 10,
                "measured_bytes": 190,
                "measured_traffic": 8,
            },
        ],
    }
    mv = ModelRepository(str(tmp_path / "repo")).publish(
        "ctr", str(export), metadata={"placement": placement}
    )
    r = _run("report", mv.uri)
    assert r.returncode == 0, r.stderr
    assert "measured_traffic max/mean 1.200" in r.stdout and "1.050" in r.stdout
    r = _run("report", str(tmp_path / "repo" / "ctr" / "7"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
