"""The FastAPI application: REST under /v1 (OpenAI-compatible where OpenAI has the same thing)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute

from control_plane.api.call_wakeups import CallWakeups
from control_plane.api.deps import PrincipalCache
from control_plane.api.errors import install_error_handlers
from control_plane.api.limits import BodySizeLimit
from control_plane.api.metrics import install_metrics
from control_plane.api.openapi import install_openapi
from control_plane.api.routes import (
    adapters,
    api_keys,
    base_models,
    batches,
    chat,
    chat_stream,
    completions,
    files,
    fine_tuning,
    health,
    job_grids,
    job_streams,
    job_sweeps,
    models,
    tenants,
    tinker,
    tinker_audit,
    tinker_auth,
    tinker_exports,
    tinker_futures,
    tinker_losses,
    tinker_runs,
    tinker_sessions,
    tinker_usage,
    usage,
    webhooks,
)
from control_plane.api.stream_watch import StreamWatch
from control_plane.api.text_input import refuse_nul
from control_plane.dashboard import DASHBOARD_ROUTERS, mount_dashboard
from control_plane.services import Services

API_ROUTERS = (
    files.router,
    fine_tuning.router,
    job_streams.router,
    job_sweeps.router,
    job_grids.router,
    models.router,
    chat.router,
    completions.router,
    batches.router,
    base_models.router,
    api_keys.router,
    tenants.router,
    usage.router,
    webhooks.router,
    adapters.router,
    health.router,
    # Before tinker's: its last route answers every other /api/v1 path with a 404.
    tinker_sessions.router,
    tinker_runs.router,
    tinker_usage.router,
    tinker_audit.router,
    tinker_auth.router,
    tinker_exports.router,
    tinker_futures.router,
    tinker_losses.router,
    tinker.router,
)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the server runs: the listener that wakes the polls of Tinker futures; at its end,
    the live streams' look (started by the first stream) stops too."""
    wakeups: CallWakeups | None = app.state.call_wakeups
    if wakeups is not None:
        wakeups.start()
    try:
        yield
    finally:
        if wakeups is not None:
            await wakeups.stop()
        await app.state.stream_watch.stop()
        await chat_stream.cancel_left()


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="loraforge",
        version="0.1.0",
        description="Fine-tune LLMs with LoRA on a shared frozen base; version and pull adapters.",
        lifespan=_lifespan,
    )
    app.state.services = services
    # Started with the server (a lifespan); an app served without one (a bare TestClient) polls
    # at its looks' times alone.
    app.state.call_wakeups = (
        CallWakeups(services.database_url) if services.settings.tinker_wake_on_finish else None
    )
    # What the live streams follow, looked at for all of them at once (`api.stream_watch`).
    app.state.stream_watch = StreamWatch(services.engine)
    # A place a connection of the main pool (`deps.db_slot`).
    settings = services.settings
    app.state.db_slots = asyncio.Semaphore(settings.db_pool_size + settings.db_pool_overflow)
    app.state.principals = PrincipalCache(
        services.settings.secret_key, services.settings.auth_cache_seconds
    )
    install_error_handlers(app)
    for router in API_ROUTERS:
        app.include_router(router, dependencies=[Depends(refuse_nul)])
    app.add_middleware(
        BodySizeLimit,
        limit=services.settings.max_upload_bytes + 64 * 1024,
    )
    mount_dashboard(app)
    install_metrics(app, services)
    routes = [r for router in API_ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    install_openapi(app, routes)
    # Every route, for a 405's `Allow` (errors.allowed_methods).
    app.state.routes = [*routes, *(r for router in DASHBOARD_ROUTERS for r in router.routes)]

    return app
