"""The CRDs (the chart's files, their single source) and the example manifests against them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from control_plane.hyperparameters import Hyperparameters
from operators.finetuningjob import snake

pytestmark = pytest.mark.operator

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "helm" / "loraforge" / "files" / "crds"


def crds() -> dict[str, dict[str, Any]]:
    found = [yaml.safe_load(p.read_text()) for p in sorted(CRDS.glob("loraforge.dev_*.yaml"))]
    return {c["spec"]["names"]["kind"]: c for c in found}


def validator(kind: str) -> jsonschema.Draft4Validator:
    # Kubernetes' structural schemas are OpenAPI v3.0: draft 4's boolean exclusiveMinimum.
    (version,) = crds()[kind]["spec"]["versions"]
    return jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])


def examples() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((ROOT / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["apiVersion"].startswith("loraforge.dev/")
    ]


def test_the_crds_serve_v1alpha1_with_a_status_subresource_and_printer_columns() -> None:
    found = crds()
    assert set(found) == {"FineTuningJob", "AdapterSync", "Tenant"}
    for crd in found.values():
        assert crd["spec"]["group"] == "loraforge.dev" and crd["spec"]["scope"] == "Namespaced"
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
        assert "Phase" in [c["name"] for c in version["additionalPrinterColumns"]]


def test_a_fine_tuning_job_takes_every_hyperparameter_the_api_takes() -> None:
    """`spec.hyperparameters` in camelCase, save the method's own (`spec.method`) and the
    sweep's median stopping (a FineTuningJob is one job, of no sweep)."""
    (version,) = crds()["FineTuningJob"]["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    taken = {snake(name) for name in spec["hyperparameters"]["properties"]}
    assert taken == set(Hyperparameters.model_fields) - {
        "method",
        "dpo_beta",
        "sweep_median_stopping",
    }


def test_every_example_manifest_validates_against_its_crd() -> None:
    docs = examples()
    assert {d["kind"] for d in docs} == {"FineTuningJob", "AdapterSync", "Tenant"}
    for doc in docs:
        validator(doc["kind"]).validate(doc)


@pytest.mark.parametrize(
    ("kind", "change", "why"),
    [
        ("FineTuningJob", {"dataset": {"fileId": "f", "url": "https://x"}}, "dataset"),
        ("FineTuningJob", {"hyperparameters": {"loraRank": 0}}, "loraRank"),
        ("FineTuningJob", {"hyperparameters": {"n_epochs": 3}}, "n_epochs"),
        ("FineTuningJob", {"method": {"type": "reinforcement"}}, "type"),
        ("FineTuningJob", {"method": {"type": "dpo", "beta": 0}}, "beta"),
        ("AdapterSync", {"vllm": {"maxLoraRank": 24}}, "maxLoraRank"),
        ("AdapterSync", {"storage": {"path": "relative/dir"}}, "path"),
        (
            "AdapterSync",
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
            "operator",
        ),
    ],
)
def test_the_schema_refuses_what_a_schema_can_say(
    kind: str, change: dict[str, Any], why: str
) -> None:
    doc = next(d for d in examples() if d["kind"] == kind)
    bad = {**doc, "spec": {**doc["spec"], **change}}
    errors = list(validator(kind).iter_errors(bad))
    assert errors and any(why in (str(e.path) + e.message) for e in errors)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"maxRunningJobs": 10_001}, "maxRunningJobs"),
        ({"maxRunningJobs": -1}, "maxRunningJobs"),
        ({"maxPriority": 101}, "maxPriority"),
        ({"maxPriority": -101}, "maxPriority"),
        ({"maxInteractiveModels": 0}, "maxInteractiveModels"),
        ({"maxInteractiveModels": 10_001}, "maxInteractiveModels"),
        ({"maxInteractiveModels": "8"}, "maxInteractiveModels"),
        ({"maxCheckpointBytes": 0}, "maxCheckpointBytes"),
        ({"maxCheckpointBytes": -1}, "maxCheckpointBytes"),
        ({"maxCheckpointBytes": 10**18 + 1}, "maxCheckpointBytes"),
        ({"maxCheckpointBytes": "20G"}, "maxCheckpointBytes"),
        ({"tenantName": "no spaces"}, "tenantName"),
        ({"adminKeySecret": None}, "adminKeySecret"),
        ({"credentialsSecretRef": None}, "credentialsSecretRef"),
    ],
)
def test_a_tenants_limits_are_held_to_the_apis_ranges_and_both_secrets_are_required(
    change: dict[str, Any], why: str
) -> None:
    tenant = next(d for d in examples() if d["kind"] == "Tenant")  # examples/tenant.yaml
    validator("Tenant").validate(tenant)
    spec = {k: v for k, v in {**tenant["spec"], **change}.items() if v is not None}
    errors = list(validator("Tenant").iter_errors({**tenant, "spec": spec}))
    assert errors and any(why in (str(e.path) + e.message) for e in errors)
