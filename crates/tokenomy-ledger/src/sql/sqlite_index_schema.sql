-- tokenomy-ledger SQLite index file (`<ledger>-index.<ext>`, next to the ledger file), schema of
-- version 6. Derived data: every row is rebuilt from the ledger's `transfers` when this file is
-- missing or does not match it (`sqlite_index.rs`). Idempotent: runs on every open.
--
-- Every transfer with seq <= index_head.indexed_upto has its idempotency key in
-- `transfer_keys`, its id in `transfer_ids` and both its accounts in `account_transfers`; the ledger's writer keeps the
-- newer ones in memory, and statements read them from `transfers` by seq. `key_at_head` is the
-- idempotency key of the transfer at `indexed_upto`: if the ledger no longer has that transfer
-- (a power loss took back its last commits), the file is rebuilt.
CREATE TABLE IF NOT EXISTS transfer_keys (
    idempotency_key TEXT    PRIMARY KEY,
    seq             INTEGER NOT NULL
) WITHOUT ROWID;
-- version 6: the transfers' ids (the ledger's `transfers.id` has no index of its own since then).
CREATE TABLE IF NOT EXISTS transfer_ids (
    id  BLOB    PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS account_transfers (  -- one row per side (debit and credit)
    account BLOB    NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (account, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS index_head (
    indexed_upto INTEGER NOT NULL CHECK (indexed_upto >= 0),
    key_at_head  TEXT
);
INSERT INTO index_head (indexed_upto, key_at_head) SELECT 0, NULL WHERE NOT EXISTS (SELECT 1 FROM index_head);
