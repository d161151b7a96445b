"""JobSpec: the CLI mapping, validation messages, the summary; the restart decisions."""

from __future__ import annotations

import pytest

from kubeai_train.launch.local import Decision, decide, is_retryable
from kubeai_train.launch.types import JobSpec, SpecError


def test_torch_workers_means_processes_in_total_like_the_sdk():
    spec = JobSpec.from_counts("torch", workers=3, script="t.py")
    assert spec.replicas == {"master": 1, "worker": 2}
    assert JobSpec.from_counts("torch", workers=1, script="t.py").replicas == {"master": 1}


def test_tf_mapping():
    assert JobSpec.from_counts("tf", workers=2, ps=2, script="t.py").replicas == {
        "chief": 1,
        "worker": 2,
        "ps": 2,
    }
    spec = JobSpec.from_counts("tf", workers=2, ps=1, chief=False, evaluator=True, script="t.py")
    assert spec.replicas == {"worker": 2, "ps": 1, "evaluator": 1}
    assert spec.effective_clean_pod_policy == "Running"
    assert JobSpec.from_counts("tf", workers=1, script="t.py").effective_clean_pod_policy is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"framework": "jax"}, "framework must be one of tf, torch, got 'jax'"),
        ({"framework": "torch", "workers": 0}, "--workers must be an integer >= 1, got 0"),
        ({"framework": "torch", "ps": 1}, "--ps 1 is for tf jobs"),
        ({"framework": "tf", "workers": 0, "chief": False}, "--workers must be an integer >= 1"),
        ({"framework": "torch", "name": "Bad_Name"}, "'Bad_Name' is not a DNS-1035 label"),
        ({"framework": "torch", "name": "1abc"}, "not a DNS-1035 label"),
        ({"framework": "torch", "name": "a" * 64}, "at most 63 characters"),
        (
            {"framework": "torch", "restart_policy": "Sometimes"},
            "restart_policy must be one of Never, OnFailure, ExitCode, Always",
        ),
        ({"framework": "torch", "backoff_limit": -1}, "backoff_limit must be an integer >= 0"),
        ({"framework": "torch", "env": {"RANK": "3"}}, "env RANK is set by the launcher"),
        ({"framework": "tf", "nproc_per_node": 2}, "nproc_per_node applies to torch jobs only"),
        ({"framework": "torch", "clean_pod_policy": "Sometimes"}, "clean_pod_policy must be one of"),
        ({"framework": "torch", "resources": {"requests": {"cpu": "lots"}}}, "must be a Kubernetes quantity"),
        (
            {"framework": "torch", "tolerations": [{"key": "a", "operater": "Exists"}]},
            "unknown toleration field(s) ['operater']",
        ),
        ({"framework": "torch", "scheduling": {"gang": "kueue"}}, "needs scheduling.queue"),
        ({"framework": "tf", "enable_dynamic_worker": True}, "enable_dynamic_worker needs parameter servers"),
    ],
)
def test_bad_specs_name_the_value(kwargs, needle):
    from kubeai_train.launch.types import Scheduling

    kwargs = dict(kwargs)
    framework = kwargs.pop("framework")
    if isinstance(kwargs.get("scheduling"), dict):
        with pytest.raises(SpecError) as ei:
            Scheduling(**kwargs.pop("scheduling"))
    else:
        with pytest.raises(SpecError) as ei:
            JobSpec.from_counts(framework, script="t.py", **kwargs)
    assert needle in str(ei.value)


def test_summary_masks_credentials():
    spec = JobSpec.from_counts(
        "torch",
        script="t.py",
        env={"OSS_ACCESS_KEY_SECRET": "hunter2", "LR": "0.1"},
        secret_env={"ODPS_TOKEN": "cred/token"},
    )
    line = spec.summary()
    assert "hunter2" not in line and "OSS_ACCESS_KEY_SECRET=***" in line and "LR=0.1" in line
    assert "ODPS_TOKEN<-secret:cred" in line


# -- restart policy, as a pure decision ------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "code", "retry"),
    [
        ("ExitCode", 137, True),
        ("ExitCode", 128, True),
        ("ExitCode", 127, False),
        ("ExitCode", 1, False),
        ("OnFailure", 1, True),
        ("Always", 2, True),
        ("Never", 137, False),
        ("OnFailure", 0, False),
    ],
)
def test_is_retryable(policy, code, retry):
    assert is_retryable(policy, code) is retry


def _spec(**kw):
    kw.setdefault("script", "t.py")
    return JobSpec.from_counts(kw.pop("framework", "tf"), **kw)


def test_decide_success_and_failure_rules():
    spec = _spec(workers=2, ps=1)
    running = {("chief", 0): (None,), ("worker", 0): (None,), ("worker", 1): (None,), ("ps", 0): (None,)}
    assert decide(spec, running, 0) == Decision("wait")
    assert decide(spec, {**running, ("worker", 0): (0,)}, 0) == Decision("wait")  # a worker is not the chief
    assert decide(spec, {**running, ("chief", 0): (0,)}, 0) == Decision("succeed", ("chief", 0))
    assert decide(spec, {**running, ("ps", 0): (3,)}, 0) == Decision("fail", ("ps", 0), 3)

    no_chief = _spec(workers=2, chief=False)
    codes = {("worker", 0): (None,), ("worker", 1): (0,)}
    assert decide(no_chief, codes, 0) == Decision("wait")
    assert decide(no_chief, {("worker", 0): (0,), ("worker", 1): (None,)}, 0) == Decision(
        "succeed", ("worker", 0)
    )
    all_workers = _spec(workers=2, chief=False, success_policy="AllWorkers")
    assert decide(all_workers, {("worker", 0): (0,), ("worker", 1): (None,)}, 0) == Decision("wait")
    assert decide(all_workers, {("worker", 0): (0,), ("worker", 1): (0,)}, 0).action == "succeed"

    torch = _spec(framework="torch", workers=2, nproc_per_node=2)
    assert decide(torch, {("master", 0): (0, None), ("worker", 0): (None, None)}, 0) == Decision("wait")
    assert decide(torch, {("master", 0): (0, 0), ("worker", 0): (None, None)}, 0).action == "succeed"


def test_decide_restarts_within_the_backoff_limit():
    spec = _spec(workers=1, restart_policy="ExitCode", backoff_limit=2)
    codes = {("chief", 0): (None,), ("worker", 0): (137,)}
    assert decide(spec, codes, 0) == Decision("restart", ("worker", 0), 137)
    assert decide(spec, codes, 1) == Decision("restart", ("worker", 0), 137)
    assert decide(spec, codes, 2) == Decision("fail", ("worker", 0), 137)
    assert decide(spec, {**codes, ("worker", 0): (1,)}, 0) == Decision("fail", ("worker", 0), 1)
    on_failure = _spec(workers=1, restart_policy="OnFailure", backoff_limit=1)
    assert decide(on_failure, {**codes, ("worker", 0): (1,)}, 0).action == "restart"
