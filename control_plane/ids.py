"""Public identifiers: a readable prefix and a random suffix (OpenAI-style `file-...`)."""

from __future__ import annotations

import secrets

PREFIXES = {
    "tenant": "tenant",
    "key": "key",
    "file": "file",
    "job": "ftjob",
    "checkpoint": "ftckpt",
    "base": "base",
    "adapter": "adapter",
    "version": "adver",
    "webhook": "whep",
    "interactive_session": "sess",
    "interactive_model": "imdl",
    "interactive_call": "fut",
    "interactive_checkpoint": "ickpt",
    "interactive_custom_loss": "closs",
    "batch": "batch",
}


def new_id(kind: str) -> str:
    return f"{PREFIXES[kind]}-{secrets.token_hex(12)}"
