"""Who sees the platform operators' pages (the tenants, every tenant's usage): an admin of a
tenant that `platform_operator_tenants` names. The nav asks off the session alone, with no
query; each page and post asks the database again through the REST API's own rule
(`control_plane.api.deps.refuse_unless_operator`), so a link shown or hidden decides nothing
and the pages cannot let in anyone the API would refuse."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy import Connection

from control_plane.api import deps
from control_plane.api.errors import ApiError
from control_plane.dashboard.render import PageForbidden
from control_plane.dashboard.sessions import Session
from control_plane.services import Services


def operates_platform(request: Request, session: Session | None) -> bool:
    """For the nav (a template global): whether the viewer is a platform operator's admin."""
    if session is None or not session.principal.is_admin():
        return False
    return session.tenant_name in deps.get_services(request).settings.platform_operator_tenants


def refuse_unless_operator(
    conn: Connection, session: Session, services: Services, action: str
) -> None:
    """The 403 page, saying that `action` is a platform operator's and how to be one, unless
    the session is a platform operator's admin."""
    try:
        deps.refuse_unless_operator(conn, session.principal, services, action)
    except ApiError as exc:
        raise PageForbidden(exc.message) from None
