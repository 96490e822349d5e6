"""What a tenant's interactive checkpoints hold in storage, and the cap on it
(`LORAFORGE_MAX_CHECKPOINT_BYTES_PER_TENANT`, 300 bytes here unless a test says otherwise, or
the tenant's own `max_checkpoint_bytes`): the official `tinker` SDK's `AdminClient` reads the
tenant's sum, never another tenant's; a save asked while the sum is at or over the cap is
refused (403 naming the sum and the cap, saying to delete checkpoints or give them a time to
live; nothing written) until a checkpoint is deleted. Checkpoints are written as the executors
write them (`interactive_calls.finish` with the save's files in the real object store); no
executor runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from sqlalchemy import Engine, text

from control_plane import interactive_calls, interactive_saves
from control_plane.services import Services
from control_plane.settings import Settings
from loraforge import Client, PlatformAdmin
from loraforge.cli import build_parser
from tests.api_harness import TenantKeys
from tests.factories import ask_call, interactive_model, interactive_session, make_base
from tests.tinker_harness import tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

PLATFORM_CAP = 300
PLATFORM_SAID = "the platform's limit (LORAFORGE_MAX_CHECKPOINT_BYTES_PER_TENANT = 300 bytes)"
DELETE_OR_EXPIRE = (
    "delete checkpoints (delete_checkpoint_from_tinker_path) or give them a time to live "
    "(set_checkpoint_ttl_from_tinker_path) before saving again"
)


@pytest.fixture
def platform_cap() -> int | None:
    return PLATFORM_CAP


@pytest.fixture
def settings(tmp_path: Path, platform_cap: int | None) -> Settings:
    return tinker_settings(tmp_path).model_copy(
        update={"max_checkpoint_bytes_per_tenant": platform_cap}
    )


@dataclasses.dataclass(frozen=True)
class Tenant:
    """A tenant's stand-ins: a model whose saves were run (on a base of their own, so no save
    asked over HTTP is claimed with them) and a model the tests ask saves of."""

    keys: TenantKeys
    saved_on: str  # the first model's base
    history: str
    live: str


def _tenant(services: Services, keys: TenantKeys, name: str) -> Tenant:
    engine = services.engine
    history_base = make_base(engine, f"history-{name}").id
    live_base = make_base(engine, f"live-{name}").id
    session = interactive_session(engine, keys.tenant_id, f"isess-{name}")
    history = interactive_model(engine, session, keys.tenant_id, history_base, f"imdl-h-{name}")
    live = interactive_model(engine, session, keys.tenant_id, live_base, f"imdl-l-{name}")
    return Tenant(keys, history_base, history, live)


@pytest.fixture
def a(services: Services, tenant_a: TenantKeys) -> Tenant:
    return _tenant(services, tenant_a, "a")


@pytest.fixture
def b(services: Services, tenant_b: TenantKeys) -> Tenant:
    return _tenant(services, tenant_b, "b")


def _save(services: Services, tenant: Tenant, name: str, size: int, kind: str = "state") -> str:
    """A checkpoint of `size` bytes, as an executor's save writes it: the call asked and taken,
    its files in the store, then its row with the call's answer. Its tinker:// path."""
    engine, model = services.engine, tenant.history
    with engine.connect() as conn:
        seq = conn.execute(
            text("SELECT count(*) FROM interactive_calls WHERE model_id = :m"), {"m": model}
        ).scalar_one()
    call_kind = "save_weights" if kind == "state" else "save_weights_for_sampler"
    ask_call(engine, model, tenant.keys.tenant_id, tenant.saved_on, call_kind, seq, {"path": name})
    with engine.begin() as conn:
        call = interactive_calls.claim_next(conn, "exec-1", tenant.saved_on)
        assert call is not None and call.model_id == model
        where = interactive_saves.checkpoint_location(call, name)
        services.store.put_bytes(where.prefix + "adapter_model.safetensors", b"w" * size)
        written = dataclasses.replace(where, size_bytes=size)
        assert interactive_calls.finish(
            conn, call, "exec-1", {"path": where.path}, checkpoint=written
        )
    return where.path


def _rows(engine: Engine, tenant_id: str) -> tuple[int, int]:
    """The tenant's checkpoint rows counted and their sizes summed, null as 0."""
    with engine.connect() as conn:
        count, size = conn.execute(
            text(
                "SELECT count(*), coalesce(sum(size_bytes), 0) FROM interactive_checkpoints "
                "WHERE tenant_id = :t"
            ),
            {"t": tenant_id},
        ).one()
    return int(count), int(size)


def _written(engine: Engine) -> tuple[int, int]:
    """Every call and every model: what a save asked would write."""
    with engine.connect() as conn:
        calls, models = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM interactive_calls), "
                "(SELECT count(*) FROM interactive_models)"
            )
        ).one()
    return int(calls), int(models)


def _usage(url: str, key: str, project_id: str | None = None) -> Any:
    admin = tinker.AdminClient(base_url=url, api_key="tml-" + key)
    return admin.get_current_checkpoint_storage_usage(project_id).result(timeout=30)


def _ask_save(
    url: str, key: str, model: str, *, sampler: bool = False, **body: Any
) -> httpx.Response:
    endpoint = "/save_weights_for_sampler" if sampler else "/save_weights"
    return httpx.post(
        f"{url}/api/v1{endpoint}",
        json={"model_id": model, **body},
        headers={"X-API-Key": "tml-" + key},
        timeout=30,
    )


def _refusal(answer: httpx.Response) -> str:
    assert answer.status_code == 403, answer.text
    error = answer.json()["error"]
    assert error["code"] == "checkpoint_storage_full", error
    return str(error["message"])


def test_the_sdk_reads_its_tenants_checkpoint_storage_and_never_another_tenants(
    services: Services, live_url: str, a: Tenant, b: Tenant
) -> None:
    """One item, the tenant's: its checkpoints counted and their bytes summed as the rows
    record them (a row saved before sizes were recorded counts 0), in gigabytes of 10^9
    bytes; any key of the tenant reads it; a deletion takes its bytes off; a project is
    refused, loraforge having none."""
    engine = services.engine
    state = _save(services, a, "s1", 120)
    _save(services, a, "w1", 80, kind="sampler")
    _save(services, b, "s1", 4000)
    with engine.begin() as conn:  # saved before revision 0024 recorded sizes
        conn.execute(
            text(
                "INSERT INTO interactive_checkpoints (id, model_id, tenant_id, kind, name, path, "
                "storage_prefix) VALUES ('ickpt-old', :m, :t, 'state', 'old', :p, 'x/')"
            ),
            {"m": a.history, "t": a.keys.tenant_id, "p": f"tinker://{a.history}/weights/old"},
        )
    assert _rows(engine, a.keys.tenant_id) == (3, 200)

    for key in (a.keys.reader, a.keys.member, a.keys.admin):
        usage = _usage(live_url, key)
        assert usage.effective_rate_usd_per_gigabyte_month is None
        [item] = usage.data
        assert (item.checkpoint_count, item.size_bytes) == _rows(engine, a.keys.tenant_id)
        assert item.size_gigabytes == pytest.approx(200 / 1e9)
        assert item.user_name == "tenant-a"
        assert (item.project_id, item.org_user_urn, item.user_email) == (None, None, None)
        assert item.estimated_monthly_cost_usd is None
    [theirs] = _usage(live_url, b.keys.reader).data
    assert (
        (theirs.checkpoint_count, theirs.size_bytes) == (1, 4000) == _rows(engine, b.keys.tenant_id)
    )
    assert theirs.user_name == "tenant-b"

    rest = tinker.RestClient(base_url=live_url, api_key="tml-" + a.keys.member)
    rest.delete_checkpoint_from_tinker_path(state).result(timeout=30)
    [item] = _usage(live_url, a.keys.reader).data
    assert (item.checkpoint_count, item.size_bytes) == (2, 80) == _rows(engine, a.keys.tenant_id)

    with pytest.raises(tinker.BadRequestError, match="loraforge has no projects"):
        _usage(live_url, a.keys.reader, project_id="proj-1")


def test_a_save_at_the_cap_is_refused_with_nothing_written_until_a_checkpoint_is_deleted(
    services: Services, live_url: str, a: Tenant, b: Tenant
) -> None:
    """tenant-a's checkpoints hold the platform's 300 bytes: each kind of save is refused,
    naming both and saying what to do, no call or sampler made; tenant-b saves. One deletion
    later, tenant-a's save is taken; at the cap again, that save sent again (its answer lost)
    still answers its future, and a new one is refused."""
    engine = services.engine
    first = _save(services, a, "s1", 100)
    _save(services, a, "s2", 200)
    before = _written(engine)
    member = a.keys.member
    for sampler, body in (
        (False, {"path": "s3"}),
        (False, {"path": "s2", "overwrite": True}),
        (True, {"path": "w1"}),
        (True, {}),  # ephemeral: its sampler would come with the call
    ):
        said = _refusal(_ask_save(live_url, member, a.live, sampler=sampler, **body))
        assert said == (
            f"your tenant holds 300 bytes in 2 checkpoints, at or over {PLATFORM_SAID}: "
            + DELETE_OR_EXPIRE
        )
    assert _written(engine) == before

    taken = _ask_save(live_url, b.keys.member, b.live, path="s1")
    assert taken.status_code == 200, taken.text

    rest = tinker.RestClient(base_url=live_url, api_key="tml-" + member)
    rest.delete_checkpoint_from_tinker_path(first).result(timeout=30)
    taken = _ask_save(live_url, member, a.live, path="s3", seq_id=0)
    assert taken.status_code == 200, taken.text
    future = taken.json()["request_id"]
    with engine.connect() as conn:
        asked = conn.execute(
            text("SELECT kind, request FROM interactive_calls WHERE id = :id"), {"id": future}
        ).one()
    assert asked.kind == "save_weights" and asked.request["path"] == "s3"

    _save(services, a, "s4", 150)  # 350 bytes now
    again = _ask_save(live_url, member, a.live, path="s3", seq_id=0)
    assert again.status_code == 200 and again.json()["request_id"] == future
    said = _refusal(_ask_save(live_url, member, a.live, path="s5", seq_id=1))
    assert said.startswith("your tenant holds 350 bytes in 2 checkpoints, at or over")


def test_a_tenants_own_cap_goes_before_the_platforms_and_null_returns_it_to_the_default(
    services: Services, live_url: str, a: Tenant, b: Tenant
) -> None:
    """The platform's operator gives tenant-a 1 GB (over the platform's 300 bytes: its saves
    are taken past them) and tenant-b 50 bytes (under it: refused at 100, naming its own cap);
    tenant-a's set back to null holds it to the platform's 300 again."""
    operator = PlatformAdmin(Client(live_url, a.keys.admin))
    for name, tenant, cap, stored in (("tenant-a", a, 10**9, 400), ("tenant-b", b, 50, 100)):
        limits = operator.set_limits(name, max_checkpoint_bytes=cap)
        assert (limits["max_checkpoint_bytes"], limits["effective_max_checkpoint_bytes"]) == (
            cap,
            cap,
        )
        _save(services, tenant, "s1", stored)

    taken = _ask_save(live_url, a.keys.member, a.live, path="s2")
    assert taken.status_code == 200, taken.text
    said = _refusal(_ask_save(live_url, b.keys.member, b.live, path="s2"))
    assert said.startswith(
        "your tenant holds 100 bytes in 1 checkpoint, at or over the limit the platform's "
        "operator set for it (max_checkpoint_bytes = 50 bytes): "
    )

    back = operator.set_limits("tenant-a", max_checkpoint_bytes=None)
    assert (back["max_checkpoint_bytes"], back["effective_max_checkpoint_bytes"]) == (
        None,
        PLATFORM_CAP,
    )
    said = _refusal(_ask_save(live_url, a.keys.member, a.live, path="s3"))
    assert f"holds 400 bytes in 1 checkpoint, at or over {PLATFORM_SAID}" in said


@pytest.mark.parametrize("platform_cap", [None])
def test_with_no_cap_a_tenant_saves_whatever_its_checkpoints_hold(
    services: Services, live_url: str, a: Tenant
) -> None:
    """No platform cap and none of its own: a terabyte recorded does not hold a save back, and
    the SDK reads the terabyte."""
    operator = PlatformAdmin(Client(live_url, a.keys.admin))
    assert operator.get_tenant("tenant-a")["effective_max_checkpoint_bytes"] is None
    _save(services, a, "s1", 10)
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE interactive_checkpoints SET size_bytes = 10 ^ 12"))
    for sampler in (False, True):
        taken = _ask_save(live_url, a.keys.member, a.live, sampler=sampler, path="s2")
        assert taken.status_code == 200, taken.text
    [item] = _usage(live_url, a.keys.reader).data
    assert (item.size_bytes, item.size_gigabytes) == (10**12, 1000.0)


def _own_cap(engine: Engine, name: str) -> int | None:
    with engine.connect() as conn:
        cap = conn.execute(
            text("SELECT max_checkpoint_bytes FROM tenants WHERE name = :n"), {"n": name}
        ).scalar_one()
    return None if cap is None else int(cap)


def _admin(database_url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`loraforge admin ...` on the test's database, with this module's platform cap."""
    try:
        args = build_parser().parse_args(["admin", *argv])
        settings = Settings(database_url=database_url, max_checkpoint_bytes_per_tenant=PLATFORM_CAP)
        code = int(args.func(args, settings))
    except SystemExit as exit:  # argparse's refusal
        code = int(exit.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_command_line_sets_shows_and_clears_a_tenants_checkpoint_cap_in_bytes_or_units(
    services: Services, database_url: str, a: Tenant, capsys: pytest.CaptureFixture[str]
) -> None:
    """`loraforge admin tenant NAME --max-checkpoint-bytes 20G` (decimal units, or plain bytes)
    sets it and shows it in bytes and to read; a size it cannot read, 0 or past an exabyte is
    refused with nothing set; `none` returns it to the platform's default, shown as such;
    `create-key` gives a new tenant its own."""
    engine = services.engine
    for given, stored, shown in (
        ("20G", 20 * 10**9, "20000000000 (20 GB)"),
        ("1.5T", 15 * 10**11, "1500000000000 (1.5 TB)"),
        ("500m", 500 * 10**6, "500000000 (500 MB)"),
        ("1234567", 1_234_567, "1234567 (1.23 MB)"),
    ):
        code, said = _admin(
            database_url, capsys, "tenant", "tenant-a", "--max-checkpoint-bytes", given
        )
        assert code == 0 and said.endswith(f", max_checkpoint_bytes {shown}\n"), said
        assert _own_cap(engine, "tenant-a") == stored
    for bad, why in (
        ("20X", "'20X' is not a size"),
        ("many", "'many' is not a size"),
        ("0", "'0' is not from 1 byte to an exabyte"),
        ("1000001T", "'1000001T' is not from 1 byte to an exabyte"),
        ("0.5", "'0.5' is not a whole number of bytes"),
    ):
        code, said = _admin(
            database_url, capsys, "tenant", "tenant-a", "--max-checkpoint-bytes", bad
        )
        assert code == 2 and why in said, said
    assert _own_cap(engine, "tenant-a") == 1_234_567  # refused: nothing set
    code, said = _admin(
        database_url, capsys, "tenant", "tenant-a", "--max-checkpoint-bytes", "none"
    )
    assert code == 0 and said.endswith(", max_checkpoint_bytes 300 (300 B, default)\n"), said
    assert _own_cap(engine, "tenant-a") is None
    code, said = _admin(
        database_url, capsys, "create-key", "--tenant", "newco", "--max-checkpoint-bytes", "2G"
    )
    assert code == 0 and said.startswith("lf-")
    assert _own_cap(engine, "newco") == 2 * 10**9
