"""CPU binding as pure decisions: core shares, thread variables, CPU limits, on hand-made inputs."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubeai_train.launch import cpus
from kubeai_train.launch.env import ProcessPlan, local_endpoints, local_plan
from kubeai_train.launch.types import JobFileError, JobSpec, SpecError

# -- shares -----------------------------------------------------------------------------------


def test_shares_are_disjoint_contiguous_and_the_first_get_the_extra_cores():
    assert cpus.share_cores(2, [0, 1]) == [(0,), (1,)]
    assert cpus.share_cores(3, range(8)) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert cpus.share_cores(1, [2, 3, 5]) == [(2, 3, 5)]
    # the launcher's own affinity may be any set: shares follow the order given
    assert cpus.share_cores(2, [8, 9, 12, 13]) == [(8, 9), (12, 13)]
    assert cpus.share_cores(0, [0, 1]) == []


def test_fewer_cores_than_processes_share_round_robin():
    assert cpus.share_cores(5, [0, 1]) == [(0,), (1,), (0,), (1,), (0,)]
    assert cpus.share_cores(3, [7]) == [(7,), (7,), (7,)]


def test_no_cores_is_an_error():
    with pytest.raises(ValueError, match="no cpus"):
        cpus.share_cores(2, [])


@given(n=st.integers(1, 24), pool=st.sets(st.integers(0, 63), min_size=1, max_size=32))
def test_shares_cover_the_cores_evenly(n, pool):
    avail = sorted(pool)
    shares = cpus.share_cores(n, avail)
    assert len(shares) == n
    if n <= len(avail):
        flat = [c for s in shares for c in s]
        assert sorted(flat) == avail  # disjoint and every core used
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    else:
        assert all(len(s) == 1 for s in shares)
        uses = Counter(s[0] for s in shares)
        assert set(uses) == set(avail) and max(uses.values()) - min(uses.values()) <= 1


# -- thread variables ---------------------------------------------------------------------------


def test_thread_variables_per_framework_and_what_the_caller_keeps():
    assert cpus.thread_env("torch", 3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert cpus.thread_env("tf", 2) == {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "TF_NUM_INTRAOP_THREADS": "2",
        "TF_NUM_INTEROP_THREADS": "2",
    }
    assert cpus.thread_env("tf", 2, keep={"MKL_NUM_THREADS", "TF_NUM_INTEROP_THREADS"}) == {
        "OMP_NUM_THREADS": "2",
        "TF_NUM_INTRAOP_THREADS": "2",
    }
    # a given OMP_NUM_THREADS keeps MKL_NUM_THREADS unset: torch would read ours over it
    assert cpus.thread_env("torch", 4, keep={"OMP_NUM_THREADS"}) == {}
    assert cpus.thread_env("torch", 4, keep={"MKL_NUM_THREADS"}) == {"OMP_NUM_THREADS": "4"}
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        cpus.thread_env("torch", 0)


def _plan(role, index, local=0, env=None, nproc=1):
    return ProcessPlan(role, index, local, ("python", "t.py"), dict(env or {}), nproc)


def test_bind_gives_each_plan_its_share_and_matching_threads():
    plans = [_plan("chief", 0), _plan("worker", 0), _plan("ps", 0, env={"LR": "0.1"})]
    bound = cpus.bind(plans, range(7), "tf")
    assert [p.cpus for p in bound] == [(0, 1, 2), (3, 4), (5, 6)]
    assert [p.env["TF_NUM_INTRAOP_THREADS"] for p in bound] == ["3", "2", "2"]
    assert bound[2].env["LR"] == "0.1" and bound[2].env["OMP_NUM_THREADS"] == "2"
    assert [p.label for p in bound] == ["chief:0", "worker:0", "ps:0"]
    assert plans[0].cpus == () and "OMP_NUM_THREADS" not in plans[0].env  # inputs untouched


def test_bind_keeps_what_the_job_or_the_environment_sets_variable_by_variable():
    plans = [
        _plan("master", 0, env={"OMP_NUM_THREADS": "6"}),
        _plan("worker", 0, env={"OMP_NUM_THREADS": "6"}),
    ]
    bound = cpus.bind(plans, [0, 1, 2, 3], "torch", keep={"OMP_NUM_THREADS"})
    assert [p.env["OMP_NUM_THREADS"] for p in bound] == ["6", "6"]
    assert all("MKL_NUM_THREADS" not in p.env for p in bound)  # follows the given OMP_NUM_THREADS
    assert [p.cpus for p in bound] == [(0, 1), (2, 3)]  # the affinity applies all the same
    assert cpus.describe(bound, "torch").startswith("master:0 cpus 0-1 threads 2 OMP_NUM_THREADS=6; ")


def test_bind_replaces_the_torchrun_default_of_one_thread():
    spec = JobSpec.from_counts("torch", workers=2, nproc_per_node=2, script="t.py")
    plans = local_plan(spec, local_endpoints(spec, [20001]))
    assert all(p.env["OMP_NUM_THREADS"] == "1" for p in plans)
    bound = cpus.bind(plans, range(8), "torch", keep=spec.env)
    assert [p.cpus for p in bound] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [p.env["OMP_NUM_THREADS"] for p in bound] == ["2"] * 4
    assert [p.label for p in bound] == ["master:0.0", "master:0.1", "worker:0.0", "worker:0.1"]
    line = cpus.describe(bound, "torch")
    assert line == (
        "master:0.0 cpus 0-1 threads 2; master:0.1 cpus 2-3 threads 2; "
        "worker:0.0 cpus 4-5 threads 2; worker:0.1 cpus 6-7 threads 2"
    )


def test_cpu_lists_in_the_kernels_format():
    assert cpus.format_cpus([0, 1, 2, 3, 6]) == "0-3,6"
    assert cpus.format_cpus([5]) == "5" and cpus.format_cpus([3, 1, 2]) == "1-3"
    assert cpus.format_cpus([0, 2, 4, 5]) == "0,2,4-5"


# -- CPU limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "nproc", "threads"),
    [
        ("4", 1, 4),
        ("500m", 1, 1),
        ("1.5", 1, 2),
        ("2500m", 1, 3),
        ("100m", 1, 1),
        ("4", 2, 2),
        ("3", 2, 2),
        ("1", 4, 1),
        ("8", 3, 3),
        ("2e1", 1, 20),
        (None, 1, None),
    ],
)
def test_limit_threads_rounds_up_and_divides_among_a_pods_processes(limit, nproc, threads):
    assert cpus.limit_threads(limit, nproc) == threads


def test_cpu_quantities_are_exact():
    assert cpus.cpu_cores("250m") == Fraction(1, 4)
    assert cpus.cpu_cores("1.25") == Fraction(5, 4)
    assert cpus.cpu_cores("+.5") == Fraction(1, 2)
    assert cpus.cpu_cores("3E2") == 300 and cpus.cpu_cores("1Ki") == 1024
    with pytest.raises(SpecError, match="cpu quantity must be like 2, 500m or 1.5, got 'lots'"):
        cpus.cpu_cores("lots")


# -- the setting, in a spec and a job file ----------------------------------------------------


def test_cpu_bind_is_validated_and_shown_in_the_summary():
    spec = JobSpec.from_counts("torch", workers=2, script="t.py", cpu_bind="cores")
    assert spec.cpu_bind == "cores" and "cpu_bind=cores" in spec.summary()
    assert JobSpec.from_counts("torch", script="t.py").cpu_bind == "none"
    assert "cpu_bind" not in JobSpec.from_counts("torch", script="t.py").summary()
    with pytest.raises(SpecError, match="cpu_bind must be 'none' .* or 'cores' .*, got 'foo'"):
        JobSpec.from_counts("torch", script="t.py", cpu_bind="foo")


def test_job_file_takes_cpu_bind(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("framework: tf\nps: 1\nworkers: 2\nscript: t.py\ncpu_bind: cores\n")
    assert JobSpec.from_yaml(job).cpu_bind == "cores"
    job.write_text("framework: tf\nworkers: 1\nscript: t.py\ncpu_bind: numa\n")
    with pytest.raises(JobFileError, match=f"job file {job}: cpu_bind must be .*, got 'numa'"):
        JobSpec.from_yaml(job)
