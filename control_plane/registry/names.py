"""Adapter and alias names, references (`name@version|alias`) and the registry's errors."""

from __future__ import annotations

import re

from control_plane.storage import (
    ObjectStoreError,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"
ALIASES_FILE = "aliases.json"
MANIFEST_FORMAT = "loraforge.adapter-manifest/1"
NAME_MAX = 128
ALIAS_MAX = 64
LATEST = "latest"
MAX_VERSION = 2**31 - 1
# The base model's fields a version's lineage records (and rebuild restores).
BASE_MODEL_LINEAGE_FIELDS = (
    "id",
    "name",
    "source",
    "source_kind",
    "revision",
    "sha256",
    "architecture",
    "parameter_count",
    "has_chat_template",
)
RESERVED_ADAPTER_NAMES = frozenset({"index"})  # `/v1/adapters/index` is the serving index
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The same rule as JSON Schema patterns, for the API's documentation (`validate_name` decides;
# it also refuses `..` and the reserved names, which a pattern does not say).
NAME_SHAPE = f"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}$"
ALIAS_SHAPE = f"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{ALIAS_MAX - 1}}}$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What a failing object store raises: its own family (S3's errors translated inside
# `storage/`), or the local disk's.
STORE_ERRORS = (ObjectStoreError, OSError)

# --------------------------------------------------------------------------- errors


class RegistryError(Exception):
    """A refusal of the registry, with a stable `code`; `retryable` tells a trainer whether
    failing the job for another attempt can help."""

    code = "registry_error"
    retryable = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidNameError(RegistryError):
    code = "invalid_name"


class AdapterNotFoundError(RegistryError):
    code = "adapter_not_found"


class VersionNotFoundError(RegistryError):
    code = "version_not_found"


class AliasNotFoundError(RegistryError):
    code = "alias_not_found"


class BaseModelNotFoundError(RegistryError):
    code = "base_model_not_found"


class CheckpointNotFoundError(RegistryError):
    code = "checkpoint_not_found"


class VersionInUseError(RegistryError):
    code = "version_in_use"


class BaseModelMismatchError(RegistryError):
    code = "base_model_mismatch"


class AdapterShapeMismatchError(RegistryError):
    code = "adapter_shape_mismatch"


class AdapterFilesError(RegistryError):
    code = "adapter_files_missing"


class StoreUnavailableError(RegistryError):
    """The object store failed (outage, missing bucket): nothing was made visible."""

    code = "object_store_unavailable"
    retryable = True


# --------------------------------------------------------------------------- names


def is_number(ref: str) -> bool:
    return ref.isascii() and ref.isdigit()


def validate_name(value: str, what: str = "adapter name", *, max_length: int = NAME_MAX) -> str:
    """Return `value` if it is a safe registry name, else raise `InvalidNameError`.

    Names become object-store path segments and URL path segments: no path separators, no
    `..`, no control characters, at most `max_length` characters, and only letters, digits,
    `.`, `_` and `-`, starting with a letter or digit.
    """
    if not value:
        raise InvalidNameError(f"{what} must not be empty", param=what)
    if len(value) > max_length:
        raise InvalidNameError(f"{what} is longer than {max_length} characters", param=what)
    if _CONTROL.search(value):
        raise InvalidNameError(f"{what} {value!r} contains control characters", param=what)
    if "/" in value or "\\" in value:
        raise InvalidNameError(f"{what} {value!r} contains a path separator", param=what)
    if ".." in value:
        raise InvalidNameError(f"{what} {value!r} contains '..'", param=what)
    if not _NAME.fullmatch(value):
        raise InvalidNameError(
            f"{what} {value!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param=what,
        )
    return value


def validate_adapter_name(name: str) -> str:
    validate_name(name)
    if name in RESERVED_ADAPTER_NAMES:
        raise InvalidNameError(
            f"adapter name {name!r} is reserved (/v1/adapters/{name} is a route of the API); "
            "choose another name",
            param="adapter name",
        )
    return name


def validate_alias_name(alias: str) -> str:
    """Aliases may not look like version numbers or be `latest`, so a reference is never
    ambiguous."""
    validate_name(alias, "alias", max_length=ALIAS_MAX)
    if is_number(alias) or alias == LATEST:
        raise InvalidNameError(
            f"alias {alias!r} is reserved or looks like a version", param="alias"
        )
    return alias


def parse_ref(ref: str) -> tuple[str, str]:
    """`name[@version|alias|latest]` → (name, reference); the reference defaults to `latest`."""
    name, _, version = ref.partition("@")
    validate_adapter_name(name)
    version = version or LATEST
    if not is_number(version) and version != LATEST:
        validate_alias_name(version)
    return name, version


def model_id(adapter_name: str, number: int) -> str:
    """The stable id of a version (`name@3`): the job's `fine_tuned_model`, and a pull ref."""
    return f"{adapter_name}@{number}"
