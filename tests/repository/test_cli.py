"""The repository CLI (``python -m kubeai_train.repository``): human and --json output, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubeai_train.repository.cli import main

from .conftest import make_export


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def populated(repo_root, tmp_path):
    """A root with ctr/1 (aliased production, deployed) and ctr/2 (child of 1)."""
    repo = repo_root.repo()
    repo.publish(
        "ctr",
        make_export(tmp_path / "a", seed=1),
        metadata={"metrics": {"auc": 0.7}, "dataset": "oss://b/d1"},
    )
    repo.publish("ctr", make_export(tmp_path / "b", seed=2), metadata={"metrics": {"auc": 0.8}}, parent=1)
    repo.set_alias("ctr", "production", 1)
    repo.record_deployment("ctr", 1, "rec-svc", environment="prod")
    return repo_root, repo


def test_list_show_human_and_json(populated, capsys):
    root, _ = populated
    code, out, err = run(capsys, "list", root.url)
    assert code == 0 and err == ""
    assert out.splitlines()[0].split() == ["MODEL", "VERSIONS", "LATEST", "ALIASES"]
    assert out.splitlines()[1].split() == ["ctr", "2", "2", "production=1"]
    code, out, _ = run(capsys, "list", root.url, "ctr", "--json")
    doc = json.loads(out)
    assert [(v["version"], v["aliases"], v["deployed"], v["metrics"]["auc"]) for v in doc["versions"]] == [
        (1, ["production"], ["rec-svc(prod)"], 0.7),
        (2, [], [], 0.8),
    ]
    code, out, _ = run(capsys, "show", root.url, "ctr")
    assert code == 0
    lines = dict(
        line.strip().split(None, 1)
        for line in out.splitlines()[1:]
        if line.strip() and not line.startswith("  code")
    )
    assert out.splitlines()[0] == "ctr/2"
    assert lines["parent"] == "ctr/1" and lines["lineage"] == "ctr/2 <- ctr/1"
    assert lines["metrics"] == "auc=0.8"
    code, out, _ = run(capsys, "show", root.url, "ctr", "--alias", "production", "--json")
    doc = json.loads(out)
    assert doc["version"] == 1 and doc["aliases"] == ["production"]
    assert doc["metadata"]["dataset"]["uri"] == "oss://b/d1"
    assert [d["service"] for d in doc["deployments"]] == ["rec-svc"]
    assert {f["path"] for f in doc["manifest"]} >= {"saved_model.pb"}


def test_alias_deploy_verify_download_gc_commands(populated, capsys, tmp_path):
    root, repo = populated
    assert run(capsys, "alias", root.url, "ctr", "staging", "2")[1].strip() == "ctr/staging -> 2"
    code, out, _ = run(capsys, "alias", root.url, "ctr", "--json")
    assert json.loads(out)["aliases"] == {"production": 1, "staging": 2}
    assert run(capsys, "alias", root.url, "ctr", "staging", "--delete")[0] == 0
    assert repo.aliases("ctr") == {"production": 1}

    code, out, _ = run(
        capsys, "deploy", root.url, "ctr", "2", "--service", "rec-svc", "--environment", "prod"
    )
    assert (code, out.strip()) == (0, "ctr/2 deployed on rec-svc (prod)")
    code, out, _ = run(capsys, "deploy", root.url, "ctr", "--json")
    assert [(d["service"], d["version"]) for d in json.loads(out)["deployments"]] == [("rec-svc", 2)]

    code, out, _ = run(capsys, "verify", root.url, "ctr", "--all")
    assert code == 0 and [line.split(":")[1].split()[0] for line in out.splitlines()] == ["ok", "ok"]

    dest = tmp_path / "dl"
    code, out, _ = run(capsys, "download", root.url, "ctr", dest, "--alias", "production", "--json")
    assert code == 0 and json.loads(out)["version"] == 1
    assert (dest / "saved_model.pb").read_bytes() == b"graph-1"

    code, out, _ = run(capsys, "gc", root.url, "--keep-last", "1", "--dry-run", "--json")
    doc = json.loads(out)
    assert doc["dry_run"] and doc["removed_versions"] == [] and ["ctr", 1, "alias:production"] in doc["kept"]


def test_verify_failure_exits_1_naming_the_file(populated, capsys):
    root, repo = populated
    repo._tree.store.fs.pipe_file(
        repo._tree.store.join(repo._tree.vdir("ctr", 2), "saved_model.pb"), b"graph-X"
    )
    code, out, err = run(capsys, "verify", root.url, "ctr", "--all")
    assert code == 1
    assert "ctr/1: ok" in out and "ctr/2: FAILED" in out
    assert err.count("\n") == 1 and "file saved_model.pb has sha256" in err
    code, out, err = run(capsys, "verify", root.url, "ctr", "2", "--json")
    assert code == 1 and json.loads(out)["results"][0]["file"] == "saved_model.pb"


def test_publish_command(repo_root, capsys, tmp_path):
    src = make_export(tmp_path / "m", seed=5)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"framework": "tensorflow", "metrics": {"auc": 0.9}}))
    code, out, _ = run(capsys, "publish", repo_root.url, "ctr", src, "--metadata", f"@{meta}", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["version"] == 1 and doc["metadata"]["metrics"] == {"auc": 0.9}
    code, out, _ = run(
        capsys, "publish", repo_root.url, "ctr", src, "--parent", "1", "--dataset", "oss://b/x"
    )
    assert code == 0 and out.startswith("published ctr/2 at ")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["show", "{root}", "ctr", "9"], "model 'ctr' has no version 9; versions: 1"),
        (["show", "{root}", "../etc"], "model name '../etc' must not contain '/'"),
        (["show", "{root}", "ctr", "--alias", "nope"], "has no alias 'nope'; aliases: none"),
        (["show", "{root}", "ctr", "abc"], "version must be an integer >= 1, got 'abc'"),
        (["show", "{root}", "ranker"], "model 'ranker' has no committed version"),
        (["show"], "the following arguments are required"),
        (["bogus", "{root}"], "invalid choice: 'bogus'"),
        (["alias", "{root}", "ctr", "a b", "1"], "alias 'a b' is unsafe"),
        (["alias", "{root}", "ctr", "--delete"], "--delete needs ALIAS"),
        (["deploy", "{root}", "ctr", "1"], "needs --service"),
        (["deploy", "{root}", "ctr", "1", "--service", "a b"], "service 'a b'"),
        (["download", "{root}", "ctr", "{tmp}", "--version", "1"], "is not empty"),
        (["gc", "{root}", "--keep-last", "0"], "keep_last must be an int >= 1"),
        (["publish", "{root}", "ctr", "{tmp}/nope"], "does not exist"),
        (["publish", "{root}", "ctr", "{tmp}", "--metadata", "{{x"], "--metadata is not JSON"),
        (["list", "{root}", "-o", "novalue"], "storage option must be KEY=VALUE"),
        (["list", "nosuchproto://x"], "cannot open repository root"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path, capsys, argv, match):
    root = tmp_path / "repo"
    src = make_export(tmp_path / "src")
    from kubeai_train.repository import ModelRepository

    ModelRepository(root).publish("ctr", src)
    code, out, err = run(capsys, *[a.format(root=root, tmp=src) for a in argv])
    assert code == 2, (out, err)
    assert err.count("\n") == 1, err
    assert match in err


@pytest.mark.integration
def test_module_entry_point_runs(tmp_path):
    from kubeai_train.repository import ModelRepository

    ModelRepository(tmp_path / "repo").publish("ctr", make_export(tmp_path / "src"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run(
        [sys.executable, "-m", "kubeai_train.repository", "list", str(tmp_path / "repo"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["models"][0]["name"] == "ctr"
    bad = subprocess.run(
        [sys.executable, "-m", "kubeai_train.repository", "show", str(tmp_path / "repo"), "ctr", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.strip().endswith("no version 3; versions: 1")
