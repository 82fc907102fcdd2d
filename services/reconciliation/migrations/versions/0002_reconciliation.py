"""Reconciliation's own tables: the read model of payments and ledger postings, statements
and their lines, tenant rules, runs, matches and breaks.

    rm_payments, rm_refunds          what payments says happened (from payment.* events)
    rm_ledger_postings               what the ledger recorded, one row per posted transaction
    rm_ledger_totals                 the same, summed per payment (what a run joins against)
    statements, statement_lines      what the bank or processor reports; lines partitioned
                                     by the month the statement was received
    reconciliation_rules             matching parameters per tenant
    runs, matches, breaks            the outcome of reconciling one statement

Tenant ids are compared byte-wise (COLLATE "C"): every index on them is probed a million
times by a large run, and a linguistic collation would only make that slower.

The runtime role may never DELETE from the read model, the statements or the breaks (a
break is resolved, never erased) nor UPDATE a statement line; it may replace a
statement's automatic matches on a re-run, which is why it may DELETE matches.
Statement lines are created in monthly partitions by `ensure_statement_partition`, a
SECURITY DEFINER function owned by the migration owner: the runtime role can add the
next month's partition without owning any table.
"""

from alembic import op

from shared.migrate import app_role, grant

revision = "reconciliation_0002"
down_revision = "reconciliation_0001"

BREAK_TYPES = ("missing_in_statement", "missing_in_ledger", "missing_in_payments", "amount_mismatch",
               "currency_mismatch", "duplicate")
RUN_STATUSES = ("queued", "running", "completed", "failed")
MATCH_RULES = ("exact", "tolerance", "one_to_many", "fuzzy", "manual")
LEDGER_STATES = ("agrees", "missing", "mismatch", "not_applicable")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def upgrade() -> None:
    # ── read model ─────────────────────────────────────────────────────────────────
    op.execute("""
    CREATE TABLE rm_payments (
        tenant_id        text COLLATE "C"        NOT NULL,
        payment_id       uuid        NOT NULL,
        amount           bigint      CHECK (amount > 0),
        currency         text        CHECK (currency ~ '^[A-Z]{3}$'),
        debit_account_id text,
        status           text        NOT NULL,
        -- the producer's event-log seq of the event that set `status`: a late, older
        -- event never moves the status backwards
        status_seq       bigint      NOT NULL,
        value_date       date,
        refunded_amount  bigint      NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0),
        updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (tenant_id, payment_id)
    )
    """)
    op.execute("CREATE INDEX rm_payments_by_value_date ON rm_payments (tenant_id, value_date) "
               "WHERE value_date IS NOT NULL")
    op.execute("""
    CREATE TABLE rm_refunds (
        tenant_id  text COLLATE "C"        NOT NULL,
        refund_id  uuid        NOT NULL,
        payment_id uuid        NOT NULL,
        amount     bigint      NOT NULL CHECK (amount > 0),
        currency   text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
        value_date date        NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (tenant_id, refund_id)
    )
    """)
    op.execute("CREATE INDEX rm_refunds_by_value_date ON rm_refunds (tenant_id, value_date)")
    op.execute("""
    CREATE TABLE rm_ledger_postings (
        tenant_id      text COLLATE "C"        NOT NULL,
        transaction_id uuid        NOT NULL,
        currency       text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
        payment_id     uuid        NOT NULL,
        amount         bigint      NOT NULL CHECK (amount <> 0),  -- signed: a reversal is negative
        kind           text        NOT NULL,
        posted_at      timestamptz NOT NULL,
        PRIMARY KEY (tenant_id, transaction_id, currency)
    )
    """)
    op.execute("""
    CREATE TABLE rm_ledger_totals (
        tenant_id      text COLLATE "C"        NOT NULL,
        payment_id     uuid        NOT NULL,
        currency       text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
        amount         bigint      NOT NULL,   -- net posted amount in `currency`
        postings       integer     NOT NULL CHECK (postings > 0),
        reversals      integer     NOT NULL DEFAULT 0 CHECK (reversals >= 0),
        other_currency text,                   -- a posting for this payment in another currency
        value_date     date        NOT NULL,   -- date of the first posting
        PRIMARY KEY (tenant_id, payment_id)
    )
    """)
    op.execute("CREATE INDEX rm_ledger_totals_by_value_date ON rm_ledger_totals (tenant_id, value_date)")

    # ── statements ─────────────────────────────────────────────────────────────────
    op.execute("""
    CREATE TABLE statements (
        id             uuid        PRIMARY KEY,
        tenant_id      text COLLATE "C"        NOT NULL,
        format         text        NOT NULL CHECK (format IN ('csv', 'camt053', 'mt940')),
        content_sha256 bytea       NOT NULL CHECK (length(content_sha256) = 32),
        size_bytes     bigint      NOT NULL CHECK (size_bytes > 0),
        line_count     integer     NOT NULL CHECK (line_count >= 0),
        skipped_count  integer     NOT NULL DEFAULT 0 CHECK (skipped_count >= 0),
        period_start   date        NOT NULL,
        period_end     date        NOT NULL CHECK (period_end >= period_start),
        received_on    date        NOT NULL,  -- partition key of its lines
        account        text,
        currencies     text[]      NOT NULL,
        created_by     text        NOT NULL,
        created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
        UNIQUE (tenant_id, content_sha256)
    )
    """)
    op.execute("CREATE INDEX statements_by_tenant ON statements (tenant_id, created_at DESC)")
    op.execute("""
    CREATE TABLE statement_lines (
        tenant_id    text COLLATE "C"    NOT NULL,
        statement_id uuid    NOT NULL,
        received_on  date    NOT NULL,
        line_no      integer NOT NULL CHECK (line_no > 0),
        entry_no     integer NOT NULL CHECK (entry_no > 0),   -- camt.053 Ntry; = line_no elsewhere
        source_line  integer,                                 -- where in the file (line or Ntry)
        value_date   date    NOT NULL,
        booking_date date,
        direction    text    NOT NULL CHECK (direction IN ('DBIT', 'CRDT')),
        -- NULL only for a camt.053 TxDtls without its own amount: the entry carries it
        amount       bigint  CHECK (amount > 0),
        entry_amount bigint  NOT NULL CHECK (entry_amount > 0),
        currency     text    NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
        -- the reference as written, when it is more than ref_uuid in canonical form
        reference    text    CHECK (length(reference) <= 140),
        ref_uuid     uuid,
        bank_ref     text    CHECK (length(bank_ref) <= 140),
        PRIMARY KEY (received_on, statement_id, line_no)
    ) PARTITION BY RANGE (received_on)
    """)
    op.execute("""
    CREATE FUNCTION ensure_statement_partition(day date) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    DECLARE
        first_day date := date_trunc('month', day)::date;
        name text := 'statement_lines_' || to_char(day, 'YYYY_MM');
    BEGIN
        IF to_regclass(name) IS NULL THEN
            -- Two uploads in a new month may race here; one creates, the other waits.
            PERFORM pg_advisory_xact_lock(hashtextextended('reconciliation:statement_partitions', 0));
            EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF statement_lines FOR VALUES FROM (%L) TO (%L)',
                           name, first_day, (first_day + interval '1 month')::date);
        END IF;
        RETURN name;
    END $$
    """)
    op.execute("REVOKE ALL ON FUNCTION ensure_statement_partition(date) FROM PUBLIC")
    # Fresh statistics for a month's partition right after a large upload: without them the
    # planner takes a million-line statement for a handful of rows and plans index probes
    # where a hash join is a hundred times faster. ANALYZE needs the table's owner.
    op.execute("""
    CREATE FUNCTION analyze_statement_partition(day date) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    DECLARE
        name text := 'statement_lines_' || to_char(day, 'YYYY_MM');
    BEGIN
        IF to_regclass(name) IS NOT NULL THEN
            EXECUTE format('ANALYZE %I', name);
        END IF;
    END $$
    """)
    op.execute("REVOKE ALL ON FUNCTION analyze_statement_partition(date) FROM PUBLIC")

    # ── rules, runs, matches, breaks ─────────────────────────────────────────────
    op.execute("""
    CREATE TABLE reconciliation_rules (
        tenant_id   text COLLATE "C"        PRIMARY KEY,
        rules       jsonb       NOT NULL,
        version     integer     NOT NULL CHECK (version > 0),
        updated_by  text        NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """)
    op.execute(f"""
    CREATE TABLE runs (
        id              uuid        PRIMARY KEY,
        tenant_id       text COLLATE "C"        NOT NULL,
        statement_id    uuid        NOT NULL REFERENCES statements (id),
        status          text        NOT NULL CHECK (status IN ({_in(RUN_STATUSES)})),
        stage           text,
        rules           jsonb       NOT NULL,
        lines           integer,
        matched         integer     NOT NULL DEFAULT 0,
        breaks          integer     NOT NULL DEFAULT 0,
        breaks_opened   integer     NOT NULL DEFAULT 0,
        breaks_resolved integer     NOT NULL DEFAULT 0,
        stats           jsonb       NOT NULL DEFAULT '{{}}',
        error_code      text,
        attempts        integer     NOT NULL DEFAULT 0,
        lease_until     timestamptz,
        requested_by    text        NOT NULL,
        correlation_id  text,
        traceparent     text,
        created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
        started_at      timestamptz,
        completed_at    timestamptz,
        CHECK (status <> 'failed' OR error_code IS NOT NULL),
        CHECK (status <> 'completed' OR completed_at IS NOT NULL)
    )
    """)
    op.execute("CREATE INDEX runs_queue ON runs (created_at) WHERE status IN ('queued', 'running')")
    op.execute("CREATE INDEX runs_by_statement ON runs (tenant_id, statement_id, created_at DESC)")
    # One active run per statement: a second request while one is queued or running gets that one.
    op.execute("CREATE UNIQUE INDEX runs_one_active ON runs (tenant_id, statement_id) "
               "WHERE status IN ('queued', 'running')")
    op.execute(f"""
    CREATE TABLE matches (
        tenant_id         text COLLATE "C"        NOT NULL,
        -- no foreign key: checking it costs a third of writing a million matches; the
        -- run writes matches only for the statement it reads (verify checks the rest)
        statement_id      uuid        NOT NULL,
        line_no           integer     NOT NULL,
        target_kind       text        NOT NULL CHECK (target_kind IN ('payment', 'refund')),
        target_id         uuid        NOT NULL,
        payment_id        uuid        NOT NULL,
        rule              text        NOT NULL CHECK (rule IN ({_in(MATCH_RULES)})),
        confidence        numeric(4, 3) NOT NULL CHECK (confidence > 0 AND confidence <= 1),
        amount_difference bigint      NOT NULL DEFAULT 0,
        date_difference   integer     NOT NULL DEFAULT 0,
        ledger            text        NOT NULL CHECK (ledger IN ({_in(LEDGER_STATES)})),
        run_id            uuid,
        matched_by        text,        -- the person of a manual match; a run's are its own

        reason            text,
        matched_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
        CHECK ((rule = 'manual') = (run_id IS NULL)),
        CHECK ((rule = 'manual') = (matched_by IS NOT NULL))
    )
    """)
    # What "a payment is reconciled once" rests on: one match per payment (or refund),
    # across every statement of the tenant. PostgreSQL cannot enforce this across
    # partitions, which is why matches is one table, keyed by it.
    op.execute("ALTER TABLE matches ADD PRIMARY KEY (tenant_id, target_id)")
    op.execute("ALTER INDEX matches_pkey RENAME TO matches_one_per_target")
    # A run writes a statement's matches together, so they fill adjacent pages: a block
    # range index finds them at almost no cost per row written (a second b-tree would
    # cost a million insertions more per large run). A line is matched by one run or one
    # person at a time (the tenant's matching lock); verify checks none is matched twice.
    op.execute("CREATE INDEX matches_by_statement ON matches USING brin (statement_id) WITH (pages_per_range = 16)")
    op.execute(f"""
    CREATE TABLE breaks (
        id               uuid        PRIMARY KEY,
        tenant_id        text COLLATE "C"        NOT NULL,
        statement_id     uuid        NOT NULL REFERENCES statements (id),
        run_id           uuid        NOT NULL REFERENCES runs (id),   -- the run that opened it
        last_run_id      uuid        NOT NULL REFERENCES runs (id),   -- the last run that found it
        type             text        NOT NULL CHECK (type IN ({_in(BREAK_TYPES)})),
        break_key        text        NOT NULL,
        status           text        NOT NULL CHECK (status IN ('open', 'resolved')),
        source           text        NOT NULL CHECK (source IN ('statement', 'payments', 'ledger')),
        amount           bigint,
        expected_amount  bigint,
        currency         text,
        expected_currency text,
        reference        text,
        target_id        uuid,                                     -- the payment or refund, when known
        payment_id       uuid,
        line_no          integer,
        value_date       date,
        detail           text        NOT NULL,
        opened_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
        resolved_at      timestamptz,
        resolved_by      text,
        resolution       text,
        resolution_reason text,
        UNIQUE (tenant_id, statement_id, type, break_key),
        CHECK ((status = 'resolved') = (resolved_at IS NOT NULL AND resolution IS NOT NULL AND resolved_by IS NOT NULL))
    )
    """)
    op.execute("CREATE INDEX breaks_by_tenant_status ON breaks (tenant_id, status, opened_at, id)")
    op.execute("CREATE INDEX breaks_by_run ON breaks (last_run_id)")
    op.execute("CREATE INDEX breaks_open_by_target ON breaks (tenant_id, target_id) WHERE status = 'open'")

    for table in ("rm_payments", "rm_refunds", "rm_ledger_postings", "rm_ledger_totals"):
        grant("SELECT, INSERT, UPDATE", table)
    grant("SELECT, INSERT", "statements")
    grant("SELECT, INSERT", "statement_lines")
    grant("SELECT, INSERT, UPDATE", "reconciliation_rules")
    grant("SELECT, INSERT, UPDATE", "runs")
    grant("SELECT, INSERT, DELETE", "matches")
    grant("SELECT, INSERT, UPDATE", "breaks")
    role = app_role()
    if role:
        op.execute(f'GRANT EXECUTE ON FUNCTION ensure_statement_partition(date) TO "{role}"')
        op.execute(f'GRANT EXECUTE ON FUNCTION analyze_statement_partition(date) TO "{role}"')
    # levenshtein() for the fuzzy pass; a trusted extension, so the database owner may add it.
    op.execute("CREATE EXTENSION IF NOT EXISTS fuzzystrmatch")
