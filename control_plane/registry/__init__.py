"""The adapter registry: adapters, their immutable versions, aliases, and publication into it.

An adapter is a named line of versions per tenant, bound to one base model. A version is a
PEFT directory (`adapter_config.json`, `adapter_model.safetensors`) stored write-once under
`adapter_version_prefix(tenant, name, number)`, next to a `manifest.json` that records its
files, their sha256 and its lineage. Publication uploads and verifies the files, writes the
manifest last, and only then commits the version row in the transaction that marks the job
`succeeded` (`JobQueue.complete`), so a version is never visible half-made and a job publishes
at most one version (the version row is unique per job).

Aliases (`prod`, `staging`, ...) point at versions; every move is recorded with the acting
key and the time, and the current aliases plus their history are also written to
`tenants/<t>/adapters/<name>/aliases.json`, so the bucket alone is enough to rebuild the whole
registry (`rebuild_from_manifests`). All registry SQL lives in this package, one module per
concern: `names` (names, references, errors), `reads` (records and queries), `aliases` (aliases
and deleting versions), `publication`, `rebuild`. Callers import from the package.
"""

from control_plane.registry.aliases import (
    alias_history,
    aliases_key,
    delete_alias,
    delete_version,
    fetch_version_files,
    list_aliases,
    remove_version_objects,
    set_alias,
)
from control_plane.registry.names import (
    ADAPTER_FILES,
    ALIAS_MAX,
    ALIAS_SHAPE,
    ALIASES_FILE,
    LATEST,
    MANIFEST,
    MANIFEST_FORMAT,
    MAX_VERSION,
    NAME_MAX,
    NAME_SHAPE,
    RESERVED_ADAPTER_NAMES,
    AdapterFilesError,
    AdapterNotFoundError,
    AdapterShapeMismatchError,
    AliasNotFoundError,
    BaseModelMismatchError,
    BaseModelNotFoundError,
    CheckpointNotFoundError,
    InvalidNameError,
    RegistryError,
    StoreUnavailableError,
    VersionInUseError,
    VersionNotFoundError,
    model_id,
    parse_ref,
    validate_adapter_name,
    validate_alias_name,
    validate_name,
)
from control_plane.registry.publication import (
    RegistryParts,
    derive_adapter_name,
    publish_checkpoint,
    publish_job_adapter,
)
from control_plane.registry.reads import (
    ADAPTER_SHAPE,
    AdapterRecord,
    AdapterVersionRecord,
    AliasEventRecord,
    AliasRecord,
    PublishedVersion,
    ServingIndex,
    continued_hyperparameters,
    get_adapter,
    get_version_by_id,
    job_parent_version,
    list_adapters,
    list_versions,
    resolve_parent,
    resolve_version,
    serving_etag,
    serving_index,
    version_for_job,
)
from control_plane.registry.rebuild import (
    RebuildReport,
    rebuild_from_manifests,
)

__all__ = [
    "ADAPTER_FILES",
    "ADAPTER_SHAPE",
    "ALIASES_FILE",
    "ALIAS_MAX",
    "ALIAS_SHAPE",
    "LATEST",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MAX_VERSION",
    "NAME_MAX",
    "NAME_SHAPE",
    "RESERVED_ADAPTER_NAMES",
    "AdapterFilesError",
    "AdapterNotFoundError",
    "AdapterRecord",
    "AdapterShapeMismatchError",
    "AdapterVersionRecord",
    "AliasEventRecord",
    "AliasNotFoundError",
    "AliasRecord",
    "BaseModelMismatchError",
    "BaseModelNotFoundError",
    "CheckpointNotFoundError",
    "InvalidNameError",
    "PublishedVersion",
    "RebuildReport",
    "RegistryError",
    "RegistryParts",
    "ServingIndex",
    "StoreUnavailableError",
    "VersionInUseError",
    "VersionNotFoundError",
    "alias_history",
    "aliases_key",
    "continued_hyperparameters",
    "delete_alias",
    "delete_version",
    "derive_adapter_name",
    "fetch_version_files",
    "get_adapter",
    "get_version_by_id",
    "job_parent_version",
    "list_adapters",
    "list_aliases",
    "list_versions",
    "model_id",
    "parse_ref",
    "publish_checkpoint",
    "publish_job_adapter",
    "rebuild_from_manifests",
    "remove_version_objects",
    "resolve_parent",
    "resolve_version",
    "serving_etag",
    "serving_index",
    "set_alias",
    "validate_adapter_name",
    "validate_alias_name",
    "validate_name",
    "version_for_job",
]
