//! Helpers for tests, here and in crates built on the ledger, that run against the real
//! PostgreSQL server named by `TOKENOMY_TEST_POSTGRES_URL` (started by `scripts/test.sh`).

/// The stores a test should run against: `None` for SQLite, then `Some(url)` for PostgreSQL
/// when `TOKENOMY_TEST_POSTGRES_URL` is set (otherwise it says SKIP on stderr).
pub fn stores() -> Vec<Option<String>> {
    let mut v = vec![None];
    match std::env::var("TOKENOMY_TEST_POSTGRES_URL") {
        Ok(u) => v.push(Some(u)),
        Err(_) => eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set"),
    }
    v
}

/// Drops and recreates database `name` on the server at `url`; returns the new database's URL.
pub async fn fresh_database(url: &str, name: &str) -> String {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to the test server");
    tokio::spawn(conn);
    // FORCE ends the database's sessions, but not an autovacuum worker's (the server's own
    // role), which a large run just before may have started: wait for it to end.
    for attempt in 0.. {
        match client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await {
            Ok(()) => break,
            Err(e) if attempt < 100 && e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("drop the test database: {e}"),
        }
    }
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create the test database");
    format!("{}/{name}", url.rsplit_once('/').expect("a URL with a database").0)
}

/// Takes database `name` on the server at `url` away for `away`: it refuses new connections
/// and every open one is cut, as when it restarts. Returns once it is away, with the task
/// that brings it back (await it to know it is).
pub async fn database_away(url: &str, name: &str, away: std::time::Duration) -> tokio::task::JoinHandle<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to the test server");
    tokio::spawn(conn);
    client.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).await.expect("refuse connections");
    // A connection that was being opened as connections stopped being allowed may show up in
    // `pg_stat_activity` only after a first sweep: sweep until three in a row find none.
    let mut quiet = 0;
    while quiet < 3 {
        let cut = client
            .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", &[&name])
            .await
            .expect("cut the database's connections");
        quiet = if cut == 0 { quiet + 1 } else { 0 };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let allow = format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true");
    tokio::spawn(async move {
        tokio::time::sleep(away).await;
        client.batch_execute(&allow).await.expect("accept connections again");
    })
}

/// Lets database `name` accept connections again (ends a [`database_away`] early, or one whose
/// runtime was shut down before it ended).
pub async fn database_back(url: &str, name: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to the test server");
    tokio::spawn(conn);
    client.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await.expect("accept connections again");
}

/// An exclusive lock on a table, held in an open transaction: every query that touches the
/// table waits, as on a server that hangs instead of refusing. Released by [`Self::release`].
pub struct TableLock(tokio_postgres::Client);

impl TableLock {
    /// Locks `table` of the database at `url` (its public schema).
    pub async fn take(url: &str, table: &str) -> TableLock {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to the test server");
        tokio::spawn(conn);
        client.batch_execute(&format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")).await.expect("lock the table");
        TableLock(client)
    }

    pub async fn release(self) {
        self.0.batch_execute("COMMIT").await.expect("release the lock");
    }
}

/// Takes the receipts log of the database at `url` back to its first `size` entries, as a
/// restore from an older backup (or a failover to a replica that lost commits) leaves it.
pub async fn rewind_log(url: &str, size: u64) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to the test server");
    tokio::spawn(conn);
    let size = i64::try_from(size).expect("a log size");
    client
        .batch_execute(&format!(
            "BEGIN; ALTER TABLE log_entries DISABLE TRIGGER log_entries_no_change; \
             DELETE FROM receipt_signatures WHERE log_index >= {size}; DELETE FROM node_checkpoints WHERE size > {size}; \
             DELETE FROM log_entries WHERE log_index >= {size}; UPDATE log_head SET next_index = {size}; \
             ALTER TABLE log_entries ENABLE TRIGGER log_entries_no_change; COMMIT"
        ))
        .await
        .expect("rewind the log");
}
