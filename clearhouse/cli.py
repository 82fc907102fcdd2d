"""The `clearhouse` command line: start the platform, run one process, migrate, replay
the outbox, show a trace, run the tests.

Each subcommand is a thin wrapper; the work lives in the modules it calls. Errors a
person can fix are printed as one line with exit code 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _home() -> Path:
    return Path(os.environ.get("CLEARHOUSE_HOME", ROOT / ".clearhouse")).resolve()


def cmd_up(args) -> int:
    from clearhouse.up import up

    return up(_home())


def cmd_serve(args) -> int:
    from clearhouse.serve import serve

    serve(args.service, args.role, host=args.host, port=args.port)
    return 0


def cmd_migrate(args) -> int:
    from clearhouse.serve import migrations_dir, settings_for
    from shared import migrate

    settings = settings_for(args.service)
    url = settings.migration_database_url or settings.database_url
    migrate.upgrade(migrations_dir(args.service), url, args.app_role)
    print(f"{args.service}: migrations at head")
    return 0


def cmd_outbox_replay(args) -> int:
    from clearhouse.serve import settings_for
    from shared.relay import Relay

    settings = settings_for(args.service)
    relay = Relay(service=args.service, database_url=settings.database_url,
                  bootstrap=settings.kafka_bootstrap_servers)
    count = asyncio.run(relay.replay(from_seq=args.from_seq, to_seq=args.to_seq))
    print(f"{args.service}: replayed {count} events")
    return 0


def cmd_trace(args) -> int:
    from clearhouse import traceview

    spans = traceview.load_spans(Path(args.traces_dir or _home() / "traces"))
    if args.payment:
        # The relay tags each publish span with the event's aggregate: a payment's own events.
        trace_ids = list(dict.fromkeys(
            traceview.trace_ids_for_attribute(spans, "clearhouse.payment_id", args.payment)
            + traceview.trace_ids_for_attribute(spans, "clearhouse.aggregate_id", args.payment)))
    else:
        trace_ids = [args.trace_id] if args.trace_id else []
    if not trace_ids:
        print("no such trace in the exported spans", file=sys.stderr)
        return 1
    for trace_id in trace_ids:
        print(traceview.render_waterfall(traceview.find_trace(spans, trace_id)))
    return 0


def _gateway_db() -> str:
    """The gateway database as its owner (key management is an operator's act, not the
    gateway's): GATEWAY_DATABASE_URL when set, else the one `clearhouse up` made."""
    from clearhouse.provision import service_urls
    from clearhouse.verify import admin_url

    return os.environ.get("GATEWAY_DATABASE_URL") or service_urls(admin_url(_home()), "clearhouse_gateway")[0]


def cmd_keys_create(args) -> int:
    import json

    from gateway.keys import create_key

    key = asyncio.run(create_key(_gateway_db(), tenant=args.tenant, principal=args.principal,
                                 scopes=[s.strip() for s in args.scopes.split(",") if s.strip()], name=args.name))
    print(json.dumps({"key": key}) if args.json else key)
    return 0


def cmd_keys_list(args) -> int:
    from gateway.keys import list_keys

    for info in asyncio.run(list_keys(_gateway_db(), tenant=args.tenant, include_revoked=args.all)):
        state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
        print(f"{info.prefix}  {info.tenant}/{info.principal}  {','.join(info.scopes)}  {state}")
    return 0


def cmd_keys_revoke(args) -> int:
    from gateway.keys import revoke_key

    info = asyncio.run(revoke_key(_gateway_db(), args.key))
    print(f"{info.prefix} revoked at {info.revoked_at:%Y-%m-%d %H:%M:%S}")
    return 0


def cmd_verify(args) -> int:
    from clearhouse.verify import run

    return run(_home(), grace_s=args.grace)


def cmd_events_catalogue(args) -> int:
    from clearhouse.catalogue import write

    return write(check=args.check)


def cmd_test(args) -> int:
    from clearhouse.sysdeps import ensure_test_tools

    ensure_test_tools()
    # Per-test timeouts (pyproject) keep a hung broker from eating CI's budget.
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *(args.pytest_args or ["-q"])]
    return subprocess.call(command, cwd=ROOT)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clearhouse", description="Clearhouse money APIs")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("up", help="start the whole platform (embedded PostgreSQL and broker by default)").set_defaults(
        func=cmd_up)

    serve = sub.add_parser("serve", help="run one process of a service")
    serve.add_argument("service")
    serve.add_argument("--role", default="api", choices=["api", "relay", "consumer"])
    serve.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(func=cmd_serve)

    mig = sub.add_parser("migrate", help="run a service's migrations to head (as the owner role)")
    mig.add_argument("service")
    mig.add_argument("--app-role", default=os.environ.get("APP_ROLE"))
    mig.set_defaults(func=cmd_migrate)

    outbox = sub.add_parser("outbox", help="event log operations").add_subparsers(dest="outbox_command", required=True)
    replay = outbox.add_parser("replay", help="publish a range of a service's events again")
    replay.add_argument("--service", required=True)
    replay.add_argument("--from-seq", type=int, default=1)
    replay.add_argument("--to-seq", type=int, default=None)
    replay.set_defaults(func=cmd_outbox_replay)

    events = sub.add_parser("events", help="event schemas").add_subparsers(dest="events_command", required=True)
    catalogue = events.add_parser("catalogue", help="generate docs/event-catalogue.md from the code")
    catalogue.add_argument("--check", action="store_true", help="fail if the committed catalogue is stale")
    catalogue.set_defaults(func=cmd_events_catalogue)

    trace = sub.add_parser("trace", help="print a trace's cross-service waterfall from exported spans")
    trace.add_argument("trace_id", nargs="?")
    trace.add_argument("--payment", help="find the traces of a payment id")
    trace.add_argument("--traces-dir")
    trace.set_defaults(func=cmd_trace)

    keys = sub.add_parser("keys", help="API keys of the gateway").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key (and its tenant and principal if new); shown once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--principal", required=True)
    create.add_argument("--scopes", required=True, help="comma-separated, e.g. payments:read,payments:write")
    create.add_argument("--name")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key", help="the key, its prefix ch_live_<id>, or its id")
    revoke.set_defaults(func=cmd_keys_revoke)

    verify = sub.add_parser("verify", help="check every invariant across all services' databases (read-only)")
    verify.add_argument("--grace", type=float, default=60.0, metavar="SECONDS",
                        help="how long a cross-service step may still be in flight before it counts as a "
                             "violation (default 60; 0 once the platform is quiet)")
    verify.set_defaults(func=cmd_verify)

    test = sub.add_parser("test", help="run the test suite against real PostgreSQL and a real broker")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    test.set_defaults(func=cmd_test)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not _is_operational(exc):
            raise
        print(f"clearhouse {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _is_operational(exc: Exception) -> bool:
    """Unreachable database or broker, bad configuration: a person's problem to fix,
    shown as one line rather than a traceback."""
    import asyncpg
    import pydantic
    from aiokafka.errors import KafkaError

    return isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.PostgresError, KafkaError,
                            pydantic.ValidationError, ValueError))
