"""Operations console sessions (issue 10): a person exchanges an API key for a session.

Only the sha256 of the session token is stored (like a key's secret, 256 random bits need
no slow hash). A session belongs to the key it was opened with: revoking that key ends
its sessions here, in the same transaction as the revocation (trigger), whoever revokes
it; the gateway also re-reads the key and its principal's scopes on every console
request, so a narrowed principal is narrowed in the console at once.

Expand-only: a new table and a trigger; a gateway of the previous version ignores both.
The runtime role opens, touches and ends sessions and purges long-dead ones; it still
cannot create or revoke keys.
"""

from alembic import op

from shared.migrate import grant

revision = "gateway_0002"
down_revision = "gateway_0001"


def upgrade() -> None:
    op.execute("""
        CREATE TABLE console_sessions (
            token_hash   bytea       PRIMARY KEY CHECK (length(token_hash) = 32),
            key_id       text        NOT NULL REFERENCES api_keys (id),
            tenant_id    text        NOT NULL,
            principal_id text        NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            last_seen_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            expires_at   timestamptz NOT NULL,
            ended_at     timestamptz,
            ended_reason text        CHECK (ended_reason IN ('signed_out', 'key_revoked', 'expired', 'replaced')),
            user_agent   text        CHECK (length(user_agent) <= 300),
            CHECK ((ended_at IS NULL) = (ended_reason IS NULL)),
            FOREIGN KEY (tenant_id, principal_id) REFERENCES principals (tenant_id, id)
        )""")
    op.execute("CREATE INDEX console_sessions_open_by_key ON console_sessions (key_id) WHERE ended_at IS NULL")
    op.execute("CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at)")
    # Revoking a key ends its console sessions in the revoking transaction itself.
    op.execute("""
        CREATE FUNCTION console_sessions_end_on_revoke() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL THEN
                UPDATE console_sessions SET ended_at = clock_timestamp(), ended_reason = 'key_revoked'
                WHERE key_id = NEW.id AND ended_at IS NULL;
            END IF;
            RETURN NULL;
        END $$""")
    op.execute("CREATE TRIGGER console_sessions_end_on_revoke AFTER UPDATE OF revoked_at ON api_keys "
               "FOR EACH ROW EXECUTE FUNCTION console_sessions_end_on_revoke()")

    grant("SELECT, INSERT, UPDATE (last_seen_at, ended_at, ended_reason), DELETE", "console_sessions")

