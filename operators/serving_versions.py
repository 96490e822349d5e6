"""Which versions an `AdapterSync` serves, and whether its pods can load one: `resolve` (each
listed adapter at its version or alias, or every adapter of the base through the registry's
serving index, asked for with the ETag of the one kept between syncs) and `preflight` (vLLM's
rules, the rank against the pods' `--max-lora-rank`, the base)."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from loraforge.client import Client
from loraforge.vllm_rules import smallest_vllm_max_lora_rank, vllm_problems

IndexCache = MutableMapping[str, Any]
"""What one AdapterSync's last reconciliations kept of the registry's serving index (kopf's
per-object memo): its ETag and its versions."""


def resolve(
    client: Client, spec: dict[str, Any], cache: IndexCache | None = None
) -> list[dict[str, Any]]:
    """The versions to serve: each listed adapter at its version or alias, or every adapter
    of the base at the alias. The serving index is asked for with the ETag of the one kept in
    `cache`: unchanged, the registry answers 304 from the versions' names, numbers and ids,
    and the kept versions serve again."""
    alias = spec.get("alias") or "latest"
    if not spec.get("adapters"):
        cache = {} if cache is None else cache
        key = f"{spec['baseModel']}|{alias}"
        kept = cache.get("serving_index")
        etag = kept["etag"] if kept is not None and kept["key"] == key else None
        index, etag = client.serving_index(spec["baseModel"], alias, etag=etag)
        if index is not None:
            cache["serving_index"] = {"key": key, "etag": etag, "data": index.get("data", [])}
        return list(cache["serving_index"]["data"])
    return [
        client.get_version(a["name"], a.get("version") or a.get("alias") or alias)
        for a in spec["adapters"]
    ]


def preflight(spec: dict[str, Any], version: dict[str, Any], directory: Path) -> list[str]:
    """Why the selected pods would refuse this pulled version (empty when they can load it)."""
    problems = (
        []
        if version["base_model"] == spec["baseModel"]
        else [
            f"{version['model']} was trained on {version['base_model']}, "
            f"the pods serve {spec['baseModel']}"
        ]
    )
    problems += vllm_problems(directory)
    try:
        rank = json.loads((directory / "adapter_config.json").read_text()).get("r")
    except (OSError, ValueError):
        return problems
    max_rank = spec["vllm"]["maxLoraRank"]
    if isinstance(rank, int) and rank > max_rank:
        problems.append(
            f"r={rank} exceeds the pods' --max-lora-rank {max_rank} "
            f"(it needs --max-lora-rank {smallest_vllm_max_lora_rank(rank)})"
        )
    return problems
