"""The few Kubernetes calls the operator makes itself (kopf does the watching and patching):
Secrets for API credentials, Pods by label selector, deleting a finished object, and the one
write, a `Tenant`'s admin-key Secret.

The connection is the one kopf logged in with, so one set of credentials serves both.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import kopf

from loraforge.client import Client


class KubeError(Exception):
    """The Kubernetes API refused a request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def selector_string(selector: dict[str, Any]) -> str:
    """A LabelSelector as the `labelSelector` query parameter (set-based syntax included)."""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], ",".join(expr.get("values") or [])
        parts.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": key,
                "DoesNotExist": f"!{key}",
            }[op]
        )
    return ",".join(parts)


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether `labels` satisfy a LabelSelector: matchLabels and every matchExpression."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


class KubeApi:
    """A synchronous client for the operator's own reads (kopf runs sync handlers in threads)."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        verify = info.as_ssl_context() if info.server.startswith("https") else True
        headers = {"Authorization": f"{info.scheme or 'Bearer'} {info.token}"} if info.token else {}
        auth = (info.username, info.password) if info.username and info.password else None
        self._http = httpx.Client(
            base_url=info.server, headers=headers, auth=auth, verify=verify, timeout=30
        )

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise KubeError(response.status_code, str(message)[:500])
        return response.json() if response.content else None

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        """The Secret's keys, decoded."""
        secret = self._call("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        return {**data, **(secret.get("stringData") or {})}

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret as the API server has it (its owners included), or None when there is none."""
        try:
            found: dict[str, Any] = self._call(
                "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}"
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def create_secret(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        owner: dict[str, Any],
        annotations: dict[str, str] | None = None,
    ) -> None:
        """A new Secret owned by `owner` (an object's body), so the garbage collector removes it
        with its owner; 409 when the name is taken. Create only, never replace: the operator
        writes no Secret that someone else may own."""
        meta = owner["metadata"]
        reference = {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
        }
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": annotations or {},
                "ownerReferences": [reference],
            },
            "data": encoded,
        }
        self._call("POST", f"/api/v1/namespaces/{namespace}/secrets", json=secret)

    def pods(self, namespace: str, selector: dict[str, Any]) -> list[dict[str, Any]]:
        """Pods matching `selector` (checked here too: the selector is the contract)."""
        found = self._call(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            params={"labelSelector": selector_string(selector)},
        )
        return [
            p
            for p in found.get("items") or []
            if selector_matches(selector, p.get("metadata", {}).get("labels") or {})
        ]

    def delete(self, namespace: str, plural: str, name: str) -> None:
        self._call("DELETE", f"/apis/loraforge.dev/v1alpha1/namespaces/{namespace}/{plural}/{name}")


def api_client(kube: KubeApi, namespace: str, spec: dict[str, Any]) -> Client:
    """The loraforge client for an object, from its `credentialsSecretRef` (keys `url` and
    `apiKey`): credentials never sit in a spec or an annotation."""
    name = spec["credentialsSecretRef"]["name"]
    data = kube.secret_data(namespace, name)
    missing = [k for k in ("url", "apiKey") if not data.get(k)]
    if missing:
        raise KubeError(422, f"Secret {namespace}/{name} lacks {', '.join(missing)}")
    return Client(data["url"], data["apiKey"], timeout=30)
