"""YAML job files: a round trip, the errors, and the examples shipped in launchers/jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeai_train.launch.errors import JobFileError
from kubeai_train.launch.types import JobSpec


def test_job_file_round_trip_and_errors(tmp_path):
    good = tmp_path / "job.yaml"
    good.write_text(
        "framework: tf\nps: 1\nworkers: 2\nscript: t.py\nargs: [--epochs, 2]\nscheduling: {gang: volcano}\n"
    )
    spec = JobSpec.from_yaml(good)
    assert spec.replicas == {"chief": 1, "worker": 2, "ps": 1} and spec.args == ("--epochs", "2")
    assert spec.scheduling.gang == "volcano" and spec.name == "t"

    typo = tmp_path / "typo.yaml"
    typo.write_text("framework: tf\nworkers: 2\nscript: t.py\nrestart_polcy: Never\n")
    with pytest.raises(JobFileError, match="unknown field\\(s\\) restart_polcy"):
        JobSpec.from_yaml(typo)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("framework: [tf\n")
    with pytest.raises(JobFileError, match="not valid YAML at line"):
        JobSpec.from_yaml(bad_yaml)
    with pytest.raises(JobFileError, match="cannot read job file"):
        JobSpec.from_yaml(tmp_path / "missing.yaml")
    not_a_map = tmp_path / "list.yaml"
    not_a_map.write_text("- a\n- b\n")
    with pytest.raises(JobFileError, match="must hold a mapping"):
        JobSpec.from_yaml(not_a_map)


def test_example_job_files_are_valid():
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "launchers" / "jobs").glob("*.yaml")):
        spec = JobSpec.from_yaml(path)
        assert spec.image and spec.secret_env is not None
