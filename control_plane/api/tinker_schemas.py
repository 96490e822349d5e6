"""The bodies the Tinker-compatible API (`/api/v1`, `routes/tinker.py`) takes from the official
`tinker` SDK (0.38), written here from the SDK's wire shapes rather than imported from it.

Every body forbids fields it does not declare, and declares each field the SDK sends, so a
field loraforge cannot honour is refused (400 naming it) rather than silently ignored: images
and audio in a prompt, a non-Adam optimizer, cross-account loads. The sample's body, whose
checks read its prompt, is in `tinker_sample_schemas.py`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from control_plane import age_export
from control_plane.api.numbers import WholeNumber
from control_plane.interactive_runs import MAX_TTL_SECONDS, MIN_TTL_SECONDS
from control_plane.interactive_saves import CheckpointType

Id = Annotated[str, Field(min_length=1, max_length=64)]
# A checkpoint's time to live, the SDK's bounds: an hour to ten years.
TtlSeconds = Annotated[WholeNumber, Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)]
# A checkpoint's name becomes the last segment of its tinker:// path, so no slash in it.
CheckpointName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")]
Metadata = dict[str, Any] | None
Token = Annotated[int, Field(ge=0, lt=2**31)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ClientConfigBody(_Body):
    sdk_version: str = Field(default="", max_length=64)


class SessionCreate(_Body):
    type: Literal["create_session"] = "create_session"
    tags: list[Annotated[str, Field(max_length=200)]] = Field(default=[], max_length=64)
    user_metadata: Metadata = None
    sdk_version: str | None = Field(default=None, max_length=64)
    project_id: str | None = Field(default=None, max_length=200)
    display_name: str | None = Field(default=None, max_length=200)


class SessionHeartbeat(_Body):
    type: Literal["session_heartbeat"] = "session_heartbeat"
    session_id: Id


class FinishReasonBody(_Body):
    type: Literal["success", "errored", "interrupted"]


class SessionFinish(_Body):
    reason: FinishReasonBody | None = None
    detail: str | None = None

    @field_validator("detail")
    @classmethod
    def _kept_short(cls, detail: str | None) -> str | None:
        """A client's long detail (a traceback) is kept to its first 10,000 characters: refusing
        it would leave the session unfinished and its models loaded."""
        return None if detail is None else detail[:10_000]


class LoraConfig(_Body):
    rank: int = Field(ge=1, le=512, description="LoRA rank")
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    @model_validator(mode="after")
    def _trains_something(self) -> LoraConfig:
        if not (self.train_unembed or self.train_mlp or self.train_attn):
            raise ValueError("at least one of train_mlp, train_attn or train_unembed must be true")
        return self


class AdamOnly(_Body):
    type: Literal["adamw"] = "adamw"


class ModelCreate(_Body):
    type: Literal["create_model"] = "create_model"
    session_id: Id
    model_seq_id: int = Field(ge=0)
    base_model: str = Field(min_length=1, max_length=200)
    user_metadata: Metadata = None
    lora_config: LoraConfig
    optimizer_config: AdamOnly = AdamOnly()


class ModelRef(_Body):
    """`get_info` and `unload_model`: the model alone."""

    type: Literal["get_info", "unload_model"] | None = None
    model_id: Id


class EncodedText(_Body):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[Token] = Field(min_length=1)


class ModelInput(_Body):
    chunks: list[EncodedText] = Field(min_length=1)

    def tokens(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk.tokens]


class Tensor(_Body):
    data: list[float] | list[int]
    dtype: Literal["float32", "int64"]
    shape: list[Annotated[int, Field(ge=0)]] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    @model_validator(mode="after")
    def _integers_for_int64(self) -> Tensor:
        if self.dtype == "int64" and not all(isinstance(v, int) for v in self.data):
            raise ValueError("an int64 tensor's data must be integers")
        return self


class Datum(_Body):
    model_input: ModelInput
    loss_fn_inputs: dict[str, Tensor] = {}


# The losses the executor computes and the `loss_fn_config` settings each reads
# (`workers/interactive/losses.py`, which checks their values; a test holds them equal), and
# `custom`: a loss the session uploaded (`create_custom_loss`), named by its `loss_id`. The
# SDK also names `stable_reinforce`, which is not computed here.
LossFn = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "custom"]
LOSS_SETTINGS: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset(),
    "importance_sampling": frozenset(),
    "ppo": frozenset({"clip_low_threshold", "clip_high_threshold"}),
    "cispo": frozenset({"clip_low_threshold", "clip_high_threshold"}),
    "dro": frozenset({"beta"}),
    "gspo": frozenset({"clip_low_threshold", "clip_high_threshold"}),
    "custom": frozenset({"loss_id"}),
}


class ForwardBackwardInput(_Body):
    data: list[Datum] = Field(min_length=1)
    loss_fn: LossFn
    loss_fn_config: dict[str, float | str] | None = None

    @field_validator("loss_fn", mode="before")
    @classmethod
    def _a_loss_computed_here(cls, value: Any) -> Any:
        # Said here rather than by the Literal, whose message lists the names and never says
        # that a loss the SDK offers (`stable_reinforce`) is not supported, nor what to use.
        if not (isinstance(value, str) and value in LOSS_SETTINGS):
            raise PydanticCustomError(
                "loss_fn_not_supported",
                "loss_fn {loss_fn} is not supported here; use one of {supported} (or "
                "forward_backward_custom: a function runs on them, a create_custom_loss handle "
                "runs here as loss_fn 'custom')",
                {"loss_fn": repr(value), "supported": str(sorted(set(LOSS_SETTINGS) - {"custom"}))},
            )
        return value

    @model_validator(mode="after")
    def _settings_the_loss_reads(self) -> ForwardBackwardInput:
        reads = LOSS_SETTINGS[self.loss_fn]
        unknown = sorted(set(self.loss_fn_config or {}) - reads)
        if unknown:
            raise ValueError(
                f"{self.loss_fn}'s loss_fn_config reads {sorted(reads) or 'nothing'}, not {unknown}"
            )
        if self.loss_fn == "custom" and not isinstance(
            (self.loss_fn_config or {}).get("loss_id"), str
        ):
            raise ValueError(
                "custom's loss_fn_config needs {'loss_id': the id create_custom_loss answered}"
            )
        return self

    @property
    def custom_loss_id(self) -> str | None:
        if self.loss_fn != "custom":
            return None
        return str((self.loss_fn_config or {})["loss_id"])


class ForwardBackward(_Body):
    """Decoded from the SDK's protobuf (`tinker_wire`), or sent as this JSON."""

    model_id: Id
    seq_id: int | None = Field(default=None, ge=0)
    forward_only: bool = False
    forward_backward_input: ForwardBackwardInput


class AdamParams(_Body):
    learning_rate: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    grad_clip_norm: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class OptimStep(_Body):
    type: Literal["optim_step"] = "optim_step"
    model_id: Id
    seq_id: int | None = Field(default=None, ge=0)
    adam_params: AdamParams


class SaveWeights(_Body):
    """`save_weights` (state: adapter and optimizer, to resume) and `save_weights_for_sampler`
    (an adapter to sample from); without a `path` (name), a sampler save is ephemeral and its
    answer is a sampling session on it."""

    type: Literal["save_weights", "save_weights_for_sampler"] | None = None
    model_id: Id
    path: CheckpointName | None = None
    seq_id: int | None = Field(default=None, ge=0)
    sampling_session_seq_id: int | None = Field(default=None, ge=0)
    kind: Literal["snapshot"] = "snapshot"
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsExternal(_Body):
    """`save_weights_external`: the adapter for use outside the platform, under a name, each
    file encrypted to `age_encryption_recipients` when given."""

    type: Literal["save_weights_external"] | None = None
    model_id: Id
    path: CheckpointName
    seq_id: int | None = Field(default=None, ge=0)
    ttl_seconds: TtlSeconds | None = None
    age_encryption_recipients: list[str] | None = None

    @field_validator("age_encryption_recipients")
    @classmethod
    def _age_recipients(cls, keys: list[str] | None) -> list[str] | None:
        if keys is not None:
            age_export.recipients(keys)  # ValueError naming the key that is not one
        return keys


class ExternalWeightsUrls(BaseModel):
    urls: dict[str, str]
    expires: datetime


class LoadWeights(_Body):
    """A load into a model (`model_id`, after its creation), or a new training run of the
    session started from the weights (`session_id` and `model_seq_id`: the SDK's
    `create_training_client_from_state`)."""

    type: Literal["load_weights"] = "load_weights"
    model_id: Id | None = None
    seq_id: int | None = Field(default=None, ge=0)
    session_id: Id | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    base_model: str | None = Field(default=None, min_length=1, max_length=200)
    user_metadata: dict[str, str] | None = None
    path: str = Field(min_length=len("tinker://") + 1, max_length=1000, pattern=r"^tinker://")
    optimizer: bool
    optimizer_config: AdamOnly | None = None

    @model_validator(mode="after")
    def _one_addressing(self) -> LoadWeights:
        into_model = self.model_id is not None
        new_run = self.session_id is not None and self.model_seq_id is not None
        if into_model == new_run or (into_model and self.model_seq_id is not None):
            raise ValueError(
                "give model_id (a model to load into) or session_id with model_seq_id (a new "
                "training run from the weights), not both"
            )
        if into_model and (self.base_model is not None or self.user_metadata is not None):
            raise ValueError("base_model and user_metadata are for a new training run only")
        return self


class SamplingSessionCreate(_Body):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    session_id: Id
    sampling_session_seq_id: int = Field(ge=0)
    base_model: str | None = Field(default=None, min_length=1, max_length=200)
    model_path: str | None = Field(default=None, max_length=1000, pattern=r"^tinker://")

    @model_validator(mode="after")
    def _names_a_model(self) -> SamplingSessionCreate:
        if self.base_model is None and self.model_path is None:
            raise ValueError("give model_path (a tinker:// sampler checkpoint) or base_model")
        return self


class FutureRef(_Body):
    request_id: Id
    allow_metadata_only: bool = False


class FutureCancel(_Body):
    request_id: Id


class SupportedModel(BaseModel):
    model_name: str
    trainable: bool = True
    sampleable: bool = True
    max_context_length: int | None = None


class ServerCapabilities(BaseModel):
    supported_models: list[SupportedModel]


class UntypedFuture(BaseModel):
    """What each queued call answers at once: the future to poll with `retrieve_future`."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class ModelData(BaseModel):
    arch: str | None
    model_name: str
    tokenizer_id: str


class ModelInfo(BaseModel):
    type: Literal["get_info"] = "get_info"
    model_id: str
    model_data: ModelData
    model_name: str
    is_lora: bool = True
    lora_rank: int | None
    optimizer_config: AdamOnly = AdamOnly()


class SamplerInfo(BaseModel):
    sampler_id: str
    base_model: str
    model_path: str | None


class CheckpointTtl(_Body):
    ttl_seconds: TtlSeconds | None


class Cursor(BaseModel):
    offset: int
    limit: int
    total_count: int


class Checkpoint(BaseModel):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None
    public: bool = False
    expires_at: datetime | None
    user_metadata: dict[str, Any] | None
    training_run_id: str
    published_version_id: str | None


class CheckpointsList(BaseModel):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(BaseModel):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool = True
    corrupted: bool = False
    lora_rank: int | None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None
    last_sampler_checkpoint: Checkpoint | None
    user_metadata: dict[str, str] | None
    session_id: str
    loaded: bool


class TrainingRuns(BaseModel):
    training_runs: list[TrainingRun]
    cursor: Cursor


class WeightsPath(_Body):
    tinker_path: str = Field(max_length=1000, pattern=r"^tinker://")


class WeightsInfo(BaseModel):
    base_model: str
    is_lora: bool = True
    lora_rank: int | None
    train_unembed: bool | None
    train_mlp: bool | None
    train_attn: bool | None


class SessionList(BaseModel):
    sessions: list[str]
    cursor: Cursor


class SessionInfo(BaseModel):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, Any] | None
    display_name: str | None = None


class CheckpointStorageItem(BaseModel):
    """The SDK's `CurrentCheckpointStorageUsageItem`: loraforge has no projects, and a tenant's
    keys are not users, so the one item is the tenant's (its name as `user_name`)."""

    project_id: str | None = None
    org_user_urn: str | None = None
    user_email: str | None = None
    user_name: str | None = None
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    estimated_monthly_cost_usd: float | None = None


class CheckpointStorageUsage(BaseModel):
    """The SDK's `CurrentCheckpointStorageUsageResponse`: no rate, as loraforge bills nothing."""

    effective_rate_usd_per_gigabyte_month: float | None = None
    data: list[CheckpointStorageItem]
