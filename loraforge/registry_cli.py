"""`loraforge pull` and `loraforge registry rebuild`, added to the main parser by
`add_registry_commands`.

`pull` is a plain API client (what a serving cluster runs); `registry rebuild` is an operator's
disaster-recovery command that talks to the database and the object store directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from control_plane.settings import Settings


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    import httpx

    from loraforge.client import ChecksumError, Client, LoraforgeError, TargetNotEmptyError
    from loraforge.vllm_rules import smallest_vllm_max_lora_rank, vllm_problems

    url = args.url or os.environ.get("LORAFORGE_URL") or f"http://{settings.host}:{settings.port}"
    api_key = args.api_key or os.environ.get("LORAFORGE_API_KEY")
    if not api_key:
        print("pull needs an API key: --api-key or LORAFORGE_API_KEY", file=sys.stderr)
        return 2
    try:
        with Client(url, api_key) as client:
            path = client.pull(args.ref, args.dir, base_model_name=args.base_model_name)
    except (LoraforgeError, ChecksumError, TargetNotEmptyError, ValueError, OSError) as exc:
        print(f"pull failed: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:  # unreachable API, or a download cut short
        print(f"pull failed: {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(path)
    problems = vllm_problems(path)
    for problem in problems:
        print(f"note: vLLM would not load this adapter: {problem}", file=sys.stderr)
    if not problems:
        rank = json.loads((path / "adapter_config.json").read_text())["r"]
        print(
            f"vLLM: --enable-lora --max-lora-rank {smallest_vllm_max_lora_rank(rank)} "
            f"--lora-modules {path.name}={path}",
            file=sys.stderr,
        )
    return 0


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from control_plane import db, registry
    from control_plane.services import build_object_store

    url = db.resolve_database_url(settings)
    db.upgrade(url)
    engine = db.make_engine(url, pool_size=1)
    try:
        report = registry.rebuild_from_manifests(engine, build_object_store(settings))
    finally:
        engine.dispose()
    print(
        json.dumps(
            {
                "versions_restored": report.versions,
                "aliases_restored": report.aliases,
                "skipped": report.skipped,
            },
            indent=2,
        )
    )
    return 0


def add_registry_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `pull` and `registry rebuild`; each sets `func(args, settings) -> int`."""
    pull = subparsers.add_parser(
        "pull",
        help="download an adapter version as a PEFT directory (verified, atomic)",
        description="Pull <adapter>[@<version|alias>] into DIR; a no-op when DIR has it already.",
    )
    pull.add_argument("ref", metavar="ADAPTER[@VERSION|ALIAS]")
    pull.add_argument("dir", metavar="DIR")
    pull.add_argument(
        "--base-model-name",
        default=None,
        help="write this into adapter_config.json's base_model_name_or_path "
        "(vLLM loads an adapter only when it equals the served model's name)",
    )
    pull.add_argument("--url", default=None, help="API URL (default: $LORAFORGE_URL)")
    pull.add_argument("--api-key", default=None, help="API key (default: $LORAFORGE_API_KEY)")
    pull.set_defaults(func=cmd_pull)

    reg = subparsers.add_parser("registry", help="adapter registry administration")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)
    rebuild = reg_sub.add_parser(
        "rebuild", help="recreate the registry rows from the manifests in the object store"
    )
    rebuild.set_defaults(func=cmd_rebuild)
