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
        trace_ids = traceview.trace_ids_for_attribute(spans, "clearhouse.payment_id", args.payment)
    else:
        trace_ids = [args.trace_id] if args.trace_id else []
    if not trace_ids:
        print("no such trace in the exported spans", file=sys.stderr)
        return 1
    for trace_id in trace_ids:
        print(traceview.render_waterfall(traceview.find_trace(spans, trace_id)))
    return 0


def cmd_verify(args) -> int:
    from clearhouse.verify import run

    return run(_home())


def cmd_test(args) -> int:
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

    trace = sub.add_parser("trace", help="print a trace's cross-service waterfall from exported spans")
    trace.add_argument("trace_id", nargs="?")
    trace.add_argument("--payment", help="find the traces of a payment id")
    trace.add_argument("--traces-dir")
    trace.set_defaults(func=cmd_trace)

    sub.add_parser("verify", help="check every invariant across all services' databases (read-only)").set_defaults(
        func=cmd_verify)

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
