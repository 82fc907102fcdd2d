"""Makes the compose stack's secrets once, so that no secret is ever committed and every
container of a service shares the same values:

    secrets-init.py ROOT      ROOT/<group>/<VARIABLE>, exported by with-secrets.sh

    public/    INTERNAL_TOKEN_PUBLIC_KEY          every process verifies internal tokens
    gateway/   INTERNAL_TOKEN_PRIVATE_KEY         the gateway alone signs them
    payments/  PAYMENTS_PAYEE_KEYS, PAYMENTS_PAYEE_KEY_ID, PAYMENTS_SANDBOX_WEBHOOK_SECRET,
               PAYMENTS_SANDBOX_API_KEY
    sandbox/   SANDBOX_WEBHOOK_SECRET, SANDBOX_API_KEY   (the same values as payments')

A value that exists is kept: above all the payee keyring, without which stored payee
details cannot be decrypted. Runs as root because fresh volumes are root-owned, and hands
every file to the image's service user (uid 10001), readable by it alone.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from shared.auth import generate_keypair

SERVICE_UID = SERVICE_GID = 10001


def ensure(root: Path, variables: tuple[str, ...], make: Callable[[], tuple[str, ...]]) -> None:
    """Write `variables` (paths relative to root) from one call of `make`, unless all exist.
    Values that belong together (a key pair, a secret two services share) are made together."""
    paths = [root / variable for variable in variables]
    if all(path.exists() for path in paths):
        return
    for path, value in zip(paths, make(), strict=True):
        path.unlink(missing_ok=True)
        path.write_text(value)
        os.chown(path, SERVICE_UID, SERVICE_GID)
        os.chmod(path, 0o400)
        print(f"secrets-init: wrote {path.relative_to(root)}")


def existing_or(root: Path, variable: str, make: Callable[[], str]) -> str:
    path = root / variable
    return path.read_text() if path.exists() else make()


GROUPS = ("public", "gateway", "payments", "sandbox")


def main(root: Path) -> None:
    for group in GROUPS:
        (root / group).mkdir(exist_ok=True)
    # Tokens live a minute: a new pair only means that tokens in flight are refused once.
    ensure(root, ("gateway/INTERNAL_TOKEN_PRIVATE_KEY", "public/INTERNAL_TOKEN_PUBLIC_KEY"), generate_keypair)
    # The keyring is never replaced, only completed: it decrypts every stored payee.
    keyring = existing_or(root, "payments/PAYMENTS_PAYEE_KEYS", lambda: json.dumps(
        {"compose-1": base64.b64encode(secrets.token_bytes(32)).decode()}))
    key_id = existing_or(root, "payments/PAYMENTS_PAYEE_KEY_ID", lambda: sorted(json.loads(keyring))[-1])
    ensure(root, ("payments/PAYMENTS_PAYEE_KEYS", "payments/PAYMENTS_PAYEE_KEY_ID"), lambda: (keyring, key_id))
    for name in ("WEBHOOK_SECRET", "API_KEY"):
        shared = existing_or(root, f"payments/PAYMENTS_SANDBOX_{name}", lambda: secrets.token_hex(32))
        ensure(root, (f"payments/PAYMENTS_SANDBOX_{name}", f"sandbox/SANDBOX_{name}"), lambda: (shared, shared))
    for group in GROUPS:  # last: the service user may list and read a group, never change it
        os.chown(root / group, SERVICE_UID, SERVICE_GID)
        os.chmod(root / group, 0o500)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
