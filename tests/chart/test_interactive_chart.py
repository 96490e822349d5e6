"""The interactive (Tinker-compatible) executors in the chart: off unless asked for; one
Deployment per base running `loraforge interactive` on it, with a trainer's database, object
store, security, GPU and volumes; a budget per base, no ingress; values and base names the
schema and the templates refuse. (Lint, schema validation of every object and the CLI check of
the command run for `ci/interactive-values.yaml` with the other value sets.)"""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest

from tests.chart.rendering import render, rendered, validate_schema, values_of

pytestmark = pytest.mark.chart

Obj = dict[str, Any]
BASES = ["SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct"]
SLUGS = ["smollm2-135m-instruct", "meta-llama-llama-3-1-8b-instruct"]
BASE_LABEL = "loraforge.dev/base"
# What a trainer's container has that an executor's must not: Ray (the executor runs none) and
# the trainer's own thread setting.
TRAINER_ONLY_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "LORAFORGE_RAY_ADDRESS"}
TRAINER_ONLY_ENV |= {"LORAFORGE_TRAINER_THREADS"}


def _component(objects: list[Obj] | tuple[Obj, ...], kind: str, component: str) -> list[Obj]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]


def _executors(objects: list[Obj] | tuple[Obj, ...]) -> list[Obj]:
    return _component(objects, "Deployment", "interactive")


def _with_interactive(values: Obj | None, **interactive: Any) -> Obj:
    return {**(values or {}), "interactive": {"enabled": True, "bases": BASES, **interactive}}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_interactive_executors_are_off_by_default() -> None:
    for objects in (rendered("default"), render({"interactive": {"bases": BASES}})):
        assert not [
            o
            for o in objects
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "interactive"
        ]


def test_each_base_gets_its_own_deployment_running_loraforge_interactive_on_it() -> None:
    executors = _executors(rendered("interactive-values"))
    assert [d["metadata"]["name"] for d in executors] == [
        f"lf-loraforge-interactive-{s}" for s in SLUGS
    ]
    for deployment, base, slug in zip(executors, BASES, SLUGS, strict=True):
        assert deployment["spec"]["replicas"] == 2
        assert deployment["metadata"]["annotations"]["loraforge.dev/base-name"] == base
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        # The name or id verbatim: the executor looks the base up by it, case and all.
        assert container["args"] == ["interactive", "--base", base, "--precision", "auto"]
        assert "command" not in container  # the image's entrypoint is `loraforge`
        assert "ports" not in container
        labels = pod["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "interactive"
        assert labels[BASE_LABEL] == slug
        assert deployment["metadata"]["labels"][BASE_LABEL] == slug
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # Each Deployment owns its base's pods and only those (overlapping selectors would make two
    # Deployments fight over the same pods).
    first, second = executors
    first_selector = first["spec"]["selector"]["matchLabels"]
    second_selector = second["spec"]["selector"]["matchLabels"]
    assert _matches(first_selector, first["spec"]["template"]["metadata"]["labels"])
    assert not _matches(first_selector, second["spec"]["template"]["metadata"]["labels"])
    assert not _matches(second_selector, first["spec"]["template"]["metadata"]["labels"])
    assert not _component(rendered("interactive-values"), "Service", "interactive")


@pytest.mark.parametrize("values_set", ["default", "bundled-values"])
def test_executors_run_like_the_trainers_same_env_security_gpu_and_volumes(
    values_set: str,
) -> None:
    """The executor needs what a trainer needs: with external services (Secrets by reference) and
    with the bundled ones (URLs composed in the pod), its settings are the trainer's."""
    objects = render(_with_interactive(values_of(values_set)))
    (trainer,) = _component(objects, "Deployment", "trainer")
    trainer_pod = trainer["spec"]["template"]["spec"]
    (trainer_container,) = trainer_pod["containers"]
    trainer_env = [e for e in trainer_container["env"] if e["name"] not in TRAINER_ONLY_ENV]
    for executor in _executors(objects):
        pod = executor["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        names = [e["name"] for e in container["env"]]
        assert {"LORAFORGE_DATABASE_URL", "LORAFORGE_S3_BUCKET", "LORAFORGE_HOME"} <= set(names)
        assert not TRAINER_ONLY_ENV & set(names)
        assert container["env"] == trainer_env
        assert container["securityContext"] == trainer_container["securityContext"]
        for field in ("securityContext", "serviceAccountName", "automountServiceAccountToken"):
            assert pod[field] == trainer_pod[field], field
        assert container["volumeMounts"] == trainer_container["volumeMounts"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(volumes) == {v["name"] for v in trainer_pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
        assert volumes["data"]["emptyDir"] == {"sizeLimit": "100Gi"}
        resources = container["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == 1
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert pod["terminationGracePeriodSeconds"] == 15


def test_executors_tolerate_the_gpu_taint_and_keep_their_cache_on_a_claim_when_given() -> None:
    objects = render(_with_interactive(None, cacheExistingClaim="base-cache", precision="bf16"))
    for executor in _executors(objects):
        pod = executor["spec"]["template"]["spec"]
        assert pod["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"] == {
            "name": "data",
            "persistentVolumeClaim": {"claimName": "base-cache"},
        }
        assert pod["containers"][0]["args"][-2:] == ["--precision", "bf16"]


def test_cpu_executors_request_no_gpu() -> None:
    objects = render(_with_interactive(None, gpusPerPod=0, tolerations=[]))
    executors = _executors(objects)
    assert len(executors) == 2
    for executor in executors:
        pod = executor["spec"]["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in resources["requests"]
        assert "nvidia.com/gpu" not in resources["limits"]
        assert "tolerations" not in pod


def test_a_budget_per_base_no_ingress_and_a_way_out_to_the_bundled_stores() -> None:
    objects = render(_with_interactive(values_of("bundled-values")))
    executors = _executors(objects)
    budgets = _component(objects, "PodDisruptionBudget", "interactive")
    assert [b["metadata"]["name"] for b in budgets] == [e["metadata"]["name"] for e in executors]
    for budget, executor in zip(budgets, executors, strict=True):
        assert budget["spec"]["maxUnavailable"] == 1
        selector = budget["spec"]["selector"]["matchLabels"]
        pods = [e["spec"]["template"]["metadata"]["labels"] for e in executors]
        # Each budget counts its own base's executors only.
        assert [_matches(selector, labels) for labels in pods] == [e is executor for e in executors]
    (policy,) = _component(objects, "NetworkPolicy", "interactive")
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress stays open
    assert policy["spec"]["ingress"] == []
    for executor in executors:
        labels = executor["spec"]["template"]["metadata"]["labels"]
        assert _matches(policy["spec"]["podSelector"]["matchLabels"], labels)
        for store in ("postgresql", "minio"):
            (store_policy,) = _component(objects, "NetworkPolicy", store)
            (peer,) = store_policy["spec"]["ingress"][0]["from"]
            assert _matches(peer["podSelector"]["matchLabels"], labels), store
    no_budget = render(_with_interactive(None, pdb={"enabled": False}))
    assert not _component(no_budget, "PodDisruptionBudget", "interactive")
    assert _component(no_budget, "PodDisruptionBudget", "trainer")


def test_a_long_base_name_becomes_a_valid_name_and_label_with_its_case_kept_in_the_command() -> (
    None
):
    base = "Org_Name/" + "Very.Long-Model" * 12
    (executor,) = _executors(render({"interactive": {"enabled": True, "bases": [base]}}))
    name = executor["metadata"]["name"]
    slug = executor["metadata"]["labels"][BASE_LABEL]
    dns_label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    assert len(name) <= 63 and dns_label.match(name), name
    assert len(slug) <= 63 and dns_label.match(slug), slug
    assert name.startswith("lf-loraforge-interactive-org-name-very-long-model")
    assert executor["spec"]["template"]["spec"]["containers"][0]["args"][2] == base


@pytest.mark.parametrize(
    "bases",
    [
        ["Llama.3", "llama-3"],
        # Different slugs (label values) whose Deployment names agree once cut to 63 characters.
        ["org/" + "x" * 40 + "-a", "org/" + "x" * 40 + "-b"],
    ],
    ids=["same-slug", "same-after-truncation"],
)
def test_two_bases_that_would_share_a_deployment_fail_the_render(bases: list[str]) -> None:
    message = f'interactive.bases: "{bases[0]}" and "{bases[1]}" both become the Deployment'
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render({"interactive": {"enabled": True, "bases": bases}})


@pytest.mark.parametrize(
    ("interactive", "complaint"),
    [
        ({"enabled": True, "bases": ["Llama 3"]}, "/interactive/bases/0"),
        ({"enabled": True, "bases": ["ok", "-llama"]}, "/interactive/bases/1"),
        ({"enabled": True, "bases": ["llama", "llama"]}, "/interactive/bases"),
        ({"enabled": True, "bases": []}, "/interactive/bases"),
        ({"bases": "SmolLM2-135M-Instruct"}, "/interactive/bases"),
        ({"replicas": -1}, "/interactive/replicas"),
        ({"gpusPerPod": 2}, "/interactive/gpusPerPod"),
        ({"precision": "fp16"}, "/interactive/precision"),
        ({"pdb": {"maxUnavailable": -1}}, "/interactive/pdb/maxUnavailable"),
        ({"threads": 4}, "threads"),
    ],
)
def test_the_values_schema_refuses_bad_interactive_values(interactive: Obj, complaint: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(f"'{complaint}'")):
        validate_schema({"interactive": interactive})


def test_the_values_schema_takes_base_names_and_ids_as_the_api_registers_them() -> None:
    """Uppercase, dots and a hub-style slash are part of real base names; the templates, not the
    schema, make Kubernetes names of them."""
    validate_schema(
        {
            "interactive": {
                "enabled": True,
                "bases": [*BASES, "Qwen2.5-0.5B", "base-0123456789abcdef01234567"],
            }
        }
    )
