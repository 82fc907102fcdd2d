"""The kit's tables, created by each service's first migration: the event log (outbox and
audit trail in one), the inbox, consumer failures and idempotency keys.

The event log is append-only in the database itself: a trigger refuses DELETE, TRUNCATE
and any UPDATE other than setting `published_at` once, whoever the role is, and the
service role is additionally granted nothing more than SELECT, INSERT and
UPDATE(published_at).
"""

from __future__ import annotations

OUTBOX_CHANNEL = "clearhouse_outbox"

KIT_DDL = [
    """
    CREATE TABLE events (
        seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id             uuid        NOT NULL UNIQUE,
        tenant_id      text,
        aggregate_type text        NOT NULL,
        aggregate_id   text        NOT NULL,
        type           text        NOT NULL CHECK (type ~ '^[a-z][a-z_]*(\\.[a-z][a-z_]*)+\\.v[0-9]+$'),
        schema_version integer     NOT NULL CHECK (schema_version > 0),
        payload        jsonb       NOT NULL,
        actor          text        NOT NULL,
        reason         text,
        correlation_id text,
        causation_id   text,
        traceparent    text,
        occurred_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
        published_at   timestamptz
    )
    """,
    "CREATE INDEX events_unpublished ON events (seq) WHERE published_at IS NULL",
    "CREATE INDEX events_by_aggregate ON events (aggregate_type, aggregate_id, seq)",
    "CREATE INDEX events_by_correlation ON events (correlation_id) WHERE correlation_id IS NOT NULL",
    # The payment timeline reads every service's events about one payment.
    "CREATE INDEX events_by_payment ON events ((payload->>'payment_id')) WHERE payload ? 'payment_id'",
    """
    CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'UPDATE' THEN
            RAISE EXCEPTION 'events is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF OLD.published_at IS NOT NULL AND NEW.published_at IS DISTINCT FROM OLD.published_at THEN
            RAISE EXCEPTION 'events.published_at is set once' USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF (NEW.seq, NEW.id, NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, NEW.type, NEW.schema_version,
            NEW.payload, NEW.actor, NEW.reason, NEW.correlation_id, NEW.causation_id, NEW.traceparent, NEW.occurred_at)
           IS DISTINCT FROM
           (OLD.seq, OLD.id, OLD.tenant_id, OLD.aggregate_type, OLD.aggregate_id, OLD.type, OLD.schema_version,
            OLD.payload, OLD.actor, OLD.reason, OLD.correlation_id, OLD.causation_id, OLD.traceparent, OLD.occurred_at)
        THEN
            RAISE EXCEPTION 'events is append-only: only published_at may be set' USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
    END $$
    """,
    "CREATE TRIGGER events_guard_update BEFORE UPDATE OR DELETE ON events FOR EACH ROW EXECUTE FUNCTION events_append_only()",
    "CREATE TRIGGER events_guard_truncate BEFORE TRUNCATE ON events FOR EACH STATEMENT EXECUTE FUNCTION events_append_only()",
    # One wake-up per inserting statement, delivered at commit: the relay's cue.
    f"""
    CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_notify('{OUTBOX_CHANNEL}', ''); RETURN NULL; END $$
    """,
    "CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION events_notify()",
    """
    CREATE TABLE processed_events (
        consumer     text        NOT NULL,
        event_id     uuid        NOT NULL,
        event_type   text        NOT NULL,
        outcome      text        NOT NULL CHECK (outcome IN ('applied', 'ignored', 'dead_lettered')),
        processed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (consumer, event_id)
    )
    """,
    """
    CREATE TABLE consumer_failures (
        consumer   text        NOT NULL,
        event_id   uuid        NOT NULL,
        topic      text        NOT NULL,
        attempts   integer     NOT NULL,
        last_error text        NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (consumer, event_id)
    )
    """,
    """
    CREATE TABLE idempotency_keys (
        tenant_id        text        NOT NULL,
        principal        text        NOT NULL,
        method           text        NOT NULL,
        path             text        NOT NULL,
        key              text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
        request_hash     text        NOT NULL,
        status           text        NOT NULL CHECK (status IN ('in_flight', 'completed')),
        response_status  integer,
        response_body    bytea,
        response_headers jsonb,
        created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
        locked_until     timestamptz,
        lock_token       uuid,  -- who holds an in-flight key; only the holder may complete it
        PRIMARY KEY (tenant_id, principal, method, path, key),
        CHECK (status = 'in_flight' OR response_status IS NOT NULL)
    )
    """,
    "CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at)",
]


def kit_grants(app_role: str) -> list[str]:
    """Grants for the service's runtime role (different from the migration owner)."""
    role = '"' + app_role.replace('"', '""') + '"'
    return [
        f"REVOKE ALL ON events FROM {role}",
        f"GRANT SELECT, INSERT ON events TO {role}",
        f"GRANT UPDATE (published_at) ON events TO {role}",
        f"GRANT SELECT, INSERT ON processed_events TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON consumer_failures TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO {role}",
    ]
