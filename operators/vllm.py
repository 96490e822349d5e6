"""vLLM's runtime LoRA endpoints (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`), one pod at a time.

A 4xx is vLLM refusing the adapter (rank above --max-lora-rank, DoRA, no free slot, a bad
path): permanent for that version. A connection error or a 5xx is the pod not answering:
temporary, retried with backoff.
"""

from __future__ import annotations

from typing import Any

import httpx


class VllmRefused(Exception):
    """vLLM answered 4xx: it will refuse this request again."""


class VllmUnreachable(Exception):
    """No answer, or a 5xx: try again later."""


class VllmPod:
    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise VllmUnreachable(f"{self.base_url}: {exc}") from None
        if response.status_code >= 500:
            raise VllmUnreachable(
                f"{self.base_url}{path}: {response.status_code} {response.text[:300]}"
            )
        if response.status_code >= 400:
            raise VllmRefused(f"{path}: {response.status_code} {_message(response)}")
        return response

    def models(self) -> set[str]:
        """The served names: the base model and every loaded adapter."""
        return {m["id"] for m in self._call("GET", "/v1/models").json().get("data", [])}

    def load(self, name: str, path: str) -> None:
        self._call("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

    def unload(self, name: str) -> None:
        self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or body)[:500]
        return str(error)[:500]
    return str(body)[:500]
