"""`clearhouse verify`: checks the invariants of the design across every service's
database, read-only, and reports each violation with ids.

Each service owns the checks of its own data (`services/<name>/verify.py`); the checks
that join two services' data live in `clearhouse/crosscheck.py`; this module only finds
the databases, runs the checks and prints the outcome. Exit code 1 on any
violation or on a database that cannot be read.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
from pathlib import Path

from clearhouse.crosscheck import verify_across
from clearhouse.provision import service_urls
from clearhouse.serve import SERVICES


def admin_url(home: Path) -> str:
    """The server `clearhouse up` used: CLEARHOUSE_DATABASE_URL, or the embedded one."""
    admin = os.environ.get("CLEARHOUSE_DATABASE_URL")
    if admin:
        return admin
    state = json.loads((home / "state.json").read_text()) if (home / "state.json").exists() else {}
    port = state.get("ports", {}).get("postgres")
    if port is None:
        raise SystemExit(f"no platform state in {home}: run `clearhouse up` first or set CLEARHOUSE_DATABASE_URL")
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def database_urls(home: Path) -> dict[str, str]:
    """Each service's app-role URL: `<SERVICE>_DATABASE_URL` if set, else on `admin_url`."""
    admin = admin_url(home)
    return {s: os.environ.get(f"{s.upper()}_DATABASE_URL") or service_urls(admin, f"clearhouse_{s}")[1]
            for s in SERVICES}


async def verify_all(urls: dict[str, str]) -> dict[str, list[str]]:
    results: dict[str, list[str]] = {}
    for service, url in urls.items():
        try:
            module = importlib.import_module(f"services.{service}.verify")
        except ModuleNotFoundError:
            continue
        try:
            results[service] = await module.verify(url)
        except Exception as exc:  # an unreadable database is a failed verification, said plainly
            results[service] = [f"could not verify: {type(exc).__name__}: {exc}"]
    return results


async def verify_everything(urls: dict[str, str], *, grace_s: float) -> dict[str, list[str]]:
    """Each service's own checks, then the ones across services (`clearhouse.crosscheck`)."""
    results = await verify_all(urls)
    try:
        results["across services"] = await verify_across(urls, grace_s=grace_s)
    except Exception as exc:  # as above: unreadable is a failed verification
        results["across services"] = [f"could not verify: {type(exc).__name__}: {exc}"]
    return results


def run(home: Path, *, grace_s: float = 60.0) -> int:
    results = asyncio.run(verify_everything(database_urls(home), grace_s=grace_s))
    failed = False
    for service, violations in results.items():
        if violations:
            failed = True
            print(f"✗ {service}: {len(violations)} violation(s)")
            for violation in violations:
                print(f"    - {violation}")
        else:
            print(f"✓ {service}: all invariants hold")
    return 1 if failed else 0
