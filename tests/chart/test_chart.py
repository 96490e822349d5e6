"""The chart, rendered and linted with real Helm for the default values and every ci/ file, and
every rendered object validated offline; then what the platform promises of it: restricted pods
with resources, secrets only by reference, a serving cluster that gets only the operator, a
schema that refuses wrong values."""

from __future__ import annotations

import copy
import re
from typing import Any

import helm_python as helm
import pytest

from tests.chart.rendering import (
    KUBE_VERSIONS,
    VALUE_SETS,
    containers,
    lint,
    pod_templates,
    render,
    rendered,
    validate_object,
    validate_schema,
    values_of,
)

pytestmark = pytest.mark.chart

SETS = list(VALUE_SETS)
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|DATABASE_URL|BROKER_URL")


def _pods(name: str) -> list[tuple[str, dict[str, Any], set[str]]]:
    """(where, pod template, names of the StatefulSet's volume claims) of every pod."""
    return [
        (
            where,
            template,
            {c["metadata"]["name"] for c in obj["spec"].get("volumeClaimTemplates", [])},
        )
        for obj in rendered(name)
        for where, template in pod_templates(obj)
    ]


@pytest.mark.parametrize("name", SETS)
def test_every_values_set_lints_cleanly_in_strict_mode(name: str) -> None:
    report = lint(values_of(name))
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == [], problems


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", SETS)
def test_every_rendered_object_validates_against_its_schema(name: str, kube_version: str) -> None:
    objects = rendered(name)
    assert objects
    for obj in objects:
        validate_object(obj, kube_version)


def test_the_validation_refuses_what_the_api_server_would_refuse() -> None:
    """The checks above have teeth: an unknown field fails, in a core object and in a RayCluster."""
    deployment = copy.deepcopy(next(o for o in rendered("default") if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(Exception, match="resource"):
        validate_object(deployment, KUBE_VERSIONS[-1])
    ray = copy.deepcopy(
        next(o for o in rendered("external-kuberay-values") if o["kind"] == "RayCluster")
    )
    ray["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(Exception, match="maxReplica"):
        validate_object(ray, KUBE_VERSIONS[-1])


@pytest.mark.parametrize("name", SETS)
def test_every_pod_is_restricted_with_resources_and_writable_scratch(name: str) -> None:
    pods = _pods(name)
    assert pods
    for where, template, claims in pods:
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")), where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUME_TYPES, f"{where}: volume {volume}"
        for container in containers(spec):
            at = f"{where}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), at
            assert not set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}, at
            assert not sc.get("privileged"), at
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, at
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, at
            assert sc.get("readOnlyRootFilesystem") is True, at
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), at
            assert "memory" in resources.get("limits", {}), at
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{at}: a read-only root needs a writable /tmp"
            for path, volume in mounts.items():
                assert volume in volumes or volume in claims, f"{at}: {path}"
                if volume in volumes:
                    assert set(volumes[volume]) & {"emptyDir", "persistentVolumeClaim"}, (
                        f"{at}: {path}"
                    )


@pytest.mark.parametrize("name", SETS)
def test_no_secret_value_is_ever_rendered(name: str) -> None:
    objects = rendered(name)
    assert {o["kind"] for o in objects}.isdisjoint({"Secret", "ConfigMap"})
    for where, template in (pod for o in objects for pod in pod_templates(o)):
        for container in containers(template["spec"]):
            for env in container.get("env", []):
                if not SECRET_ENV.search(env["name"]) or "valueFrom" in env:
                    continue
                # A URL composed in the pod from a password the same container reads by reference.
                assert "$(" in env.get("value", ""), f"{where}/{container['name']}: {env}"
                assert "@" not in env["value"].split("$(")[0], env


def test_serving_sync_values_render_only_the_operator_its_rbac_and_the_crds() -> None:
    objects = rendered("serving-sync-values")
    kinds = {o["kind"] for o in objects}
    assert kinds == {
        "CustomResourceDefinition",
        "ServiceAccount",
        "Deployment",
        "Role",
        "RoleBinding",
    }
    for obj in objects:
        if obj["kind"] != "CustomResourceDefinition":
            assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "operator", obj
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "operator"
    assert "--namespace=serving" in container["args"]
    (role,) = [o for o in objects if o["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "serving"
    custom = {
        r
        for rule in role["rules"]
        if "loraforge.dev" in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert custom == {"adaptersyncs", "adaptersyncs/status"}
    (secrets,) = [rule for rule in role["rules"] if "secrets" in rule["resources"]]
    assert secrets["verbs"] == ["get"] and secrets["resourceNames"] == ["loraforge-reader-key"]


def test_the_operator_gets_a_role_in_each_watched_namespace_and_nothing_cluster_wide() -> None:
    objects = rendered("external-kuberay-values")
    roles = sorted(o["metadata"]["namespace"] for o in objects if o["kind"] == "Role")
    bindings = sorted(o["metadata"]["namespace"] for o in objects if o["kind"] == "RoleBinding")
    assert roles == bindings == ["ml-team-a", "ml-team-b"]
    assert not [o for o in objects if o["kind"].startswith("Cluster")]
    cluster_wide = render({"operator": {"clusterWide": True}})
    assert {o["kind"] for o in cluster_wide} >= {"ClusterRole", "ClusterRoleBinding"}
    assert not [o for o in cluster_wide if o["kind"] == "Role"]


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"trainers": {"replicas": "two"}}, "/trainers/replicas"),
        ({"operator": {"watchNamespaces": "ml"}}, "/operator/watchNamespaces"),
        ({"replicaCount": 3}, "replicaCount"),
        ({"image": {"variant": "rocm"}}, "/image/variant"),
        ({"ray": {"kuberay": {"enabled": True}}}, "/ray/auth/existingSecret"),
    ],
)
def test_the_values_schema_refuses_wrong_types_and_unknown_keys(
    values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(complaint)):
        validate_schema(values)


def test_kuberay_trainers_join_with_the_ray_token_from_a_secret_and_request_gpus() -> None:
    (ray,) = [o for o in rendered("external-kuberay-values") if o["kind"] == "RayCluster"]
    (group,) = ray["spec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 2, 8)
    for where, template in pod_templates(ray):
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "prod-ray-token",
            "key": "token",
        }
    worker = group["template"]["spec"]
    (container,) = worker["containers"]
    assert container["args"][0].endswith("exec loraforge worker")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_the_api_is_probed_on_healthz_and_readyz_and_migrated_by_a_hook_first() -> None:
    objects = rendered("default")
    (api,) = [
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-api")
    ]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["api"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (job,) = [o for o in objects if o["kind"] == "Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert not [o for o in objects if o["kind"] == "ServiceMonitor"]
    monitored = rendered("external-kuberay-values")
    (monitor,) = [o for o in monitored if o["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_crds_are_templates_that_upgrades_update_and_can_be_left_out() -> None:
    crds = [o for o in rendered("default") if o["kind"] == "CustomResourceDefinition"]
    assert {c["spec"]["group"] for c in crds} == {"loraforge.dev"}
    assert {c["spec"]["names"]["kind"] for c in crds} == {"FineTuningJob", "AdapterSync", "Tenant"}
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    upgraded = render(None, is_upgrade=True)
    assert len([o for o in upgraded if o["kind"] == "CustomResourceDefinition"]) == len(crds)
    assert not [
        o for o in render({"crds": {"enabled": False}}) if o["kind"] == "CustomResourceDefinition"
    ]
