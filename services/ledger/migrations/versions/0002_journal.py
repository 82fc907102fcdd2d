"""The ledger's own tables: accounts, the journal (transactions + entries), the balance
projection, holds and the payment reservations, with the invariants PostgreSQL enforces
by itself whatever the application does:

    accounts      immutable facts (id, tenant, currency, normal balance, allow_negative)
    transactions  ┐ the journal: append-only for every role (trigger) and the service role
    entries       ┘ may only SELECT/INSERT; a deferred constraint trigger checks at commit
                    that each transaction balances per currency and per layer
    balances      projection of the entries, one row per account, updated under a row lock;
                    a CHECK refuses a negative available balance on non-negative accounts
    holds         projection of the hold_* journal transactions (status moves once)
    payment_reservations  one immutable decision per payment (placed/rejected/skipped)

Expand-only: nothing here alters the kit's tables.
"""

from alembic import op

from shared.migrate import app_role, grant

revision = "ledger_0002"
down_revision = "ledger_0001"

MAX_AMOUNT = 10**15  # shared.money.MAX_AMOUNT_MINOR
MAX_TOTAL = 10**18  # shared.money.MAX_MONEY_MINOR: bound on any running total

DDL = [
    # ── accounts ───────────────────────────────────────────────────────────────────
    """
    CREATE TABLE accounts (
        id             uuid        PRIMARY KEY,
        tenant_id      text        NOT NULL CHECK (length(tenant_id) BETWEEN 1 AND 128),
        name           text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
        currency       text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
        normal_balance text        NOT NULL CHECK (normal_balance IN ('debit', 'credit')),
        allow_negative boolean     NOT NULL,
        system_code    text        CHECK (system_code IN ('payouts_in_transit', 'funding')),
        metadata       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
        created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
    # One system account per tenant, code and currency, created lazily by whoever needs it.
    "CREATE UNIQUE INDEX accounts_system ON accounts (tenant_id, system_code, currency) WHERE system_code IS NOT NULL",
    "CREATE INDEX accounts_by_tenant ON accounts (tenant_id, id)",
    # ── balances: the projection, one row per account ─────────────────────────────
    f"""
    CREATE TABLE balances (
        account_id     uuid        PRIMARY KEY REFERENCES accounts (id),
        tenant_id      text        NOT NULL,
        currency       text        NOT NULL,
        normal_balance text        NOT NULL CHECK (normal_balance IN ('debit', 'credit')),
        allow_negative boolean     NOT NULL,
        posted_debits   bigint     NOT NULL DEFAULT 0 CHECK (posted_debits BETWEEN 0 AND {MAX_TOTAL}),
        posted_credits  bigint     NOT NULL DEFAULT 0 CHECK (posted_credits BETWEEN 0 AND {MAX_TOTAL}),
        pending_debits  bigint     NOT NULL DEFAULT 0 CHECK (pending_debits BETWEEN 0 AND {MAX_TOTAL}),
        pending_credits bigint     NOT NULL DEFAULT 0 CHECK (pending_credits BETWEEN 0 AND {MAX_TOTAL}),
        version        bigint      NOT NULL DEFAULT 0 CHECK (version >= 0),
        head_hash      bytea       NOT NULL CHECK (length(head_hash) = 32),
        last_posted_at timestamptz,
        -- Available = posted minus pending outflows; never below zero unless allowed.
        CONSTRAINT balances_available_non_negative CHECK (
            allow_negative OR CASE normal_balance
                WHEN 'credit' THEN posted_credits - posted_debits - pending_debits
                ELSE posted_debits - posted_credits - pending_credits END >= 0)
    ) WITH (fillfactor = 70)  -- room on the page: the frequent updates stay HOT (no index churn)
    """,
    # ── the journal ────────────────────────────────────────────────────────────────
    f"""
    CREATE TABLE transactions (
        id           uuid        PRIMARY KEY,
        tenant_id    text        NOT NULL CHECK (length(tenant_id) BETWEEN 1 AND 128),
        kind         text        NOT NULL
                     CHECK (kind IN ('standard', 'reversal', 'hold_placed', 'hold_posted', 'hold_voided')),
        external_id  text        CHECK (length(external_id) BETWEEN 1 AND 255),
        description  text        CHECK (length(description) <= 1000),
        metadata     jsonb       NOT NULL DEFAULT '{{}}' CHECK (jsonb_typeof(metadata) = 'object'),
        reverses_id  uuid        REFERENCES transactions (id),
        hold_id      uuid,
        payment_id   text        CHECK (length(payment_id) BETWEEN 1 AND 128),
        posted_at    timestamptz NOT NULL,
        hash         bytea       NOT NULL CHECK (length(hash) = 32),
        -- The database transaction that wrote it: entries may only join a journal
        -- transaction in the same database transaction (see entries_guard_insert).
        txid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
        CHECK ((kind = 'reversal') = (reverses_id IS NOT NULL)),
        CHECK ((kind IN ('hold_placed', 'hold_posted', 'hold_voided')) = (hold_id IS NOT NULL))
    )
    """,
    "CREATE UNIQUE INDEX transactions_external_id ON transactions (tenant_id, external_id) "
    "WHERE external_id IS NOT NULL",
    # A transaction is reversed at most once; a hold is placed once and resolved once.
    "CREATE UNIQUE INDEX transactions_reversal ON transactions (reverses_id) WHERE reverses_id IS NOT NULL",
    "CREATE UNIQUE INDEX transactions_hold_placed ON transactions (hold_id) WHERE kind = 'hold_placed'",
    "CREATE UNIQUE INDEX transactions_hold_resolved ON transactions (hold_id) "
    "WHERE kind IN ('hold_posted', 'hold_voided')",
    f"""
    CREATE TABLE entries (
        transaction_id  uuid        NOT NULL,
        entry_index     smallint    NOT NULL CHECK (entry_index >= 0),
        tenant_id       text        NOT NULL,
        account_id      uuid        NOT NULL,
        account_version bigint      NOT NULL CHECK (account_version > 0),
        direction       text        NOT NULL CHECK (direction IN ('debit', 'credit')),
        kind            text        NOT NULL CHECK (kind IN ('posted', 'pending', 'released')),
        amount          bigint      NOT NULL CHECK (amount > 0 AND amount <= {MAX_AMOUNT}),
        currency        text        NOT NULL,
        posted_at       timestamptz NOT NULL,
        -- The account's totals right after this entry: a balance at any instant is the
        -- last entry at or before it, one index probe.
        posted_debits   bigint      NOT NULL CHECK (posted_debits BETWEEN 0 AND {MAX_TOTAL}),
        posted_credits  bigint      NOT NULL CHECK (posted_credits BETWEEN 0 AND {MAX_TOTAL}),
        pending_debits  bigint      NOT NULL CHECK (pending_debits BETWEEN 0 AND {MAX_TOTAL}),
        pending_credits bigint      NOT NULL CHECK (pending_credits BETWEEN 0 AND {MAX_TOTAL}),
        PRIMARY KEY (transaction_id, entry_index)
    )
    """,
    # Two writers can never give an account the same version: the lock's safety net.
    "CREATE UNIQUE INDEX entries_account_version ON entries (account_id, account_version)",
    "CREATE INDEX entries_account_time ON entries (account_id, posted_at, account_version)",
    # ── append-only, for every role (the service role also lacks the privileges) ──
    """
    CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
    END $$
    """,
    *[
        stmt
        for table in ("accounts", "transactions", "entries")
        for stmt in (
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION ledger_append_only()",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only()",
        )
    ],
    # ── double entry at commit ─────────────────────────────────────────────────────
    # Deferred to commit so a transaction's row and its entries can be written in any
    # order within the database transaction. Each layer balances on its own per
    # currency: posted debits = posted credits, pending = pending, released = released.
    """
    CREATE FUNCTION ledger_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        n bigint;
        unbalanced bigint;
        bad record;
    BEGIN
        -- One pass over the transaction's entries (its primary-key range); the details
        -- are looked up only when refusing.
        SELECT coalesce(sum(c), 0), count(*) FILTER (WHERE net <> 0) INTO n, unbalanced
        FROM (SELECT count(*) AS c, sum(CASE direction WHEN 'debit' THEN amount ELSE -amount END) AS net
              FROM entries WHERE transaction_id = NEW.id GROUP BY currency, kind) AS layers;
        IF n < 2 THEN
            RAISE EXCEPTION 'ledger transaction % has % entries; at least 2 are required', NEW.id, n
                USING ERRCODE = 'check_violation', CONSTRAINT = 'transactions_balanced';
        END IF;
        IF unbalanced > 0 THEN
            SELECT currency, kind,
                   coalesce(sum(amount) FILTER (WHERE direction = 'debit'), 0) AS debits,
                   coalesce(sum(amount) FILTER (WHERE direction = 'credit'), 0) AS credits
            INTO bad
            FROM entries WHERE transaction_id = NEW.id
            GROUP BY currency, kind
            HAVING coalesce(sum(amount) FILTER (WHERE direction = 'debit'), 0)
                <> coalesce(sum(amount) FILTER (WHERE direction = 'credit'), 0)
            ORDER BY currency, kind
            LIMIT 1;
            RAISE EXCEPTION 'ledger transaction % does not balance in % (% layer): debits %, credits %',
                NEW.id, bad.currency, bad.kind, bad.debits, bad.credits
                USING ERRCODE = 'check_violation', CONSTRAINT = 'transactions_balanced';
        END IF;
        RETURN NULL;
    END $$
    """,
    "CREATE CONSTRAINT TRIGGER transactions_balanced AFTER INSERT ON transactions "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger_check_balanced()",
    # Once per INSERT statement (not per row): every new entry belongs to a journal
    # transaction written by this same database transaction (so a posted transaction can
    # never gain entries later) and to an existing account of the same tenant and
    # currency. A set-based check instead of foreign keys, whose per-row KEY SHARE locks
    # on a hot account's row would pile up as multixacts.
    """
    CREATE FUNCTION ledger_check_new_entries() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        bad record;
    BEGIN
        SELECT n.transaction_id, n.account_id, t.id IS NULL AS no_transaction,
               a.id IS NULL AS no_account
        INTO bad
        FROM new_entries n
        LEFT JOIN transactions t ON t.id = n.transaction_id AND t.tenant_id = n.tenant_id
        LEFT JOIN accounts a ON a.id = n.account_id AND a.tenant_id = n.tenant_id AND a.currency = n.currency
        WHERE t.id IS NULL OR a.id IS NULL OR t.txid <> pg_current_xact_id() OR n.posted_at <> t.posted_at
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'entry of transaction % on account % refused: %', bad.transaction_id, bad.account_id,
                CASE WHEN bad.no_transaction THEN 'no such transaction in this tenant'
                     WHEN bad.no_account THEN 'no such account in this tenant and currency'
                     ELSE 'the transaction was posted by another database transaction' END
                USING ERRCODE = 'check_violation', CONSTRAINT = 'entries_belong';
        END IF;
        RETURN NULL;
    END $$
    """,
    "CREATE TRIGGER entries_guard_insert AFTER INSERT ON entries REFERENCING NEW TABLE AS new_entries "
    "FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_new_entries()",
    # ── holds ──────────────────────────────────────────────────────────────────────
    f"""
    CREATE TABLE holds (
        id                      uuid        PRIMARY KEY,
        tenant_id               text        NOT NULL,
        debit_account_id        uuid        NOT NULL REFERENCES accounts (id),
        credit_account_id       uuid        NOT NULL REFERENCES accounts (id),
        currency                text        NOT NULL,
        amount                  bigint      NOT NULL CHECK (amount > 0 AND amount <= {MAX_AMOUNT}),
        amount_posted           bigint      NOT NULL DEFAULT 0,
        status                  text        NOT NULL CHECK (status IN ('pending', 'posted', 'voided', 'expired')),
        payment_id              text        CHECK (length(payment_id) BETWEEN 1 AND 128),
        description             text        CHECK (length(description) <= 1000),
        expires_at              timestamptz,
        placed_transaction_id   uuid        NOT NULL REFERENCES transactions (id),
        resolved_transaction_id uuid        REFERENCES transactions (id),
        void_reason             text        CHECK (length(void_reason) <= 200),
        created_at              timestamptz NOT NULL,
        resolved_at             timestamptz,
        CHECK (debit_account_id <> credit_account_id),
        CHECK ((status = 'pending') = (resolved_transaction_id IS NULL)),
        CHECK ((status = 'pending') = (resolved_at IS NULL)),
        CHECK (CASE WHEN status = 'posted' THEN amount_posted BETWEEN 1 AND amount ELSE amount_posted = 0 END)
    ) WITH (fillfactor = 80)  -- each hold is updated once, when resolved
    """,
    "CREATE UNIQUE INDEX holds_payment ON holds (tenant_id, payment_id) WHERE payment_id IS NOT NULL",
    "CREATE INDEX holds_by_tenant ON holds (tenant_id, id)",
    "CREATE INDEX holds_expiring ON holds (expires_at) WHERE status = 'pending' AND expires_at IS NOT NULL",
    # A hold is resolved once: only a pending hold changes, and only its resolution fields.
    """
    CREATE FUNCTION holds_resolve_once() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'UPDATE' THEN
            RAISE EXCEPTION 'holds are never deleted' USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF OLD.status <> 'pending' THEN
            RAISE EXCEPTION 'hold % is already %', OLD.id, OLD.status USING ERRCODE = 'check_violation';
        END IF;
        IF (NEW.id, NEW.tenant_id, NEW.debit_account_id, NEW.credit_account_id, NEW.currency, NEW.amount,
            NEW.payment_id, NEW.description, NEW.expires_at, NEW.placed_transaction_id, NEW.created_at)
           IS DISTINCT FROM
           (OLD.id, OLD.tenant_id, OLD.debit_account_id, OLD.credit_account_id, OLD.currency, OLD.amount,
            OLD.payment_id, OLD.description, OLD.expires_at, OLD.placed_transaction_id, OLD.created_at) THEN
            RAISE EXCEPTION 'hold %: only its resolution may change', OLD.id USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END $$
    """,
    "CREATE TRIGGER holds_resolve_once BEFORE UPDATE OR DELETE ON holds "
    "FOR EACH ROW EXECUTE FUNCTION holds_resolve_once()",
    "CREATE TRIGGER holds_no_truncate BEFORE TRUNCATE ON holds "
    "FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only()",
    # ── one decision per payment ───────────────────────────────────────────────────
    """
    CREATE TABLE payment_reservations (
        tenant_id  text        NOT NULL,
        payment_id text        NOT NULL CHECK (length(payment_id) BETWEEN 1 AND 128),
        outcome    text        NOT NULL CHECK (outcome IN ('placed', 'rejected', 'skipped')),
        hold_id    uuid        REFERENCES holds (id),
        reason     text        CHECK (length(reason) <= 200),
        event_id   uuid        NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (tenant_id, payment_id),
        CHECK ((outcome = 'placed') = (hold_id IS NOT NULL))
    )
    """,
    *[
        f"CREATE TRIGGER payment_reservations_{name} BEFORE {op_} ON payment_reservations "
        f"FOR EACH {each} EXECUTE FUNCTION ledger_append_only()"
        for name, op_, each in (("append_only", "UPDATE OR DELETE", "ROW"), ("no_truncate", "TRUNCATE", "STATEMENT"))
    ],
]


def upgrade() -> None:
    for statement in DDL:
        op.execute(statement)
    role = app_role()
    if role:
        for table in ("accounts", "balances", "transactions", "entries", "holds", "payment_reservations"):
            op.execute(f'REVOKE ALL ON {table} FROM "{role}"')
    # The journal and the immutable facts: read and append, nothing else.
    for table in ("accounts", "transactions", "entries", "payment_reservations"):
        grant("SELECT, INSERT", table)
    # Projections move under row locks; rows are never deleted.
    grant("SELECT, INSERT, UPDATE", "balances")
    grant("SELECT, INSERT, UPDATE", "holds")
