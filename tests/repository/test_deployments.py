"""Deployment records of ModelRepository on every backend: slots, rollouts, history."""

from __future__ import annotations

from kubeai_train.repository import ModelRepository


def test_deployments_record_where_versions_run(repo: ModelRepository, export_dir):
    for _ in range(3):
        repo.publish("ctr", export_dir)
    d = repo.record_deployment("ctr", 1, "rec-svc", environment="prod", endpoint="http://user:pw@rec:8500")
    assert (d.version, d.service, d.status, d.environment) == (1, "rec-svc", "deployed", "prod")
    assert d.endpoint == "http://rec:8500"
    repo.record_deployment("ctr", 2, "rec-svc/canary", environment="prod")
    repo.record_deployment("ctr", 3, "rec-svc", environment="staging")
    now = {(x.service, x.environment): x.version for x in repo.deployments("ctr")}
    assert now == {("rec-svc", "prod"): 1, ("rec-svc/canary", "prod"): 2, ("rec-svc", "staging"): 3}
    repo.record_deployment("ctr", 2, "rec-svc", environment="prod")  # a rollout replaces the slot
    repo.record_deployment("ctr", 2, "rec-svc/canary", environment="prod", status="undeployed")
    now = {(x.service, x.environment): x.version for x in repo.deployments("ctr")}
    assert now == {("rec-svc", "prod"): 2, ("rec-svc", "staging"): 3}
    history = repo.deployments("ctr", history=True)
    assert [(x.service, x.version, x.status) for x in history] == [
        ("rec-svc", 1, "deployed"),
        ("rec-svc/canary", 2, "deployed"),
        ("rec-svc", 3, "deployed"),
        ("rec-svc", 2, "deployed"),
        ("rec-svc/canary", 2, "undeployed"),
    ]
