"""The web dashboard: server-rendered pages (Jinja2 + htmx + uPlot + Pico CSS) served by the
control plane itself, at `/`, with the same tenancy as the REST API.

A page signs in with an API key once; the browser then holds only a signed session cookie
that names the key's id (never the key), so revoking the key ends the session at the next
request. Pages call the same domain functions (and, for writes, the same REST route functions)
as the API, so a rule is written once. The front-end libraries are vendored under
`static/vendor/` by `scripts/vendor_frontend.py`: nothing is fetched from the internet at run
time, and the Content-Security-Policy allows no inline script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.staticfiles import StaticFiles

from control_plane.api.text_input import find_nul
from control_plane.dashboard.operators import operates_platform
from control_plane.dashboard.render import PageRefused, environment, install_page_errors
from control_plane.dashboard.routes import (
    adapter_try,
    adapters,
    auth,
    batches,
    compare,
    interactive,
    jobs,
    new_job,
    platform,
    priority,
    sweeps,
    tenants,
    usage,
    webhooks,
)
from control_plane.dashboard.security import SecurityHeaders

STATIC = Path(__file__).parent / "static"


async def _refuse_nul(request: Request) -> None:
    """Every page's first dependency: a NUL in the address or a form is refused on a page."""
    found = await find_nul(request)
    if found is not None:
        raise PageRefused(str(found))


# new_job first: `/jobs/new` must match before `/jobs/{job_id}`; priority before jobs:
# `/jobs/{job_id}/priority` must match before `/jobs/{job_id}/{action}`; compare before jobs:
# `/jobs/compare` before `/jobs/{job_id}`.
DASHBOARD_ROUTERS = (
    auth.router,
    new_job.router,
    compare.router,
    sweeps.router,
    priority.router,
    jobs.router,
    adapters.router,
    adapter_try.router,
    interactive.router,
    batches.router,
    platform.router,
    tenants.router,
    usage.router,
    webhooks.router,
)


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard's pages, streams and static files to the API's app."""
    for router in DASHBOARD_ROUTERS:
        app.include_router(router, include_in_schema=False, dependencies=[Depends(_refuse_nul)])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # The nav's Tenants and Usage links, on every page: shown to the platform's operators only.
    environment().globals["operates_platform"] = operates_platform
    install_page_errors(app)
    app.add_middleware(SecurityHeaders)
