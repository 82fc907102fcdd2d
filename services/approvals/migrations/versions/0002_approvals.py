"""Policies (a header per tenant and subject type, append-only versions), approval
requests and their decisions, with the database guarding what the code promises:

- a request starts pending (or granted when its rule needs no approval), its outcome is
  final, and what it was opened with never changes;
- a request is granted only with the required number of distinct non-maker approvals;
- the maker never decides, one principal decides once, decisions are never edited.

The runtime role gets no DELETE anywhere and no UPDATE on decisions or policy versions.
"""

from alembic import op

from shared.migrate import grant

revision = "approvals_0002"
down_revision = "approvals_0001"

DDL = [
    """
    CREATE TABLE approval_policies (
        id              uuid    PRIMARY KEY,
        tenant_id       text    NOT NULL,
        subject_type    text    NOT NULL CHECK (subject_type ~ '^[a-z][a-z0-9_]{0,62}$'),
        -- 0 only inside the transaction that publishes version 1 (the header is locked
        -- before the first version exists); committed headers always name a version.
        current_version integer NOT NULL CHECK (current_version >= 0),
        UNIQUE (tenant_id, subject_type)
    )
    """,
    """
    CREATE TABLE approval_policy_versions (
        policy_id              uuid        NOT NULL REFERENCES approval_policies (id),
        version                integer     NOT NULL CHECK (version > 0),
        tenant_id              text        NOT NULL,
        subject_type           text        NOT NULL,
        rules                  jsonb       NOT NULL CHECK (jsonb_typeof(rules) = 'array' AND jsonb_array_length(rules) > 0),
        expire_after_seconds   integer     CHECK (expire_after_seconds > 0),
        escalate_after_seconds integer     CHECK (escalate_after_seconds > 0),
        created_by             text        NOT NULL,
        reason                 text        NOT NULL,
        created_at             timestamptz NOT NULL,
        PRIMARY KEY (policy_id, version)
    )
    """,
    """
    CREATE TABLE approval_requests (
        id                  uuid        PRIMARY KEY,
        tenant_id           text        NOT NULL,
        subject_type        text        NOT NULL CHECK (subject_type ~ '^[a-z][a-z0-9_]{0,62}$'),
        subject_id          text        NOT NULL CHECK (length(subject_id) BETWEEN 1 AND 128),
        amount              bigint      CHECK (amount > 0),
        currency            text        CHECK (currency ~ '^[A-Z]{3}$'),
        metadata            jsonb       NOT NULL DEFAULT '{}',
        maker               text        NOT NULL,
        requested_by        text        NOT NULL,
        policy_id           uuid        NOT NULL,
        policy_version      integer     NOT NULL CHECK (policy_version >= 0),
        rule                text        NOT NULL,
        required_approvals  integer     NOT NULL CHECK (required_approvals BETWEEN 0 AND 10),
        approver_scopes     text[]      NOT NULL DEFAULT '{}',
        approver_principals text[]      NOT NULL DEFAULT '{}',
        status              text        NOT NULL CHECK (status IN ('pending', 'granted', 'rejected', 'expired')),
        created_at          timestamptz NOT NULL,
        expires_at          timestamptz,
        escalate_at         timestamptz,
        escalated_at        timestamptz,
        resolved_at         timestamptz,
        correlation_id      text,
        -- One request per subject: a second payment.created for the same payment (another
        -- event id) finds this row instead of opening a second request.
        UNIQUE (tenant_id, subject_type, subject_id),
        CHECK ((amount IS NULL) = (currency IS NULL)),
        CHECK ((status = 'pending') = (resolved_at IS NULL)),
        CHECK (status <> 'pending' OR expires_at IS NOT NULL)
    )
    """,
    # Listing: newest first per tenant, optionally by status; the jobs: overdue pending ones.
    "CREATE INDEX approval_requests_listing ON approval_requests (tenant_id, created_at DESC, id DESC)",
    "CREATE INDEX approval_requests_by_status ON approval_requests (tenant_id, status, created_at DESC, id DESC)",
    "CREATE INDEX approval_requests_due ON approval_requests (expires_at) WHERE status = 'pending'",
    "CREATE INDEX approval_requests_escalation_due ON approval_requests (escalate_at) "
    "WHERE status = 'pending' AND escalated_at IS NULL",
    """
    CREATE TABLE approval_decisions (
        id             uuid        PRIMARY KEY,
        request_id     uuid        NOT NULL REFERENCES approval_requests (id),
        tenant_id      text        NOT NULL,
        principal      text        NOT NULL,
        decision       text        NOT NULL CHECK (decision IN ('approve', 'reject')),
        reason         text,
        correlation_id text,
        decided_at     timestamptz NOT NULL,
        -- One principal counts once.
        UNIQUE (request_id, principal),
        CHECK (decision = 'approve' OR reason IS NOT NULL)
    )
    """,
    # ── the guards: backstops for the domain's rules, whoever writes ──────────────────
    """
    CREATE FUNCTION approval_requests_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        approvals integer;
        rejections integer;
    BEGIN
        IF TG_OP = 'DELETE' THEN
            RAISE EXCEPTION 'approval requests are never deleted' USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF TG_OP = 'INSERT' THEN
            IF NEW.status = 'pending' OR (NEW.status = 'granted' AND NEW.required_approvals = 0) THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION 'a request opens pending, or granted when its rule needs no approval'
                USING ERRCODE = 'check_violation';
        END IF;
        IF (NEW.id, NEW.tenant_id, NEW.subject_type, NEW.subject_id, NEW.amount, NEW.currency, NEW.metadata,
            NEW.maker, NEW.requested_by, NEW.policy_id, NEW.policy_version, NEW.rule, NEW.required_approvals,
            NEW.approver_scopes, NEW.approver_principals, NEW.created_at, NEW.expires_at, NEW.escalate_at,
            NEW.correlation_id)
           IS DISTINCT FROM
           (OLD.id, OLD.tenant_id, OLD.subject_type, OLD.subject_id, OLD.amount, OLD.currency, OLD.metadata,
            OLD.maker, OLD.requested_by, OLD.policy_id, OLD.policy_version, OLD.rule, OLD.required_approvals,
            OLD.approver_scopes, OLD.approver_principals, OLD.created_at, OLD.expires_at, OLD.escalate_at,
            OLD.correlation_id)
        THEN
            RAISE EXCEPTION 'what a request was opened with never changes' USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF OLD.status <> 'pending' AND (NEW.status, NEW.resolved_at, NEW.escalated_at)
                                       IS DISTINCT FROM (OLD.status, OLD.resolved_at, OLD.escalated_at) THEN
            RAISE EXCEPTION 'the outcome of a request is final' USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.status = 'granted' AND OLD.status = 'pending' THEN
            SELECT count(*) INTO approvals FROM approval_decisions d
            WHERE d.request_id = NEW.id AND d.decision = 'approve'
              AND d.principal <> NEW.maker AND d.principal <> NEW.requested_by;
            IF approvals < NEW.required_approvals THEN
                RAISE EXCEPTION 'granted with % of % required approvals', approvals, NEW.required_approvals
                    USING ERRCODE = 'check_violation';
            END IF;
        END IF;
        IF NEW.status = 'rejected' AND OLD.status = 'pending' THEN
            SELECT count(*) INTO rejections FROM approval_decisions d
            WHERE d.request_id = NEW.id AND d.decision = 'reject';
            IF rejections = 0 THEN
                RAISE EXCEPTION 'rejected without a rejection' USING ERRCODE = 'check_violation';
            END IF;
        END IF;
        RETURN NEW;
    END $$
    """,
    "CREATE TRIGGER approval_requests_guard BEFORE INSERT OR UPDATE OR DELETE ON approval_requests "
    "FOR EACH ROW EXECUTE FUNCTION approval_requests_guard()",
    """
    CREATE FUNCTION approval_decisions_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        request approval_requests%ROWTYPE;
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            RAISE EXCEPTION 'decisions are never edited or deleted' USING ERRCODE = 'insufficient_privilege';
        END IF;
        SELECT * INTO request FROM approval_requests WHERE id = NEW.request_id;
        IF request.tenant_id <> NEW.tenant_id THEN
            RAISE EXCEPTION 'a decision belongs to its request''s tenant' USING ERRCODE = 'check_violation';
        END IF;
        IF request.status <> 'pending' THEN
            RAISE EXCEPTION 'a request that is % takes no decisions', request.status USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.principal = request.maker OR NEW.principal = request.requested_by THEN
            RAISE EXCEPTION 'the maker never decides' USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END $$
    """,
    "CREATE TRIGGER approval_decisions_guard BEFORE INSERT OR UPDATE OR DELETE ON approval_decisions "
    "FOR EACH ROW EXECUTE FUNCTION approval_decisions_guard()",
    """
    CREATE FUNCTION approval_policy_versions_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'policy versions are never edited or deleted' USING ERRCODE = 'insufficient_privilege';
    END $$
    """,
    "CREATE TRIGGER approval_policy_versions_guard BEFORE UPDATE OR DELETE ON approval_policy_versions "
    "FOR EACH ROW EXECUTE FUNCTION approval_policy_versions_guard()",
]


def upgrade() -> None:
    for statement in DDL:
        op.execute(statement)
    grant("SELECT, INSERT", "approval_policies")
    grant("UPDATE (current_version)", "approval_policies")
    grant("SELECT, INSERT", "approval_policy_versions")
    grant("SELECT, INSERT", "approval_requests")
    grant("UPDATE (status, resolved_at, escalated_at)", "approval_requests")
    grant("SELECT, INSERT", "approval_decisions")

