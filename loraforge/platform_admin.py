"""The platform operators' calls (`/v1/tenants`) over a `Client` that holds an operator's key
(an admin key of a tenant that `LORAFORGE_PLATFORM_OPERATOR_TENANTS` names)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from loraforge.client import Client


class PlatformAdmin:
    """Tenants onboarded, limited and keyed: `PlatformAdmin(Client(url, operator_key))`."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def _path(self, name: str, rest: str = "") -> str:
        return f"/v1/tenants/{quote(name, safe='')}{rest}"

    def create_tenant(
        self,
        name: str,
        *,
        max_running_jobs: int | None = None,
        max_priority: int | None = None,
        max_interactive_models: int | None = None,
        max_checkpoint_bytes: int | None = None,
        admin_key_name: str = "admin",
    ) -> dict[str, Any]:
        """A new tenant and its first admin key (`admin_key["key"]`, shown only here)."""
        body = {
            "name": name,
            "max_running_jobs": max_running_jobs,
            "max_priority": max_priority,
            "max_interactive_models": max_interactive_models,
            "max_checkpoint_bytes": max_checkpoint_bytes,
            "admin_key_name": admin_key_name,
        }
        return dict(self.client.request("POST", "/v1/tenants", json=body))

    def list_tenants(self, *, page_size: int = 100) -> list[dict[str, Any]]:
        """Every tenant by name, following the pages."""
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": page_size}
        while True:
            page = self.client.request("GET", "/v1/tenants", params=params)
            found.extend(page["data"])
            if not page["has_more"]:
                return found
            params["after"] = page["last_id"]

    def usage(self, starting_on: str, ending_before: str) -> list[dict[str, Any]]:
        """Every tenant's usage in the window (RFC 3339 times on hour boundaries, at most 93
        days), by name: its fine-tuning jobs' trainer seconds, succeeded jobs and their trained
        tokens, and its interactive sessions' training, prompt and sampled tokens and
        checkpoints."""
        params = {"starting_on": starting_on, "ending_before": ending_before}
        return list(self.client.request("GET", "/v1/usage", params=params)["data"])

    def get_tenant(self, name: str) -> dict[str, Any]:
        return dict(self.client.request("GET", self._path(name)))

    def set_limits(self, name: str, **limits: int | None) -> dict[str, Any]:
        """`max_running_jobs=`, `max_priority=`, `max_interactive_models=` and/or
        `max_checkpoint_bytes=` (None: the platform's default); a limit not given stays as it
        is. The tenant as it now is."""
        return dict(self.client.request("PATCH", self._path(name), json=limits))

    def list_keys(self, name: str) -> list[dict[str, Any]]:
        return list(self.client.request("GET", self._path(name, "/api_keys"))["data"])

    def create_key(
        self, name: str, *, role: str = "member", key_name: str = "default"
    ) -> dict[str, Any]:
        """A key for the tenant (`key`, the plaintext, shown only here)."""
        body = {"role": role, "name": key_name}
        return dict(self.client.request("POST", self._path(name, "/api_keys"), json=body))

    def revoke_key(self, name: str, key_id: str) -> dict[str, Any]:
        path = self._path(name, f"/api_keys/{quote(key_id, safe='')}")
        return dict(self.client.request("DELETE", path))
