"""`clearhouse up`: the whole platform on one machine.

    embedded PostgreSQL ─┬─ one database + owner/app roles per service (and the gateway)
    (or DATABASE_URL)    └─ migrations to head
    Tansu broker ─────── topics created; relays replay the event log into it (in-memory)
    (or KAFKA_BOOTSTRAP_SERVERS)
    per service: api, relay, consumer processes; gateway; sandbox processor

State lives in `.clearhouse/` (or CLEARHOUSE_HOME): the database cluster, ports, the
internal-token key pair and process logs, so a second `up` reuses the data. Failures to
reach a configured database or broker end with a one-line reason and exit code 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from clearhouse.embedded import EmbeddedBroker, EmbeddedError, EmbeddedPostgres, free_port, port_open
from clearhouse.provision import ServiceDatabase, provision_database
from clearhouse.serve import SERVICES, migrations_dir
from clearhouse.supervisor import ProcessSpec, Supervisor
from gateway.keys import ensure_demo_key
from shared import migrate
from shared.db import plain_url
from shared.kafka import ensure_topics, service_topics
from shared.relay import Relay, marker_topic

API_PORTS = {"gateway": 8000, "payments": 8001, "approvals": 8002, "ledger": 8003, "reconciliation": 8004,
             "sandbox": 8010}
METRICS_BASE_PORT = 9101


class UpError(RuntimeError):
    """A reason `up` cannot continue, phrased for the person who ran it."""


@dataclass
class Platform:
    home: Path
    admin_url: str
    bootstrap: str
    databases: dict[str, ServiceDatabase]
    ports: dict[str, int]
    public_key: str
    private_key: str


def say(message: str) -> None:
    try:
        print(message, flush=True)
    except OSError:
        pass  # nobody reads our output any more (a closed pipe): stopping must still stop everything


def _state(home: Path) -> dict:
    path = home / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(home: Path, state: dict) -> None:
    (home / "state.json").write_text(json.dumps(state, indent=2))


def _port(state: dict, name: str, preferred: int) -> int:
    """Keep the port used last time; else the preferred one if free; else any free one."""
    ports = state.setdefault("ports", {})
    if name in ports and not port_open("127.0.0.1", ports[name]):
        return ports[name]
    ports[name] = preferred if not port_open("127.0.0.1", preferred) else free_port()
    return ports[name]


def start_database(home: Path, state: dict) -> tuple[str, EmbeddedPostgres | None]:
    external = os.environ.get("CLEARHOUSE_DATABASE_URL")
    if external:
        say(f"• PostgreSQL: external server {external.split('@')[-1]}")
        _check_database(external)
        return external, None
    pg = EmbeddedPostgres(home / "pg", _port(state, "postgres", 54329))
    say(f"• PostgreSQL: embedded, data in {pg.data_dir}, port {pg.port}")
    pg.start()
    return pg.url(), pg


def _check_database(url: str) -> None:
    async def ping() -> None:
        conn = await asyncpg.connect(plain_url(url), timeout=5)
        await conn.close()

    try:
        asyncio.run(ping())
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
        raise UpError(f"cannot reach PostgreSQL at {url.split('@')[-1]}: {exc}") from exc


def start_broker(home: Path, state: dict) -> tuple[str, EmbeddedBroker | None]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        say(f"• Kafka: external brokers {external}")
        host, _, port = external.split(",")[0].rpartition(":")
        if not port.isdigit() or not port_open(host or "127.0.0.1", int(port), timeout=3):
            raise UpError(f"cannot reach the Kafka broker at {external}")
        return external, None
    broker = EmbeddedBroker(_port(state, "broker", 19092), home / "logs" / "tansu.log")
    say(f"• Kafka: embedded Tansu broker (in memory) on {broker.bootstrap}")
    broker.start()
    return broker.bootstrap, broker


def _keys(home: Path) -> tuple[str, str]:
    """The gateway's signing key pair for internal tokens, made once, private part 0600."""
    from shared.auth import generate_keypair

    private, public = home / "keys" / "internal-token.pem", home / "keys" / "internal-token.pub.pem"
    if not private.exists():
        private.parent.mkdir(parents=True, exist_ok=True)
        private_pem, public_pem = generate_keypair()
        private.touch(mode=0o600)
        private.write_text(private_pem)
        public.write_text(public_pem)
    return private.read_text(), public.read_text()


def components() -> list[str]:
    """What gets a database: the four services and the gateway (its keys and tenants)."""
    return [*SERVICES, "gateway"]


def prepare(home: Path, admin_url: str, bootstrap: str, state: dict) -> Platform:
    names = components()
    say(f"• databases and migrations: {', '.join(names)}")

    async def provision_all() -> dict[str, ServiceDatabase]:
        return {name: await provision_database(admin_url, f"clearhouse_{name}") for name in names}

    databases = asyncio.run(provision_all())
    # Sequential on purpose: Alembic's `op`/`context` are process-global proxies.
    for name in names:
        migrate.upgrade(migrations_dir(name), databases[name].owner_url, databases[name].app_role)
    say(f"• topics: {', '.join(service_topics())}")
    # With the relays' broker-loss markers, so that the relays do not replay again what
    # `_replay_into_fresh_broker` is about to replay.
    created = asyncio.run(ensure_topics(bootstrap, service_topics() + [marker_topic(s) for s in SERVICES]))
    _replay_into_fresh_broker(databases, bootstrap, created)
    ports = {n: _port(state, n, port) for n, port in API_PORTS.items()}
    private_key, public_key = _keys(home)
    return Platform(home, admin_url, bootstrap, databases, ports, public_key, private_key)


def _replay_into_fresh_broker(databases: dict[str, ServiceDatabase], bootstrap: str, created: list[str]) -> None:
    """A topic that had to be created is a broker without our history (the embedded one
    lives in memory): publish each service's whole event log into it before any consumer
    starts. Consumers skip what they already applied."""
    for name, db in databases.items():
        if f"{name}.events" not in created:
            continue
        count = asyncio.run(Relay(service=name, database_url=db.app_url, bootstrap=bootstrap).replay())
        if count:
            say(f"  replayed {count} {name} events into the fresh broker")


def process_specs(platform: Platform, state: dict) -> list[ProcessSpec]:
    logs, ports = platform.home / "logs", platform.ports
    common = {
        "KAFKA_BOOTSTRAP_SERVERS": platform.bootstrap,
        "INTERNAL_TOKEN_PUBLIC_KEY": platform.public_key,
        "CLEARHOUSE_HOME": str(platform.home),
        "CLEARHOUSE_TRACES_DIR": str(platform.home / "traces"),
        "PYTHONUNBUFFERED": "1",
    }

    def spec(name: str, role: str, env: dict[str, str], health_port: int, health_path: str) -> ProcessSpec:
        return ProcessSpec(f"{name}-{role}", [sys.executable, "-m", "clearhouse", "serve", name, "--role", role],
                           {**common, **env}, f"http://127.0.0.1:{health_port}{health_path}",
                           logs / f"{name}-{role}.log")

    specs, metrics_port = [], METRICS_BASE_PORT
    metrics_targets = []  # every process's /metrics, for the console's Health page
    for name in SERVICES:
        env = {"DATABASE_URL": platform.databases[name].app_url, "PORT": str(ports[name]),
               "PAYMENTS_SANDBOX_URL": f"http://127.0.0.1:{ports['sandbox']}"}
        specs.append(spec(name, "api", env, ports[name], "/healthz"))
        metrics_targets.append(f"{name}-api=http://127.0.0.1:{ports[name]}/metrics")
        for role in ("relay", "consumer"):
            port = _port(state, f"{name}-{role}-metrics", metrics_port)
            metrics_targets.append(f"{name}-{role}=http://127.0.0.1:{port}/metrics")
            metrics_port += 1
            specs.append(spec(name, role, {**env, "METRICS_PORT": str(port)}, port, "/metrics"))
    specs.append(spec("sandbox", "api", {
        "PORT": str(ports["sandbox"]), "SANDBOX_DB_PATH": str(platform.home / "sandbox.sqlite3"),
        "SANDBOX_WEBHOOK_URL": f"http://127.0.0.1:{ports['payments']}/v1/payments/webhooks/sandbox",
    }, ports["sandbox"], "/healthz"))
    specs.append(spec("gateway", "api", {
        "DATABASE_URL": platform.databases["gateway"].app_url, "PORT": str(ports["gateway"]),
        "INTERNAL_TOKEN_PRIVATE_KEY": platform.private_key,
        "CONSOLE_METRICS_TARGETS": ",".join(metrics_targets),
        **{f"{s.upper()}_URL": f"http://127.0.0.1:{ports[s]}" for s in SERVICES},
    }, ports["gateway"], "/healthz"))
    return specs


def up(home: Path) -> int:
    home.mkdir(parents=True, exist_ok=True)
    state = _state(home)
    started = time.monotonic()
    pg = broker = supervisor = None
    stopping = False

    def request_stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    # Ctrl-C stops everything even when `up` was started from a non-interactive shell's
    # background job, which would otherwise inherit SIGINT as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        admin_url, pg = start_database(home, state)
        bootstrap, broker = start_broker(home, state)
        platform = prepare(home, admin_url, bootstrap, state)
        _save_state(home, state)
        specs = process_specs(platform, state)
        _save_state(home, state)
        say(f"• starting {len(specs)} processes")
        supervisor = Supervisor(specs)
        supervisor.start_all()
        problems = supervisor.wait_healthy(60, progress=lambda name, n, total: say(f"  ✓ {name} ({n}/{total})"))
        if problems:
            raise UpError("; ".join(problems))
        key = asyncio.run(ensure_demo_key(platform.databases["gateway"].owner_url, home / "keys" / "demo-api-key"))
        say(f"\nClearhouse is up in {time.monotonic() - started:.1f}s")
        for name, port in platform.ports.items():
            say(f"  {name:<15} http://127.0.0.1:{port}")
        say(f"\n  gateway URL     http://127.0.0.1:{platform.ports['gateway']}   (the public API; docs at /docs)"
            f"\n  demo API key    {key}   (tenant demo, every scope)"
            f"\n  console         http://127.0.0.1:{platform.ports['gateway']}/console   (sign in with an API key)")
        say(f"  logs            {home / 'logs'}\n  traces          {home / 'traces'}\nCtrl-C stops everything.")
        supervisor.watch(lambda: stopping, also=[broker.restart_if_dead] if broker else [])
        return 0
    except KeyboardInterrupt:
        return 0
    except (UpError, EmbeddedError) as exc:
        print(f"clearhouse up: {exc}", file=sys.stderr)
        return 1
    finally:
        say("stopping…")
        if supervisor:
            supervisor.stop_all()
        if broker:
            broker.stop()
        if pg:
            pg.stop()
