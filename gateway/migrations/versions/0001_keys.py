"""Tenants, principals and API keys.

Keys are stored as an id and the sha256 of their secret, never the secret. Rows are never
deleted (a key's history is its audit trail); revocation is a one-way `revoked_at`. Any
change that can take access away notifies channel `gateway_keys`, so every gateway
process evicts its cached copy at once, whoever made the change.

The runtime role reads, and stamps `last_used_at`; creating and revoking keys is done
with the owner role (`clearhouse keys ...`), so a compromised gateway cannot mint keys.
"""

from alembic import op

from shared.migrate import grant

revision = "gateway_0001"
down_revision = None

# The shape of a scope; which scopes exist is the code's list (gateway.keys.SCOPES), so
# a service adding one needs no migration.
_SCOPES_SHAPE = r"array_to_string({col}, ',') ~ '^((payments|approvals|ledger|reconciliation):[a-z_]+(,|$))*$'"
_ID = r"'^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$'"


def upgrade() -> None:
    op.execute(f"""
        CREATE TABLE tenants (
            id         text        PRIMARY KEY CHECK (id ~ {_ID}),
            created_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )""")
    op.execute(f"""
        CREATE TABLE principals (
            tenant_id  text        NOT NULL REFERENCES tenants (id),
            id         text        NOT NULL CHECK (id ~ {_ID}),
            scopes     text[]      NOT NULL CHECK ({_SCOPES_SHAPE.format(col='scopes')}),
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (tenant_id, id)
        )""")
    op.execute(f"""
        CREATE TABLE api_keys (
            id           text        PRIMARY KEY CHECK (id ~ '^[a-z0-9]{{16}}$'),
            tenant_id    text        NOT NULL,
            principal_id text        NOT NULL,
            environment  text        NOT NULL CHECK (environment IN ('live', 'test')),
            secret_hash  bytea       NOT NULL CHECK (length(secret_hash) = 32),
            scopes       text[]      NOT NULL CHECK ({_SCOPES_SHAPE.format(col='scopes')} AND cardinality(scopes) > 0),
            name         text        CHECK (length(name) <= 200),
            created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
            revoked_at   timestamptz,
            last_used_at timestamptz,
            FOREIGN KEY (tenant_id, principal_id) REFERENCES principals (tenant_id, id)
        )""")
    op.execute("CREATE INDEX api_keys_by_principal ON api_keys (tenant_id, principal_id)")
    # Revocation is final and a key's secret never changes: a leaked key cannot be revived.
    op.execute("""
        CREATE FUNCTION api_keys_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                RAISE EXCEPTION 'api keys are revoked, never deleted' USING ERRCODE = 'insufficient_privilege';
            END IF;
            IF OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
                RAISE EXCEPTION 'a revoked api key stays revoked' USING ERRCODE = 'insufficient_privilege';
            END IF;
            IF (NEW.id, NEW.tenant_id, NEW.principal_id, NEW.environment, NEW.secret_hash, NEW.created_at)
               IS DISTINCT FROM
               (OLD.id, OLD.tenant_id, OLD.principal_id, OLD.environment, OLD.secret_hash, OLD.created_at)
            THEN
                RAISE EXCEPTION 'an api key''s identity and secret never change'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            RETURN NEW;
        END $$""")
    op.execute("CREATE TRIGGER api_keys_guard BEFORE UPDATE OR DELETE ON api_keys "
               "FOR EACH ROW EXECUTE FUNCTION api_keys_guard()")
    # Delivered at commit to every listening gateway; the payload is the key id, or '*'
    # when a principal's scopes (the ceiling of its keys' scopes) changed.
    op.execute("""
        CREATE FUNCTION api_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_TABLE_NAME = 'api_keys' THEN
                PERFORM pg_notify('gateway_keys', OLD.id);
            ELSE
                PERFORM pg_notify('gateway_keys', '*');
            END IF;
            RETURN NULL;
        END $$""")
    op.execute("CREATE TRIGGER api_keys_notify AFTER UPDATE OF revoked_at, scopes ON api_keys "
               "FOR EACH ROW EXECUTE FUNCTION api_keys_notify()")
    op.execute("CREATE TRIGGER principals_notify AFTER UPDATE OF scopes OR DELETE ON principals "
               "FOR EACH ROW EXECUTE FUNCTION api_keys_notify()")

    grant("SELECT", "tenants")
    grant("SELECT", "principals")
    grant("SELECT, UPDATE (last_used_at)", "api_keys")
    grant("SELECT", "alembic_version")  # /readyz compares the applied revision with the code's head
