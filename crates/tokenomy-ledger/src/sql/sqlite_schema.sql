-- tokenomy-ledger SQLite schema, version 6. Idempotent: runs on every open
-- (older files are brought to version 6 by `migrate` in sqlite.rs).
-- Ids are 16-byte big-endian u128 blobs. Money is INTEGER micro-credits.
-- kind: 0 User, 1 Agent, 2 OperatorRevenue, 3 Treasury.
-- code: 0 Mint, 1 UsageCharge, 2 Transfer, 3 Refund. state: 0 Pending, 1 Posted, 2 Voided.
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM schema_version);

CREATE TABLE IF NOT EXISTS accounts (
    id              BLOB    PRIMARY KEY CHECK (length(id) = 16),
    name            TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    kind            INTEGER NOT NULL CHECK (kind BETWEEN 0 AND 3),
    balance_micros  INTEGER NOT NULL,
    pending_micros  INTEGER NOT NULL CHECK (pending_micros >= 0),
    created_at_ms   INTEGER NOT NULL,
    CHECK (kind NOT IN (0, 1) OR balance_micros - pending_micros >= 0),
    CHECK (kind <> 2 OR (balance_micros >= 0 AND pending_micros = 0)),
    CHECK (kind <> 3 OR pending_micros = 0)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS transfers (
    seq             INTEGER PRIMARY KEY,          -- statement cursor
    id              BLOB    NOT NULL CHECK (length(id) = 16),  -- unique: see transfer_ids (version 6)
    idempotency_key TEXT    NOT NULL,             -- unique: see transfer_keys
    debit_account   BLOB    NOT NULL,
    credit_account  BLOB    NOT NULL,
    amount_micros   INTEGER NOT NULL CHECK (amount_micros > 0),
    code            INTEGER NOT NULL,
    state           INTEGER NOT NULL,
    hold            INTEGER NOT NULL,
    timeout_ms      INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    pending_id      BLOB,
    key_id          BLOB,                         -- hold_for_key: whose spend caps it counts against
    log_index       INTEGER,                      -- version 5: its log entry, if it has one
    CHECK (debit_account <> credit_account)
);
CREATE INDEX IF NOT EXISTS transfers_pending ON transfers (expires_at_ms) WHERE hold = 1 AND state = 0;
-- At most one settlement per hold: a settlement's idempotency key is derived from its hold's id
-- (`settle_key`), and keys are unique. (Up to version 4 an index on `pending_id` said so too;
-- the writer's commit path no longer fills it, and `check` proves both rules without it.)

-- The idempotency keys and the per-account statement entries (indexes whose insertion points
-- are spread over the whole key space) are not in this file: since version 4 they live in the
-- index file next to it (`sqlite_index_schema.sql`), filled in bulk on a thread of their own;
-- since version 6 so do the transfers' ids.

-- One entry per receipted posting: the transfer names its entry (`transfers.log_index`) and
-- the entry its transfer, and `check` proves the two agree (up to version 4 `transfer_id` was
-- UNIQUE, an index filled on the commit path).
CREATE TABLE IF NOT EXISTS log_entries (
    log_index   INTEGER PRIMARY KEY CHECK (log_index >= 0),
    transfer_id BLOB    NOT NULL,
    account_id  BLOB    NOT NULL,
    leaf_bytes  BLOB    NOT NULL
);
CREATE TRIGGER IF NOT EXISTS log_entries_no_update BEFORE UPDATE ON log_entries
BEGIN SELECT RAISE(ABORT, 'log_entries is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log_entries_no_delete BEFORE DELETE ON log_entries
BEGIN SELECT RAISE(ABORT, 'log_entries is append-only'); END;

CREATE TABLE IF NOT EXISTS api_keys (
    id                   BLOB    PRIMARY KEY,
    account_id           BLOB    NOT NULL,
    key_hash             BLOB    NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    scopes               TEXT    NOT NULL,
    rpm                  INTEGER,
    tpm                  INTEGER,
    spend_cap_day_micros INTEGER,
    created_at_ms        INTEGER NOT NULL,
    revoked_at_ms        INTEGER,
    -- version 2: monthly cap and the maintained spend counters (KeySpend)
    spend_cap_month_micros INTEGER,
    pending_micros       INTEGER NOT NULL DEFAULT 0 CHECK (pending_micros >= 0),
    spend_day            INTEGER NOT NULL DEFAULT 0,
    spend_day_micros     INTEGER NOT NULL DEFAULT 0,
    spend_month          INTEGER NOT NULL DEFAULT 0,
    spend_month_micros   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS api_keys_account ON api_keys (account_id);
