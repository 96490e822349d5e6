"""Render the chart with real Helm (the `helm-python-sdk` binding of Helm's Go SDK, offline) and
validate what it renders: core objects against the Kubernetes OpenAPI schema of a supported
version (`kubernetes-validate`), custom resources against their CRDs' schemas (jsonschema, strict
like `kubectl apply --validate=strict`)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "loraforge"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and a recent one.
KUBE_VERSIONS = ("1.29.0", "1.33.0")
RELEASE, NAMESPACE = "lf", "ml"
# Default values (None) and every ci/ values file, by name.
VALUE_SETS: dict[str, Path | None] = {
    "default": None,
    **{path.stem: path for path in sorted((CHART / "ci").glob("*.yaml"))},
}
# Schemas of the custom resources the chart renders: its own CRDs and the third-party ones
# vendored (trimmed, see their headers) under tests/chart/crds/.
CRD_FILES = [
    *sorted((CHART / "files" / "crds").glob("*.yaml")),
    *sorted((Path(__file__).parent / "crds").glob("*.yaml")),
]

Obj = dict[str, Any]


def values_of(name: str) -> Obj | None:
    path = VALUE_SETS[name]
    return None if path is None else yaml.safe_load(path.read_text())


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: Obj | None, *, is_upgrade: bool = False) -> list[Obj]:
    """Every object the chart renders for these values (hooks included), as an install would."""
    manifests = _chart().render(
        values,
        name=RELEASE,
        namespace=NAMESPACE,
        is_install=not is_upgrade,
        is_upgrade=is_upgrade,
    )
    objects: list[Obj] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


@cache
def rendered(name: str) -> tuple[Obj, ...]:
    """The objects of a named value set (rendered once per test session)."""
    return tuple(render(values_of(name)))


def validate_schema(values: Obj) -> None:
    """Helm's own check of values against values.schema.json (raises HelmValuesError)."""
    _chart().validate_schema(values)


def lint(values: Obj | None) -> dict[str, Any]:
    return helm.lint(
        CHART, values, strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSIONS[-1]
    )


# Pods


def pod_templates(obj: Obj) -> Iterator[tuple[str, Obj]]:
    """(where, pod template) for every pod an object makes, KubeRay's head and workers included."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    spec = obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield f"{kind}/{name}", spec["template"]
    elif kind == "RayCluster":
        yield f"RayCluster/{name}/head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"RayCluster/{name}/{group['groupName']}", group["template"]


def containers(pod_spec: Obj) -> list[Obj]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


# Validation


def validate_object(obj: Obj, kube_version: str) -> None:
    """Raise if the object is not valid: core kinds against Kubernetes' OpenAPI schema, custom
    resources against their CRD's schema (and their pod templates as core PodTemplates)."""
    validator = crd_validators().get((obj["apiVersion"], obj["kind"]))
    if validator is None:
        kubernetes_validate.validate(obj, kube_version, strict=True)
        return
    validator.validate(obj)
    for where, template in pod_templates(obj):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": where.replace("/", "-").lower()},
            "template": template,
        }
        kubernetes_validate.validate(pod_template, kube_version, strict=True)


@cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """A strict validator per (apiVersion, kind) served by the CRDs under test."""
    validators = {}
    for path in CRD_FILES:
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def strict_schema(schema: Obj) -> Obj:
    """A CRD's structural schema as JSON Schema that refuses unknown fields where the API server
    would prune them (objects with `properties` and no `x-kubernetes-preserve-unknown-fields`)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    # metadata is the API server's: any ObjectMeta passes here (kubernetes-validate checks it
    # for core kinds).
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return schema
