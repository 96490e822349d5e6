"""The FastAPI application: REST under /v1 (OpenAI-compatible where OpenAI has the same thing)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from control_plane.api.errors import install_error_handlers
from control_plane.api.limits import BodySizeLimit
from control_plane.api.routes import adapters, api_keys, base_models, files, fine_tuning, models
from control_plane.services import Services


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="loraforge",
        version="0.1.0",
        description="Fine-tune LLMs with LoRA on a shared frozen base; version and pull adapters.",
    )
    app.state.services = services
    install_error_handlers(app)
    for router in (
        files.router,
        fine_tuning.router,
        models.router,
        base_models.router,
        api_keys.router,
        adapters.router,
    ):
        app.include_router(router)
    app.add_middleware(
        BodySizeLimit,
        limit=services.settings.max_upload_bytes + 64 * 1024,
    )

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    return app
