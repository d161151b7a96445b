"""The CLI's argument split: everything after the script belongs to the script."""

from __future__ import annotations

import pytest

from kubeai_train.launch.__main__ import UsageError, build_parser, spec_from_args, split_argv
from kubeai_train.launch.types import SpecError


def parse(argv):
    parser = build_parser()
    own, rest = split_argv(parser, argv)
    return spec_from_args(parser.parse_args(own), rest)


def test_script_args_that_look_like_launcher_flags_stay_with_the_script():
    spec = parse(
        ["--framework", "torch", "--workers", "2", "train.py", "--workers", "9", "--target=k8s", "-m", "x"]
    )
    assert spec.script == "train.py" and spec.args == ("--workers", "9", "--target=k8s", "-m", "x")
    assert spec.replicas == {"master": 1, "worker": 1}


def test_double_dash_and_equals_forms():
    spec = parse(["--framework=tf", "--ps=1", "--workers=2", "--no-chief", "--", "-weird.py", "a"])
    assert spec.script == "-weird.py" and spec.args == ("a",)
    assert spec.replicas == {"worker": 2, "ps": 1}


def test_module_form():
    spec = parse(["--framework", "torch", "-m", "pkg.train", "--lr", "0.1"])
    assert (
        spec.module == "pkg.train"
        and spec.args == ("--lr", "0.1")
        and spec.argv() == ("-m", "pkg.train", "--lr", "0.1")
    )


def test_job_file_takes_trailing_script_flags(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text("framework: torch\nworkers: 3\nscript: t.py\nargs: [--a, '1']\n")
    spec = parse(["--job", str(job), "--name", "run-7", "--epochs", "2"])
    assert spec.name == "run-7" and spec.args == ("--a", "1", "--epochs", "2")
    with pytest.raises(UsageError, match="--workers conflicts with --job"):
        parse(["--job", str(job), "--workers", "2"])


def test_env_and_secret_flags():
    spec = parse(
        ["--framework", "tf", "--env", "A=1", "--env", "B=x=y", "--secret-env", "TOKEN=cred/token", "t.py"]
    )
    assert spec.env == {"A": "1", "B": "x=y"} and spec.secret_env["TOKEN"].secret == "cred"
    with pytest.raises(UsageError, match="--env takes KEY=VALUE"):
        parse(["--framework", "tf", "--env", "A", "t.py"])


def test_a_flag_missing_its_value():
    with pytest.raises(UsageError, match="--workers needs a value"):
        parse(["--framework", "torch", "--workers"])


def test_cpu_bind_flag_and_its_job_file_override(tmp_path):
    assert parse(["--framework", "torch", "--cpu-bind", "cores", "t.py"]).cpu_bind == "cores"
    assert parse(["--framework", "torch", "t.py"]).cpu_bind == "none"
    job = tmp_path / "j.yaml"
    job.write_text("framework: torch\nworkers: 2\nscript: t.py\ncpu_bind: cores\n")
    assert parse(["--job", str(job)]).cpu_bind == "cores"
    assert parse(["--job", str(job), "--cpu-bind", "none"]).cpu_bind == "none"
    with pytest.raises(SpecError, match="cpu_bind must be .*, got 'foo'"):
        parse(["--job", str(job), "--cpu-bind", "foo"])
