"""One settings object, read from `LORAFORGE_*` environment variables, that validates itself."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TENANT = "default"
"""The tenant the embedded default creates and whose bootstrap admin key `up` prints."""


def _default_home() -> Path:
    return Path.home() / ".loraforge"


class Settings(BaseSettings):
    """Configuration of every loraforge process (API, celery, trainers, CLI).

    With nothing set, it describes the embedded default: an embedded PostgreSQL under
    `home`, a local directory as the object store and a local Ray instance.
    """

    model_config = SettingsConfigDict(env_prefix="LORAFORGE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    home: Path = Field(default_factory=_default_home)

    # Database: unset means the embedded PostgreSQL (pgserver) under `home`.
    database_url: str | None = None

    # Object store: S3 when a bucket is set, else a local directory.
    s3_bucket: str | None = None
    s3_prefix: str = "loraforge"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    local_store_dir: Path | None = None

    # Celery broker: Redis (or any kombu URL) when set; else kombu's SQLAlchemy transport over
    # the same PostgreSQL, so that the embedded default needs no second server.
    broker_url: str | None = None

    # Hugging Face hub for bases registered by hub id (unset: huggingface_hub's default).
    hf_endpoint: str | None = None

    # Ray: unset starts (or joins) a local instance.
    ray_address: str | None = None
    # CPUs each Ray Train worker of a multi-GPU (num_gpus > 1) job reserves.
    ray_train_cpus_per_worker: float = Field(default=1.0, gt=0, le=256)
    # torch threads of a trainer actor. Ray starts an actor with one thread per CPU it reserves
    # (one), which would leave a CPU trainer on one core; None: every CPU the process may use.
    trainer_threads: int | None = Field(default=None, ge=1, le=1024)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = None

    # Limits.
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_example_tokens: int = Field(default=32768, ge=1)
    max_running_jobs_per_tenant: int = Field(default=4, ge=1)
    # The highest priority a tenant without its own cap (`tenants.max_priority`) may ask for:
    # priority goes before the fair share. None: no cap.
    max_priority_per_tenant: int | None = Field(default=None, ge=-100, le=100)
    max_attempts: int = Field(default=3, ge=1, le=100)
    # A lease lost with its trainer does not use up an attempt; after this many such losses the
    # job fails (a job that takes its trainer down every time must not loop for ever).
    max_interruptions: int = Field(default=5, ge=1, le=1000)
    lease_seconds: float = Field(default=60.0, gt=0)
    # How long a trainer waits out an unreachable database inside a job (writing an event or a
    # checkpoint) before it lets the job go to its lease: past a lease, the job is handed back
    # by the reaper as an interruption, never failed for the platform's outage.
    database_patience_seconds: float = Field(default=120.0, gt=0)
    retry_backoff_seconds: float = Field(default=10.0, ge=0)
    # A base import still `registering` after this long is taken for lost (its celery worker
    # died): registering the name again starts it anew.
    base_import_timeout_seconds: float = Field(default=4 * 3600.0, gt=0)
    page_limit_max: int = Field(default=100, ge=1)

    # Database pools of one API process. A request holds at most one connection of the main pool
    # (`DB_POOL_SIZE` + `DB_POOL_OVERFLOW`); once all are taken, a request waits up to
    # `DB_POOL_TIMEOUT_SECONDS` and is then answered 503 with Retry-After, never left hanging.
    # API keys are checked on a separate small pool (`AUTH_POOL_SIZE`), and a checked key is
    # remembered for `AUTH_CACHE_SECONDS` (a revoked key stops working within that time), so a
    # flood of bad keys cannot take the connections authenticated requests need.
    db_pool_size: int = Field(default=10, ge=1, le=1000)
    db_pool_overflow: int = Field(default=10, ge=0, le=1000)
    db_pool_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    db_connect_timeout_seconds: int = Field(default=5, ge=1, le=300)
    auth_pool_size: int = Field(default=2, ge=1, le=100)
    auth_cache_seconds: float = Field(default=10.0, ge=0, le=3600)
    # How long the Tinker API's `retrieve_future` holds a poll for a call that is not finished
    # before it answers try-again: the SDK polls again at once, so this spaces its requests.
    # Below the SDK's 45 s read timeout.
    tinker_retrieve_wait_seconds: float = Field(default=10.0, ge=0, le=40)
    # The SDK's sampling clients wait on one long poll each (`retrieve_futures`) rather than
    # one poll a sample in flight; off, they poll each sample (`retrieve_future`).
    tinker_session_polling: bool = True
    # A call that finishes wakes the API's polls waiting on it (LISTEN on one connection per API
    # process); off, they look at their calls 50 ms to 1 s apart. Off behind a pooler that keeps
    # no session (PgBouncer in transaction mode), where LISTEN does not work.
    tinker_wake_on_finish: bool = True
    # Custom losses the SDK traces (`create_custom_loss`) run on the executor, checked against
    # the operations it allows (`control_plane.loss_graphs`); off, the SDK runs them itself (a
    # forward, then the gradient it computed sent back: two calls a step).
    tinker_custom_losses_on_server: bool = True
    # Whether a tenant may publish its checkpoints (the SDK's `publish_checkpoint_from_tinker_path`)
    # for every tenant of the platform to load, sample from and download by path. Off, publishing
    # is refused and what was published is its owner's alone again (the flag stays, unread).
    tinker_public_checkpoints: bool = True
    # Tinker's JWT auth exchange (`control_plane.api.tinker_jwt`): the SDK trades its API key for
    # a short-lived JWT at `/api/v1/auth/token` and sends that instead. `whoami` reads who it is
    # from the JWT, and a client whose only credential is TINKER_CREDENTIAL_CMD needs it. A JWT
    # stops working when its key is revoked, as the key does. Off, the SDK sends the key itself.
    tinker_jwt_auth: bool = True
    # How long a JWT lives: the SDK exchanges again at half of it, and before any request sent
    # with under a minute left (hence two minutes at least).
    tinker_jwt_lifetime_seconds: int = Field(default=900, ge=120, le=86400)
    # An interactive session whose SDK has not heartbeated for this long (it does every 10 s
    # while its process lives) is over: its models' weights are let go from their executors
    # and what was asked of them and not taken fails.
    interactive_session_timeout_seconds: float = Field(default=900.0, ge=30, le=7 * 86400)
    # A finished interactive call's request and answer (megabytes for a batch of long
    # sequences) are let go this long after it finished: the SDK reads an answer seconds after.
    interactive_call_retention_seconds: float = Field(default=3600.0, ge=60, le=30 * 86400)
    # Saved samplers an interactive executor keeps loaded (their weights are in the object
    # store: one dropped, least recently sampled first, is loaded again when sampled again).
    interactive_samplers_per_executor: int = Field(default=16, ge=1, le=10000)
    # Sample calls of one model an interactive executor takes and decodes together (an RL loop
    # asks a sampler for a batch of prompts at once): one forward pass a token for all of them.
    # Calls asked meanwhile join a running batch while it holds fewer unanswered than this.
    interactive_sample_batch_calls: int = Field(default=8, ge=1, le=256)
    # How often an executor writes a streamed chat's text so far (`stream: true`) while it
    # samples it: each write is one small update and a notification for the batch's chats.
    chat_stream_every_seconds: float = Field(default=0.25, ge=0, le=10)
    # forward_backward and forward calls an interactive executor takes and runs together (each
    # tenant's RL step is a few sequences; other models' calls, and each model's next ones
    # before its next optim_step): their datums share each pass.
    interactive_forward_batch_calls: int = Field(default=8, ge=1, le=256)
    # ... while their datums hold fewer tokens than this: a GPU runs a batch of small calls in
    # about the time of one, a CPU only calls too small to keep its cores busy alone. None: by
    # the executor's device (8192 on a GPU, 256 on a CPU; `benchmarks.forward_batches`).
    interactive_forward_batch_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    # Training models a tenant without its own cap (`tenants.max_interactive_models`) may hold
    # loaded at once (their weights and optimizer state live in executors' memory): a new one
    # past it is refused until one is unloaded.
    max_interactive_models_per_tenant: int = Field(default=8, ge=1, le=10000)
    # The bytes a tenant without its own cap (`tenants.max_checkpoint_bytes`) may keep in
    # interactive checkpoints (`save_state`, `save_weights_for_sampler`) before its next save is
    # refused until it deletes some. None: no cap.
    max_checkpoint_bytes_per_tenant: int | None = Field(default=None, ge=1)

    # Tenants whose admin keys are platform operators: only they register base models (which
    # reads a path or bucket on the server); only these tenants' keys see a base's server-side
    # source. The embedded default's tenant is one. As an environment variable, a JSON list: '["default", "ops"]'.
    platform_operator_tenants: list[str] = Field(default_factory=lambda: [DEFAULT_TENANT])

    # Webhooks (`control_plane.webhooks`): a failed delivery is tried again after each of these
    # delays in turn (Standard Webhooks' schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h),
    # then marked failed; each attempt waits at most WEBHOOK_TIMEOUT_SECONDS for an answer.
    # Endpoints on private, loopback or link-local addresses are refused unless allowed (the
    # platform would post from inside the cluster's network); allowed by default outside
    # production, where the receivers of a development machine are local.
    webhook_retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    webhook_allow_private_urls: bool | None = None
    # Delivered and failed entries of the delivery log are forgotten after this many days.
    webhook_log_retention_days: float = Field(default=30.0, gt=0)
    # A tenant's audit log entries (`control_plane.audit`) are deleted after this many days.
    audit_retention_days: float = Field(default=365.0, gt=0, le=36500)

    # Secret that peppers API-key hashes; must be changed outside development.
    secret_key: str = "dev-insecure-secret"

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> Settings:
        if self.environment == "production" and self.secret_key == "dev-insecure-secret":
            raise ValueError(
                "LORAFORGE_SECRET_KEY must be set when LORAFORGE_ENVIRONMENT=production"
            )
        return self

    @cached_property
    def object_store_root(self) -> Path:
        return self.local_store_dir or self.home / "objects"

    @property
    def webhooks_may_post_privately(self) -> bool:
        if self.webhook_allow_private_urls is not None:
            return self.webhook_allow_private_urls
        return self.environment != "production"

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None
