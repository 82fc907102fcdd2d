"""The scripts docker-compose.yml runs, run here for real without Docker:

- postgres-init.sh against a real PostgreSQL server (the embedded one the tests use), then
  the service's real migrations as the owner role and the app role's view of the result;
- secrets-init.py and with-secrets.sh, and the values they produce read back by the real
  Settings classes of payments, the sandbox and the gateway.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import yaml

from clearhouse.embedded import PG_SUPERUSER, EmbeddedPostgres, free_port
from clearhouse.serve import migrations_dir
from shared import migrate

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_SCRIPTS = ROOT / "deploy" / "compose"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in COMPOSE["services"][service]["environment"].items()}


# ── postgres-init.sh ───────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server of this module's own: the script revokes CONNECT on `postgres`
    from PUBLIC, which a server shared with other tests must not see."""
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", free_port())
    pg.start()
    yield pg
    pg.stop()


def test_postgres_init_gives_the_app_role_its_own_database_only(postgres):
    db_env = compose_env("payments-db")
    database = db_env["CLEARHOUSE_DB"]
    result = subprocess.run(
        ["sh", str(COMPOSE_SCRIPTS / "postgres-init.sh")],
        # What the postgres image gives the script: the superuser's name and a server to reach.
        env={**os.environ, **db_env, "POSTGRES_USER": PG_SUPERUSER, "PGHOST": "127.0.0.1", "PGPORT": str(postgres.port),
             "PATH": f"{postgres.bin_dir}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    owner, app = f"{database}_owner", f"{database}_app"

    async def check() -> None:
        admin = await asyncpg.connect(postgres.url())
        try:
            roles = {r["rolname"]: r for r in await admin.fetch(
                "SELECT rolname, rolcanlogin, rolsuper, rolpassword IS NOT NULL AS has_password "
                "FROM pg_authid WHERE rolname = ANY($1::text[])", [owner, app])}
            assert all(r["rolcanlogin"] and r["has_password"] and not r["rolsuper"] for r in roles.values())
            assert set(roles) == {owner, app}
            assert await admin.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
                                        database) == owner
        finally:
            await admin.close()

        # The app role reaches its database, and no other database on the server.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncpg.connect(postgres.url(user=app))
        conn = await asyncpg.connect(postgres.url(database, user=app))
        await conn.close()

    asyncio.run(check())

    # The compose migrate service's work: the real migrations, as the owner, granting to the app role.
    migrate.upgrade(migrations_dir("payments"), postgres.url(database, user=owner), app)

    async def app_view() -> None:
        conn = await asyncpg.connect(postgres.url(database, user=app))
        try:
            assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1  # what /readyz reads
            assert await conn.fetchval("SELECT count(*) FROM events") >= 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CREATE TABLE app_may_not_create (id int)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM events")
        finally:
            await conn.close()

    asyncio.run(app_view())


# ── secrets-init.py and with-secrets.sh ────────────────────────────────────────────────────


def load_secrets_init():
    spec = importlib.util.spec_from_file_location("secrets_init", COMPOSE_SCRIPTS / "secrets-init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def secrets_root(tmp_path, monkeypatch):
    """secrets-init's output; ownership goes to the image's uid, which needs root here."""
    secrets_init = load_secrets_init()
    owners = {}
    monkeypatch.setattr(secrets_init.os, "chown", lambda path, uid, gid: owners.__setitem__(Path(path), (uid, gid)))
    root = tmp_path / "env"
    root.mkdir()
    secrets_init.main(root)
    monkeypatch.undo()
    written = [p for p in root.rglob("*")]
    assert written and all(owners[p] == (10001, 10001) for p in written)
    for path in written:  # the directories are 0500 for the service user; the test reads as itself
        path.chmod(0o700 if path.is_dir() else 0o600)
    return root


def exported_env(tmp_path: Path, root: Path, groups: tuple[str, ...]) -> dict[str, str]:
    """Run with-secrets.sh as a container that mounts `groups` would, with a `clearhouse`
    that prints the environment it was given."""
    mounted = tmp_path / ("mounted-" + "-".join(groups))
    for group in groups:
        shutil.copytree(root / group, mounted / group)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "clearhouse"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps({{'argv': sys.argv[1:], 'env': dict(os.environ)}}))\n")
    fake.chmod(0o755)
    result = subprocess.run(
        ["sh", str(COMPOSE_SCRIPTS / "with-secrets.sh"), "serve", "payments", "--role", "api"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "CLEARHOUSE_SECRETS_DIR": str(mounted)},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["argv"] == ["serve", "payments", "--role", "api"]
    return {k: v for k, v in output["env"].items() if k.startswith(("INTERNAL_TOKEN_", "PAYMENTS_", "SANDBOX_"))}


def mounted_groups(service: str) -> tuple[str, ...]:
    volumes = [str(v).split(":")[0] for v in COMPOSE["services"][service]["volumes"]]
    return tuple(v.removeprefix("secrets-") for v in volumes if v.startswith("secrets-"))


def test_compose_secrets_are_what_the_services_read(secrets_root, tmp_path, monkeypatch):
    from gateway.settings import Settings as GatewaySettings
    from services.payments.settings import Settings as PaymentsSettings
    from services.sandbox.settings import Settings as SandboxSettings
    from shared.auth import sign_internal_token, verify_internal_token

    payments = exported_env(tmp_path, secrets_root, mounted_groups("payments-api"))
    sandbox = exported_env(tmp_path, secrets_root, mounted_groups("sandbox"))
    gateway = exported_env(tmp_path, secrets_root, mounted_groups("gateway"))
    relay = exported_env(tmp_path, secrets_root, mounted_groups("payments-relay"))
    assert "INTERNAL_TOKEN_PRIVATE_KEY" not in payments | sandbox | relay
    assert set(relay) == {"INTERNAL_TOKEN_PUBLIC_KEY"}

    for name, value in {**payments, **sandbox, **gateway}.items():
        monkeypatch.setenv(name, value)
    # Compose sets this for payments: configured secrets or refusal, no per-container fallback.
    monkeypatch.setenv("PAYMENTS_REQUIRE_CONFIGURED_SECRETS", compose_env("payments-api")["PAYMENTS_REQUIRE_CONFIGURED_SECRETS"])
    key_id, keyring = PaymentsSettings().payee_keyring()
    assert len(keyring[key_id]) == 32
    assert PaymentsSettings().webhook_secret() == SandboxSettings().secret()
    assert PaymentsSettings().sandbox_api_key.get_secret_value() == SandboxSettings().api_key.get_secret_value()

    token = sign_internal_token(GatewaySettings().signing_key(), tenant_id="t", principal="p", scopes=["payments:read"],
                                request_id="r")
    assert verify_internal_token(payments["INTERNAL_TOKEN_PUBLIC_KEY"], token).principal == "p"


def test_secrets_init_never_replaces_the_payee_keyring(secrets_root, monkeypatch):
    secrets_init = load_secrets_init()
    monkeypatch.setattr(secrets_init.os, "chown", lambda *args: None)
    keyring = (secrets_root / "payments" / "PAYMENTS_PAYEE_KEYS").read_text()
    (secrets_root / "payments" / "PAYMENTS_PAYEE_KEY_ID").unlink()
    secrets_init.main(secrets_root)
    assert (secrets_root / "payments" / "PAYMENTS_PAYEE_KEYS").read_text() == keyring
    assert (secrets_root / "payments" / "PAYMENTS_PAYEE_KEY_ID").read_text() in json.loads(keyring)
