"""Where a base model stands in the catalog: the one vocabulary for `base_models.status`.

A base registered from a checkout on disk is `ready` at once; one given by a source that a
trainer must import is `registering` until the import ends `ready` or `failed` (with its
`error_message`). Only a `ready` base takes jobs.
"""

from __future__ import annotations

from enum import StrEnum


class BaseStatus(StrEnum):
    """A `StrEnum`, so a member is its own database and JSON value."""

    REGISTERING = "registering"
    READY = "ready"
    FAILED = "failed"
