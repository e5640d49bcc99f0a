-- tokenomy-ledger PostgreSQL schema, version 3 (older tables get the new columns and rows). Idempotent: runs on every open
-- (under an advisory lock), in the schema named by search_path.
-- Ids are 16-byte big-endian u128 BYTEA. Money is BIGINT micro-credits.
-- kind: 0 User, 1 Agent, 2 OperatorRevenue, 3 Treasury.
-- code: 0 Mint, 1 UsageCharge, 2 Transfer, 3 Refund. state: 0 Pending, 1 Posted, 2 Voided.
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM schema_version);

CREATE TABLE IF NOT EXISTS accounts (
    id              BYTEA    PRIMARY KEY CHECK (length(id) = 16),
    name            TEXT     NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    kind            SMALLINT NOT NULL CHECK (kind BETWEEN 0 AND 3),
    balance_micros  BIGINT   NOT NULL,
    pending_micros  BIGINT   NOT NULL CHECK (pending_micros >= 0),
    created_at_ms   BIGINT   NOT NULL,
    CHECK (kind NOT IN (0, 1) OR balance_micros - pending_micros >= 0),
    CHECK (kind <> 2 OR (balance_micros >= 0 AND pending_micros = 0)),
    CHECK (kind <> 3 OR pending_micros = 0)
);

CREATE TABLE IF NOT EXISTS transfers (
    seq             BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- statement cursor
    id              BYTEA    NOT NULL UNIQUE CHECK (length(id) = 16),
    idempotency_key TEXT     NOT NULL UNIQUE,
    debit_account   BYTEA    NOT NULL,
    credit_account  BYTEA    NOT NULL,
    amount_micros   BIGINT   NOT NULL CHECK (amount_micros > 0),
    code            SMALLINT NOT NULL,
    state           SMALLINT NOT NULL,
    hold            BOOLEAN  NOT NULL,
    timeout_ms      BIGINT   NOT NULL,
    expires_at_ms   BIGINT   NOT NULL,
    created_at_ms   BIGINT   NOT NULL,
    pending_id      BYTEA,
    CHECK (debit_account <> credit_account)
);
-- version 2
ALTER TABLE transfers ADD COLUMN IF NOT EXISTS key_id BYTEA;  -- hold_for_key: whose spend caps it counts against
CREATE INDEX IF NOT EXISTS transfers_debit ON transfers (debit_account, seq);
CREATE INDEX IF NOT EXISTS transfers_credit ON transfers (credit_account, seq);

CREATE TABLE IF NOT EXISTS log_head (
    id         SMALLINT PRIMARY KEY CHECK (id = 1),
    next_index BIGINT   NOT NULL CHECK (next_index >= 0)
);
INSERT INTO log_head (id, next_index) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS log_entries (
    log_index   BIGINT PRIMARY KEY CHECK (log_index >= 0),
    transfer_id BYTEA  NOT NULL UNIQUE,
    account_id  BYTEA  NOT NULL,
    leaf_bytes  BYTEA  NOT NULL
);
CREATE OR REPLACE FUNCTION log_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'log_entries is append-only'; END $$;
DROP TRIGGER IF EXISTS log_entries_no_change ON log_entries;
CREATE TRIGGER log_entries_no_change BEFORE UPDATE OR DELETE ON log_entries
    FOR EACH ROW EXECUTE FUNCTION log_entries_append_only();

CREATE TABLE IF NOT EXISTS api_keys (
    id                   BYTEA  PRIMARY KEY,
    account_id           BYTEA  NOT NULL,
    key_hash             BYTEA  NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    scopes               TEXT   NOT NULL,
    rpm                  BIGINT,
    tpm                  BIGINT,
    spend_cap_day_micros BIGINT,
    created_at_ms        BIGINT NOT NULL,
    revoked_at_ms        BIGINT
);
-- version 2: monthly cap and the maintained spend counters (KeySpend)
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS spend_cap_month_micros BIGINT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS pending_micros BIGINT NOT NULL DEFAULT 0 CHECK (pending_micros >= 0);
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS spend_day BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS spend_day_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS spend_month BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS spend_month_micros BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS api_keys_account ON api_keys (account_id);
UPDATE schema_version SET version = 2 WHERE version < 2;

-- version 3: the pending holds are listed in their own table (the expiry sweep's index), no
-- longer by a partial index on `transfers`: settling a hold then changes no indexed column of
-- its row, so the UPDATE is a HOT update (no new entry in any of the six indices), given room
-- on the page (fillfactor). Maintained with every hold, settlement, void and extension;
-- `ledger/check` compares it with the transfers.
CREATE TABLE IF NOT EXISTS pending_holds (
    id            BYTEA  PRIMARY KEY CHECK (length(id) = 16),
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_holds_expiry ON pending_holds (expires_at_ms);
DO $$ BEGIN
    IF (SELECT version FROM schema_version) < 3 THEN
        INSERT INTO pending_holds (id, expires_at_ms)
            SELECT id, expires_at_ms FROM transfers WHERE hold AND state = 0 ON CONFLICT (id) DO NOTHING;
        DROP INDEX IF EXISTS transfers_pending;
        ALTER TABLE transfers SET (fillfactor = 75);
    END IF;
END $$;
UPDATE schema_version SET version = 3 WHERE version < 3;

-- version 4: the rate-limit clocks of keys with rpm/tpm limits (KeyRate), one row per key,
-- stepped by every node of the ledger under the row's lock: a key's limits hold across nodes.
CREATE TABLE IF NOT EXISTS key_rates (
    key_id          BYTEA  PRIMARY KEY CHECK (length(key_id) = 16),
    requests_tat_us BIGINT NOT NULL,
    tokens_tat_us   BIGINT NOT NULL
);
-- Also: the node keys that sign for this ledger, one per origin name, so that two nodes
-- started with one --origin (a deployment template shared by replicas) are told at start: a
-- log name must name one key, or receipts and checkpoints of one node verify against neither.
CREATE TABLE IF NOT EXISTS node_origins (
    origin        TEXT   PRIMARY KEY,
    verifier_key  TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL
);
UPDATE schema_version SET version = 4 WHERE version < 4;

-- version 5: the limits each key's clocks were last stepped under (KeyRate's rpm and tpm), so
-- a limit an admin changes applies at once (0: not known yet).
ALTER TABLE key_rates ADD COLUMN IF NOT EXISTS rpm BIGINT NOT NULL DEFAULT 0;
ALTER TABLE key_rates ADD COLUMN IF NOT EXISTS tpm BIGINT NOT NULL DEFAULT 0;
UPDATE schema_version SET version = 5 WHERE version < 5;

-- version 6: responses kept for OpenAI's Responses API (`store`), so that any node of the
-- ledger continues a conversation (`previous_response_id`) another node answered. Soft state,
-- bounded by the node (oldest first out); `doc` is the API layer's own encoding. owner: the
-- account's 16-byte id, or empty for a node without accounts.
CREATE TABLE IF NOT EXISTS kept_responses (
    id     TEXT   PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 256),
    owner  BYTEA  NOT NULL CHECK (length(owner) IN (0, 16)),
    seq    BIGINT GENERATED ALWAYS AS IDENTITY,
    bytes  BIGINT NOT NULL CHECK (bytes >= 0),
    doc    BYTEA  NOT NULL
);
CREATE INDEX IF NOT EXISTS kept_responses_owner_seq ON kept_responses (owner, seq);
CREATE INDEX IF NOT EXISTS kept_responses_seq ON kept_responses (seq);
UPDATE schema_version SET version = 6 WHERE version < 6;

-- version 7: what each node published so that every node of the ledger can serve its receipts:
-- its signature over each receipt it issued (the log entry's canonical bytes), and its latest
-- signed checkpoint, written only after the signatures of every receipt of its own that the
-- checkpoint covers. Any node can then hand out a receipt another node issued, with that
-- node's signature and an inclusion proof against that node's checkpoint, verifiable with
-- that node's key alone. Signatures are deterministic (Ed25519), so writing one twice is
-- harmless; a checkpoint row only grows.
CREATE TABLE IF NOT EXISTS receipt_signatures (
    log_index BIGINT PRIMARY KEY REFERENCES log_entries (log_index),
    signature BYTEA  NOT NULL CHECK (length(signature) = 64)
);
CREATE TABLE IF NOT EXISTS node_checkpoints (
    origin        TEXT   PRIMARY KEY REFERENCES node_origins (origin),
    size          BIGINT NOT NULL CHECK (size >= 0),
    note          TEXT   NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
UPDATE schema_version SET version = 7 WHERE version < 7;
