"""`tinker auth login` and `logout`, the official `tinker` CLI against loraforge on a real socket
and a real PostgreSQL (`/api/v1/auth/apikey/me`): the CLI checks the key a person pastes and
stores it as the SDK's default credential, which a script then uses without naming a key; a key
revokes itself and nothing else; a key loraforge does not know is not stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tinker
from sqlalchemy import text
from tinker.cli.auth_api import AuthApiError, TinkerAuthApi

from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.tinker_harness import tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _cli(url: str, home: Path, *args: str, typed: str = "") -> subprocess.CompletedProcess[str]:
    """The `tinker` CLI in a process of its own, reading `typed` as a person's paste."""
    env = {**os.environ, "HOME": str(home), "TINKER_BASE_URL": url, "TINKER_TELEMETRY": "0"}
    env.pop("TINKER_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "tinker.cli", *args],
        input=typed,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _key_row(services: Services, plaintext: str) -> tuple[str, object]:
    from control_plane.tenants import hash_key

    with services.engine.connect() as conn:
        row = conn.execute(
            text("SELECT id, revoked_at FROM api_keys WHERE key_hash = :h"),
            {"h": hash_key(services.settings.secret_key, plaintext)},
        ).one()
    return row.id, row.revoked_at


def test_login_stores_the_key_a_script_then_uses_and_logout_forgets_it(
    services: Services, live_url: str, tenant_a: TenantKeys, tmp_path: Path
) -> None:
    login = _cli(live_url, tmp_path, "auth", "login", typed=f"tml-{tenant_a.member}\n")
    assert login.returncode == 0, login.stderr + login.stdout
    assert "(tenant-a)" in login.stdout
    stored = json.loads((tmp_path / ".tinker" / "credentials.json").read_text())
    key_id, _ = _key_row(services, tenant_a.member)
    number = str(int(key_id.removeprefix("key-"), 16))
    assert stored["default"] == number, stored
    assert stored["keys"][number]["key"] == f"tml-{tenant_a.member}"

    # A script names no key: the SDK takes the stored one (HOME is tmp_path here too), and the
    # tenant's runs are listed (a request without a key, or with another, is refused).
    runs = tinker.RestClient(base_url=live_url).list_training_runs().result(timeout=60)
    assert runs.training_runs == []

    logout = _cli(live_url, tmp_path, "auth", "logout")
    assert logout.returncode == 0, logout.stderr + logout.stdout
    assert "still active" in logout.stdout  # a pasted key is the person's to revoke
    assert json.loads((tmp_path / ".tinker" / "credentials.json").read_text())["keys"] == {}
    assert _key_row(services, tenant_a.member)[1] is None


def test_a_key_revokes_itself_only_and_an_unknown_key_is_not_stored(
    services: Services, live_url: str, tenant_a: TenantKeys, tmp_path: Path
) -> None:
    with httpx.Client(timeout=30) as client:
        auth = TinkerAuthApi(client, base_url=live_url)
        reader = auth.get_self_api_key(f"tml-{tenant_a.reader}")
        assert "(reader) of tenant tenant-a" in reader.note
        assert reader.details.org_details.name == "tenant-a"
        auth.delete_self_api_key(f"tml-{tenant_a.reader}")
        assert _key_row(services, tenant_a.reader)[1] is not None
        with pytest.raises(AuthApiError, match="HTTP 401"):
            auth.get_self_api_key(f"tml-{tenant_a.reader}")
        # The tenant's other keys are untouched.
        assert auth.get_self_api_key(f"tml-{tenant_a.member}").name == "default"
        assert _key_row(services, tenant_a.member)[1] is None

    refused = _cli(live_url, tmp_path, "auth", "login", typed="tml-lf-not-a-key\n")
    assert refused.returncode != 0
    assert "Could not validate the API key" in refused.stdout + refused.stderr
    assert not (tmp_path / ".tinker" / "credentials.json").exists()
