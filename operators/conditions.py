"""Kubernetes-style status conditions, kept as plain lists of dicts (what status stores)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]], kind: str, status: bool, reason: str, message: str = ""
) -> list[dict[str, Any]]:
    """`conditions` with `kind` set; `lastTransitionTime` moves only when the status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == kind), None)
    changed_at = old["lastTransitionTime"] if old and old.get("status") == value else now_iso()
    new = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message[:1000],
        "lastTransitionTime": changed_at,
    }
    return [c for c in conditions if c.get("type") != kind] + [new]


def condition(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)
