//! Batched holds and settlements for [`PgStore`](super::PgStore).
//!
//! `hold` and `settle` are the charging hot path. Run one transaction each,
//! every settlement updates the operator-revenue row and `log_head`, so they
//! all queue on those two row locks for a commit (an fsync) each. Instead,
//! calls are queued to [`BATCHERS`] tasks; each takes every queued job (up to
//! [`MAX_PG_BATCH`]; while another batch is in flight, it first waits briefly
//! for as many jobs as that one has: [`take_batch`]) and runs them in ONE
//! transaction with a fixed number of round trips, whatever the batch size:
//!
//! 1. lock the settled holds (`FOR UPDATE`, ascending id);
//! 2. read the idempotency keys the batch may replay, and the system accounts
//!    (read, not locked: changed only by atomic deltas);
//! 3. lock the customer accounts (`FOR UPDATE`, ascending id): those the new
//!    holds name and those of the settled holds (read from the rows just locked);
//!
//!    1–3 (and the transaction's planner settings) are pipelined: one round trip;
//! 4. apply the domain rules to every job **in memory, in queue order**
//!    ([`plan`]): a job that fails (insufficient funds, conflict, expired…)
//!    changes nothing and the next job sees the state without it, exactly as
//!    if the jobs had run one by one;
//! 5. write the customers' side with set-based statements (`unnest` arrays),
//!    pipelined: the new transfers (and the new holds in `pending_holds`), the
//!    holds' new states (and their rows out of `pending_holds`), one delta per
//!    customer account; and last in the same round trip, when some settlement
//!    appends a leaf, lock `log_head`;
//! 6. under that lock, number the leaves `head, head+1, …` in queue order, append
//!    them, move `log_head`, apply one delta per system account (one round trip);
//!    then COMMIT, and only then reply.
//!
//! So a batch costs five round trips whatever its size (BEGIN, reads and locks,
//! writes, log and system accounts, COMMIT; one more when a settlement is retried
//! after its commit). `log_head` and the operator-revenue row are what every
//! receipted settlement needs, so batches queue on them: they are locked last, and
//! the batch's other writes run while an earlier batch still holds them (measured:
//! 1.3–1.4× settled charges/s against locking `log_head` with the reads; with it
//! locked early, the second batch task sat idle until the first one's COMMIT). A
//! leaf closure that fails fails the whole batch: its leaf bytes are only known
//! under the lock, after the writes went out.
//!
//! The lock order (holds → customer accounts → `log_head` → system accounts)
//! is the one the per-operation path uses, so batches and single operations
//! (or other nodes) cannot deadlock on each other. If anything in the batch
//! fails at the database level (a unique violation from another node's
//! concurrent insert, a deadlock, a lost connection, even an unknown COMMIT
//! outcome), the batch is rolled back and each job is re-run alone through
//! the per-operation path, which retries; both operations are idempotent
//! (hold by key, settle by hold), so a re-run after a COMMIT that did succeed
//! returns the original result.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::*;

/// Concurrent batch tasks (each with its own connection while it runs). Two: while one
/// batch holds `log_head` through its COMMIT's WAL flush, the other writes its transfers
/// (measured on 2 cores with the server on the same machine, since `log_head` is locked
/// last: 1 task 0.6–0.9× of 2, 3 tasks 0.8×, 4 tasks 0.6×, smaller batches each paying the
/// fixed cost of a transaction; a larger server may want more).
pub const BATCHERS: usize = 2;
/// Most jobs in one batch transaction.
pub const MAX_PG_BATCH: usize = 512;
/// Longest a batch waits to grow as large as the batch in flight (see [`take_batch`]).
/// Measured with 64 writers: 1 ms and 2 ms alike in throughput, 2 ms steadier.
pub const BATCH_WAIT_MAX: Duration = Duration::from_millis(2);
/// Depth of the batch queue; senders wait (backpressure) when it is full.
pub const PG_CHANNEL_CAPACITY: usize = 8192;

pub(super) enum Op {
    Hold { req: TransferRequest, now: i64 },
    Settle { hold_id: TransferId, amount: i64, now: i64, leaf: Option<Leaf> },
}

pub(super) enum Reply {
    Hold(oneshot::Sender<Result<Transfer>>),
    Settle(oneshot::Sender<Result<Settled>>),
}

pub(super) struct Job {
    pub op: Op,
    pub reply: Reply,
}

#[allow(clippy::large_enum_variant)]
enum Outcome {
    Hold(Result<Transfer>),
    /// A settlement; `log` is its position in the plan's log list (index assigned later),
    /// `replay_of` a posted transfer whose existing log index must be looked up.
    Settle { result: Result<Settled>, log: Option<usize>, replay_of: Option<TransferId> },
    /// Left out of the batch: run alone, through the per-operation path, after it commits
    /// (the settlement of a `hold_for_key` hold, which must update its key row).
    Alone,
}

/// Starts the batch tasks; they end when every sender (every `PgStore` clone) is dropped.
pub(super) fn spawn(pool: Pool) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>(PG_CHANNEL_CAPACITY);
    let rx = Arc::new(Mutex::new(rx));
    let in_flight = Arc::new(InFlight::default());
    for _ in 0..BATCHERS {
        let (rx, pool, in_flight) = (rx.clone(), pool.clone(), in_flight.clone());
        tokio::spawn(async move {
            loop {
                let batch = {
                    let mut rx = rx.lock().await;
                    match take_batch(&mut rx, &in_flight).await {
                        Some(batch) => batch,
                        None => return,
                    }
                };
                run(&pool, batch).await;
                in_flight.finish();
            }
        });
    }
    tx
}

/// The batches running now: how many, and the size of the last one started.
#[derive(Default)]
struct InFlight {
    batches: AtomicUsize,
    last_size: AtomicUsize,
}

impl InFlight {
    fn start(&self, size: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.last_size.store(size, Ordering::Relaxed);
    }
    fn finish(&self) {
        self.batches.fetch_sub(1, Ordering::Relaxed);
    }
    /// How many jobs a new batch should wait for: as many as the batch in flight, if any.
    fn target(&self) -> usize {
        match self.batches.load(Ordering::Relaxed) {
            0 => 0,
            _ => self.last_size.load(Ordering::Relaxed),
        }
    }
}

/// Takes every queued job (up to [`MAX_PG_BATCH`]); while another batch is in flight, waits
/// up to [`BATCH_WAIT_MAX`] until it has as many jobs as that one. `None`: every sender is gone.
///
/// Why wait: when a batch ends, its callers get their answers and send their next jobs a
/// few at a time. Taken as they come, they would make several small batches, each paying a
/// transaction's fixed cost and queueing for `log_head`; the batches then stay small. Waiting
/// for the in-flight batch's size keeps each batch whole: measured 1.2–1.5× settled charges/s
/// at 4 to 64 writers, and lower latency. Alone (nothing in flight) a job never waits.
async fn take_batch(rx: &mut mpsc::Receiver<Job>, in_flight: &InFlight) -> Option<Vec<Job>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + BATCH_WAIT_MAX;
    loop {
        while batch.len() < MAX_PG_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if batch.len() >= in_flight.target().min(MAX_PG_BATCH) {
            break;
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(job)) => batch.push(job),
            Ok(None) | Err(_) => break,
        }
    }
    in_flight.start(batch.len());
    Some(batch)
}

async fn run(pool: &Pool, batch: Vec<Job>) {
    let ops: Vec<&Op> = batch.iter().map(|j| &j.op).collect();
    let outcome = match pool.get().await {
        Ok(mut client) => match client.transaction().await {
            Ok(tx) => match execute_batch(&tx, &ops).await {
                Ok(results) => tx.commit().await.map(|_| results).map_err(pg_err),
                Err(e) => {
                    let _ = tx.rollback().await;
                    Err(e)
                }
            },
            Err(e) => Err(pg_err(e)),
        },
        Err(e) => Err(super::pool_err(e)),
    };
    match outcome {
        Ok(results) => {
            let mut alone = Vec::new();
            for (job, result) in batch.into_iter().zip(results) {
                match (job.reply, result) {
                    (Reply::Hold(tx), Outcome::Hold(r)) => drop(tx.send(r)),
                    (Reply::Settle(tx), Outcome::Settle { result, .. }) => drop(tx.send(result)),
                    (reply, Outcome::Alone) => alone.push(Job { op: job.op, reply }),
                    _ => unreachable!("outcome kind matches its job"),
                }
            }
            run_alone(pool, alone).await;
        }
        // Nothing of the batch is known to be committed: re-run each job alone
        // (idempotent), concurrently, through the per-operation path with retries.
        Err(_) => run_alone(pool, batch).await,
    }
}

/// Runs jobs one transaction each, concurrently, through the per-operation path.
async fn run_alone(pool: &Pool, jobs: Vec<Job>) {
    let store = PgStore { pool: pool.clone(), jobs: None, operation_timeout_ms: crate::any::PG_OPERATION_TIMEOUT_MS };
    let runs = jobs.into_iter().map(|job| {
        let store = store.clone();
        async move {
            match (job.op, job.reply) {
                (Op::Hold { req, now }, Reply::Hold(tx)) => {
                    let r = store.in_tx(|t| Box::pin(op_hold(t, req.clone(), now))).await;
                    let _ = tx.send(r);
                }
                (Op::Settle { hold_id, amount, now, leaf }, Reply::Settle(tx)) => {
                    let r = store.in_tx(|t| Box::pin(op_settle(t, hold_id, amount, now, leaf.clone()))).await;
                    let _ = tx.send(r);
                }
                _ => unreachable!("reply kind matches its job"),
            }
        }
    });
    let handles: Vec<_> = runs.map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}

/// Rows the batch read (and locked) before planning.
struct Loaded {
    holds: HashMap<TransferId, Transfer>,
    by_key: HashMap<String, Transfer>,
    accounts: HashMap<AccountId, Account>,
}

/// The in-memory result of applying the batch's jobs in order.
struct Plan {
    outcomes: Vec<Outcome>,
    accounts: HashMap<AccountId, Account>,
    new_transfers: Vec<Transfer>,
    states: Vec<(TransferId, TransferState)>,
    /// (posted transfer, leaf) in log order.
    log: Vec<(Transfer, Leaf)>,
}

/// The statements a batch pipelines, prepared (and cached on the connection) before any of
/// them is sent: `query`/`execute` prepare on first use, which is a round trip of its own
/// during which the statements after it would go out first, out of the lock order.
static LOCK_HOLDS_SQL: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {TRANSFER_COLS} FROM transfers WHERE id = ANY($1) ORDER BY id FOR UPDATE"));
static READ_KEYS_SQL: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {TRANSFER_COLS} FROM transfers WHERE idempotency_key = ANY($1)"));
/// (Worded apart from `load_accounts`' query: a separate prepared statement, planned under
/// the batch's settings.)
static READ_SYSTEM_SQL: LazyLock<String> = LazyLock::new(|| format!("SELECT {ACCOUNT_COLS} FROM accounts a WHERE a.id = ANY($1)"));
static LOCK_CUSTOMERS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {ACCOUNT_COLS} FROM accounts WHERE id IN (SELECT unnest($1::bytea[]) \
         UNION SELECT debit_account FROM transfers WHERE id = ANY($2) \
         UNION SELECT credit_account FROM transfers WHERE id = ANY($2)) \
         AND id <> ALL($3) ORDER BY id FOR UPDATE"
    )
});
const LOCK_HEAD_SQL: &str = "SELECT next_index FROM log_head WHERE id = 1 FOR UPDATE";
static INSERT_TRANSFERS_SQL: LazyLock<String> = LazyLock::new(|| {
    // WITH ORDINALITY + ORDER BY: `seq` (the statement cursor) follows queue order.
    format!(
        "INSERT INTO transfers ({TRANSFER_COLS}) \
         SELECT id, k, d, c, a, code, st, h, tm, ex, cr, p, kid FROM unnest($1::bytea[], $2::text[], $3::bytea[], \
         $4::bytea[], $5::int8[], $6::int2[], $7::int2[], $8::bool[], $9::int8[], $10::int8[], $11::int8[], \
         $12::bytea[], $13::bytea[]) WITH ORDINALITY AS u(id, k, d, c, a, code, st, h, tm, ex, cr, p, kid, ord) ORDER BY ord"
    )
});
const LIST_PENDING_SQL: &str = "INSERT INTO pending_holds (id, expires_at_ms) SELECT * FROM unnest($1::bytea[], $2::int8[])";
const UPDATE_STATES_SQL: &str = "UPDATE transfers t SET state = u.state FROM unnest($1::bytea[], $2::int2[]) AS u(id, state) \
                                 WHERE t.id = u.id";
const UNLIST_PENDING_SQL: &str = "DELETE FROM pending_holds WHERE id = ANY($1)";
const STORE_DELTAS_SQL: &str = "UPDATE accounts a SET balance_micros = a.balance_micros + d.db, pending_micros = a.pending_micros + d.dp \
     FROM unnest($1::bytea[], $2::int8[], $3::int8[]) AS d(id, db, dp) WHERE a.id = d.id \
     RETURNING a.id, a.name, a.kind, a.balance_micros, a.pending_micros, a.created_at_ms";
const APPEND_LOG_SQL: &str = "INSERT INTO log_entries (log_index, transfer_id, account_id, leaf_bytes) \
                              SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[], $4::bytea[])";
const SET_HEAD_SQL: &str = "UPDATE log_head SET next_index = $1 WHERE id = 1";
const LOOKUP_REPLAYS_SQL: &str = "SELECT transfer_id, log_index FROM log_entries WHERE transfer_id = ANY($1)";

/// Prepares every statement a batch pipelines (after the first batch on a connection, cache
/// hits: no round trip).
async fn prepare_all(tx: &Transaction<'_>) -> Result<()> {
    let sqls: [&str; 13] = [
        &LOCK_HOLDS_SQL,
        &READ_KEYS_SQL,
        &READ_SYSTEM_SQL,
        &LOCK_CUSTOMERS_SQL,
        LOCK_HEAD_SQL,
        &INSERT_TRANSFERS_SQL,
        LIST_PENDING_SQL,
        UPDATE_STATES_SQL,
        UNLIST_PENDING_SQL,
        STORE_DELTAS_SQL,
        APPEND_LOG_SQL,
        SET_HEAD_SQL,
        LOOKUP_REPLAYS_SQL,
    ];
    for sql in sqls {
        tx.prepare_cached(sql).await.map_err(pg_err)?;
    }
    Ok(())
}

async fn execute_batch(tx: &Transaction<'_>, ops: &[&Op]) -> Result<Vec<Outcome>> {
    prepare_all(tx).await?;
    // Every statement below looks rows up by key (`= ANY($1)`, joins on `unnest`). The
    // statements are prepared once per connection and PostgreSQL soon switches to a generic
    // plan, made with the statistics of the moment: for a table created or grown since the
    // last ANALYZE it is a sequential scan comparing each row with every key of the batch
    // (measured: half of the server's time, and growing with the table). Make scans the
    // planner's last resort for this transaction, and always use the generic plan: with
    // scans off it never looks cheaper than a custom one, so PostgreSQL went on planning
    // every statement of every batch anew (`perf`: 6 % of the server; forcing it, 1.14–1.19×
    // settled charges/s, docs/benchmarks.md).
    let no_scans = async {
        tx.batch_execute("SET LOCAL enable_seqscan = off; SET LOCAL plan_cache_mode = force_generic_plan").await.map_err(pg_err)
    };
    // 1. Lock the holds being settled, in ascending id order.
    let mut hold_ids: Vec<TransferId> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Settle { hold_id, .. } => Some(*hold_id),
            Op::Hold { .. } => None,
        })
        .collect();
    hold_ids.sort();
    hold_ids.dedup();
    let hold_id_bytes: Vec<Vec<u8>> = hold_ids.iter().map(|id| id.to_bytes().to_vec()).collect();
    let lock_holds = async {
        let mut holds = HashMap::new();
        if !hold_id_bytes.is_empty() {
            for row in query(tx, &LOCK_HOLDS_SQL, &[&hold_id_bytes]).await? {
                let t = row_transfer(&row, 0)?;
                holds.insert(t.id, t);
            }
        }
        Ok::<_, LedgerError>(holds)
    };
    // 2. Idempotency keys the batch may replay: new holds' keys now, posted holds' settle
    //    keys (a retried settlement: rare) once the holds are read.
    let hold_keys: Vec<String> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Hold { req, .. } => Some(req.idempotency_key.clone()),
            Op::Settle { .. } => None,
        })
        .collect();
    // 3 (part). The system accounts: read, not locked (changed only by atomic deltas, last).
    let system_ids: Vec<Vec<u8>> = [TREASURY, OPERATOR_REVENUE].iter().map(|id| id.to_bytes().to_vec()).collect();
    let read_system = async {
        query(tx, &READ_SYSTEM_SQL, &[&system_ids]).await?.iter().map(row_account).collect::<Result<Vec<_>>>()
    };
    // 3. Customer accounts, locked in ascending id order: those the new holds name, and
    //    those of the holds being settled (read from their rows, locked just before).
    let mut new_hold_accounts: Vec<Vec<u8>> = Vec::new();
    for op in ops {
        if let Op::Hold { req, .. } = op {
            new_hold_accounts.extend([req.debit_account, req.credit_account].iter().filter(|id| !is_system(**id)).map(|id| id.to_bytes().to_vec()));
        }
    }
    let lock_customers = async {
        query(tx, &LOCK_CUSTOMERS_SQL, &[&new_hold_accounts, &hold_id_bytes, &system_ids]).await?.iter().map(row_account).collect::<Result<Vec<_>>>()
    };
    // Independent reads and the locks, pipelined on the one connection (sent, and run, in
    // this order: the statements are prepared, so each future sends on its first poll, and
    // `biased` polls them in order): one round trip.
    let (no_scans, holds, by_key, system, customers) =
        tokio::join!(biased; no_scans, lock_holds, read_keys(tx, hold_keys), read_system, lock_customers);
    no_scans?;
    let holds = holds?;
    let mut by_key = by_key?;
    let replay_keys: Vec<String> = holds.values().filter(|h| h.state == TransferState::Posted).map(|h| settle_key(h.id)).collect();
    by_key.extend(read_keys(tx, replay_keys).await?);
    let mut accounts: HashMap<AccountId, Account> = system?.into_iter().map(|a| (a.id, a)).collect();
    accounts.extend(customers?.into_iter().map(|a| (a.id, a)));
    let loaded = Loaded { holds, by_key, accounts };

    // 4. Plan in memory.
    let plan = plan(ops, &loaded);
    let mut outcomes = plan.outcomes;

    // 5. The customers' writes, pipelined on the one connection (sent in this order), and
    //    last `log_head`'s lock, which waits for the commit of any batch that holds it: the
    //    writes above it run meanwhile.
    let replayed: Vec<Vec<u8>> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Settle { replay_of: Some(id), .. } => Some(id.to_bytes().to_vec()),
            _ => None,
        })
        .collect();
    let insert_transfers = async {
        if plan.new_transfers.is_empty() {
            return Ok(());
        }
        insert_transfers(tx, &plan.new_transfers).await
    };
    let list_pending = async {
        let holds: Vec<&Transfer> = plan.new_transfers.iter().filter(|t| t.hold && t.state == TransferState::Pending).collect();
        if holds.is_empty() {
            return Ok(());
        }
        let ids: Vec<Vec<u8>> = holds.iter().map(|t| t.id.to_bytes().to_vec()).collect();
        let expires: Vec<i64> = holds.iter().map(|t| t.expires_at_ms).collect();
        execute(tx, LIST_PENDING_SQL, &[&ids, &expires]).await.map(|_| ())
    };
    let update_states = async {
        if plan.states.is_empty() {
            return Ok(());
        }
        let ids: Vec<Vec<u8>> = plan.states.iter().map(|(id, _)| id.to_bytes().to_vec()).collect();
        let states: Vec<i16> = plan.states.iter().map(|(_, s)| s.as_i16()).collect();
        let update_args: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&ids, &states];
        let unlist_args: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
        let update = execute(tx, UPDATE_STATES_SQL, &update_args);
        let unlist = execute(tx, UNLIST_PENDING_SQL, &unlist_args);
        let (n, unlisted) = tokio::join!(biased; update, unlist);
        let n = n?;
        // (A hold missing from `pending_holds` is settled all the same; `check` reports it.)
        unlisted?;
        if n != ids.len() as u64 {
            return Err(LedgerError::Storage(format!("updated {n} of {} holds", ids.len())));
        }
        Ok(())
    };
    let (customer_deltas, system_deltas) = deltas(&loaded.accounts, &plan.accounts)?;
    let update_customers = async {
        if customer_deltas.is_empty() {
            return Ok(());
        }
        store_deltas(tx, &customer_deltas, &plan.accounts).await
    };
    let lookup_replays = async {
        if replayed.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = query(tx, LOOKUP_REPLAYS_SQL, &[&replayed]).await?;
        rows.iter().map(|r| Ok((id_col(r, 0, TransferId::from_slice)?, col::<i64>(r, 1)? as u64))).collect::<Result<HashMap<_, _>>>()
    };
    let lock_head = async {
        if plan.log.is_empty() {
            return Ok(0);
        }
        let rows = query(tx, LOCK_HEAD_SQL, &[]).await?;
        col::<i64>(rows.first().ok_or_else(|| LedgerError::Storage("log_head missing".into()))?, 0)
    };
    let (a, f, b, c, replay_index, head) =
        tokio::join!(biased; insert_transfers, list_pending, update_states, update_customers, lookup_replays, lock_head);
    a?;
    f?;
    b?;
    c?;
    let base = head?;

    // 6. Under the `log_head` lock: number the leaves, append them, apply the system
    //    accounts' deltas (one statement each in id order: the lock order), then COMMIT
    //    (the caller). A leaf closure that fails fails the batch: it is rolled back and
    //    every job re-run alone, where that job alone fails.
    let mut leaves = Vec::with_capacity(plan.log.len());
    for (k, (t, leaf)) in plan.log.iter().enumerate() {
        leaves.push(run_leaf(leaf, (base + k as i64) as u64, t)?);
    }
    let append_log = async {
        if plan.log.is_empty() {
            return Ok(());
        }
        let indices: Vec<i64> = (0..plan.log.len() as i64).map(|k| base + k).collect();
        let tids: Vec<Vec<u8>> = plan.log.iter().map(|(t, _)| t.id.to_bytes().to_vec()).collect();
        let accs: Vec<Vec<u8>> = plan.log.iter().map(|(t, _)| log_account(t).to_bytes().to_vec()).collect();
        let next = base + plan.log.len() as i64;
        let ins_args: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&indices, &tids, &accs, &leaves];
        let head_args: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&next];
        let ins = execute(tx, APPEND_LOG_SQL, &ins_args);
        let head = execute(tx, SET_HEAD_SQL, &head_args);
        let (a, b) = tokio::join!(biased; ins, head);
        a.and(b).map(|_| ())
    };
    let update_system = async {
        if system_deltas.is_empty() {
            return Ok(());
        }
        store_deltas(tx, &system_deltas, &plan.accounts).await
    };
    let (d, e) = tokio::join!(biased; append_log, update_system);
    d?;
    e?;
    let replay_index = replay_index?;
    for o in &mut outcomes {
        if let Outcome::Settle { result: Ok(s), log, replay_of } = o {
            if let Some(k) = log {
                s.log_index = Some((base + *k as i64) as u64);
            } else if let Some(id) = replay_of {
                s.log_index = replay_index.get(id).copied();
            }
        }
    }
    Ok(outcomes)
}

/// The transfers holding `keys` (idempotency keys), by key.
async fn read_keys(tx: &Transaction<'_>, mut keys: Vec<String>) -> Result<HashMap<String, Transfer>> {
    keys.sort();
    keys.dedup();
    let mut by_key = HashMap::new();
    if !keys.is_empty() {
        for row in query(tx, &READ_KEYS_SQL, &[&keys]).await? {
            let t = row_transfer(&row, 0)?;
            by_key.insert(t.idempotency_key.clone(), t);
        }
    }
    Ok(by_key)
}

/// Applies the jobs in order to copies of the loaded rows. Pure: the same input gives the
/// same plan.
fn plan(ops: &[&Op], loaded: &Loaded) -> Plan {
    let mut accounts = loaded.accounts.clone();
    let mut holds = loaded.holds.clone();
    let mut by_key = loaded.by_key.clone();
    // Log position of settlements posted earlier in this batch, by posted transfer id.
    let mut batch_log: HashMap<TransferId, usize> = HashMap::new();
    let mut out = Plan { outcomes: Vec::with_capacity(ops.len()), accounts: HashMap::new(), new_transfers: Vec::new(), states: Vec::new(), log: Vec::new() };
    for op in ops {
        match op {
            Op::Hold { req, now } => {
                let is_new = !by_key.contains_key(&req.idempotency_key);
                let r = plan_hold(req, *now, &mut accounts, &mut by_key);
                if let (true, Ok(t)) = (is_new, &r) {
                    out.new_transfers.push(t.clone());
                }
                out.outcomes.push(Outcome::Hold(r));
            }
            Op::Settle { hold_id, amount, now, leaf } => {
                let o = plan_settle(*hold_id, *amount, *now, leaf, &mut accounts, &mut holds, &mut by_key, &mut batch_log, &mut out);
                out.outcomes.push(o);
            }
        }
    }
    out.accounts = accounts;
    out
}

fn plan_hold(req: &TransferRequest, now: i64, accounts: &mut HashMap<AccountId, Account>, by_key: &mut HashMap<String, Transfer>) -> Result<Transfer> {
    if let Some(existing) = by_key.get(&req.idempotency_key) {
        return replay(req, existing.clone());
    }
    let debit = accounts.get(&req.debit_account).cloned().ok_or(LedgerError::UnknownAccount(req.debit_account))?;
    let credit = accounts.get(&req.credit_account).ok_or(LedgerError::UnknownAccount(req.credit_account))?;
    check_roles(&debit, credit, req.code)?;
    let mut debit = debit;
    apply_hold(&mut debit, req.amount_micros)?;
    let t = req.clone().into_transfer(now, None);
    check_transfer(&t).map_err(LedgerError::InvariantViolation)?;
    accounts.insert(debit.id, debit);
    by_key.insert(t.idempotency_key.clone(), t.clone());
    Ok(t)
}

#[allow(clippy::too_many_arguments)]
fn plan_settle(
    hold_id: TransferId,
    amount: i64,
    now: i64,
    leaf: &Option<Leaf>,
    accounts: &mut HashMap<AccountId, Account>,
    holds: &mut HashMap<TransferId, Transfer>,
    by_key: &mut HashMap<String, Transfer>,
    batch_log: &mut HashMap<TransferId, usize>,
    out: &mut Plan,
) -> Outcome {
    let fail = |e| Outcome::Settle { result: Err(e), log: None, replay_of: None };
    let Some(hold) = holds.get(&hold_id).cloned() else { return fail(LedgerError::UnknownTransfer(hold_id)) };
    if hold.key_id.is_some() {
        return Outcome::Alone;
    }
    let prior = match hold.state {
        TransferState::Posted => by_key.get(&settle_key(hold.id)).cloned(),
        _ => None,
    };
    match settle_precheck(&hold, amount, now, prior.as_ref().map(|t| t.amount_micros)) {
        Err(e) => return fail(e),
        Ok(Some(())) => {
            let released_micros = hold.amount_micros - amount;
            // A replay: of a settlement earlier in this batch (its log slot is known),
            // or of a committed one (its log index is looked up).
            let (log, replay_of) = match &prior {
                Some(p) => match batch_log.get(&p.id) {
                    Some(k) => (Some(*k), None),
                    None if out.new_transfers.iter().any(|n| n.id == p.id) => (None, None),
                    None => (None, Some(p.id)),
                },
                None => (None, None),
            };
            return Outcome::Settle { result: Ok(Settled { hold, posted: prior, released_micros, log_index: None }), log, replay_of };
        }
        Ok(None) => {}
    }
    let (Some(debit), Some(credit)) = (accounts.get(&hold.debit_account).cloned(), accounts.get(&hold.credit_account).cloned()) else {
        return fail(LedgerError::UnknownAccount(hold.debit_account));
    };
    let (mut debit, mut credit) = (debit, credit);
    if let Err(e) = apply_settle(&mut debit, &mut credit, hold.amount_micros, amount).and(check_account(&debit)).and(check_account(&credit)) {
        return fail(e);
    }
    let state = if amount > 0 { TransferState::Posted } else { TransferState::Voided };
    let posted = (amount > 0).then(|| settle_request(&hold, amount).into_transfer(now, Some(hold.id)));
    if let Some(p) = &posted {
        if let Err(e) = check_transfer(p) {
            return fail(LedgerError::InvariantViolation(e));
        }
    }
    // Commit the job to the batch state.
    let mut hold = hold;
    hold.state = state;
    holds.insert(hold.id, hold.clone());
    accounts.insert(debit.id, debit);
    accounts.insert(credit.id, credit);
    out.states.push((hold.id, state));
    let mut log = None;
    if let Some(p) = &posted {
        out.new_transfers.push(p.clone());
        by_key.insert(p.idempotency_key.clone(), p.clone());
        if let Some(leaf) = leaf {
            log = Some(out.log.len());
            batch_log.insert(p.id, out.log.len());
            out.log.push((p.clone(), leaf.clone()));
        }
    }
    let released_micros = hold.amount_micros - amount;
    Outcome::Settle { result: Ok(Settled { hold, posted, released_micros, log_index: None }), log, replay_of: None }
}

/// Per-account (balance, pending) deltas, customers and system accounts apart, by ascending id.
#[allow(clippy::type_complexity)]
fn deltas(
    before: &HashMap<AccountId, Account>,
    after: &HashMap<AccountId, Account>,
) -> Result<(Vec<(AccountId, i64, i64)>, Vec<(AccountId, i64, i64)>)> {
    let mut customers = Vec::new();
    let mut system = Vec::new();
    for (id, a) in after {
        let b = before.get(id).ok_or(LedgerError::UnknownAccount(*id))?;
        let db = a.balance_micros.checked_sub(b.balance_micros).ok_or(LedgerError::Overflow)?;
        let dp = a.pending_micros.checked_sub(b.pending_micros).ok_or(LedgerError::Overflow)?;
        if db == 0 && dp == 0 {
            continue;
        }
        check_account(a)?;
        if is_system(*id) { &mut system } else { &mut customers }.push((*id, db, dp));
    }
    customers.sort_by_key(|d| d.0);
    system.sort_by_key(|d| d.0);
    Ok((customers, system))
}

/// Applies deltas and checks every row they produced (customer rows are locked,
/// so they must equal the plan exactly).
async fn store_deltas(tx: &Transaction<'_>, deltas: &[(AccountId, i64, i64)], planned: &HashMap<AccountId, Account>) -> Result<()> {
    let system = deltas.iter().all(|d| is_system(d.0));
    // System rows one statement each, so they are locked in id order; pipelined, in that order.
    let chunks: Vec<&[(AccountId, i64, i64)]> = if system { deltas.chunks(1).collect() } else { vec![deltas] };
    match chunks.as_slice() {
        [] => Ok(()),
        [a] => store_chunk(tx, a, planned).await,
        [a, b] => {
            let (x, y) = tokio::join!(biased; store_chunk(tx, a, planned), store_chunk(tx, b, planned));
            x.and(y)
        }
        more => {
            for chunk in more {
                store_chunk(tx, chunk, planned).await?;
            }
            Ok(())
        }
    }
}

async fn store_chunk(tx: &Transaction<'_>, chunk: &[(AccountId, i64, i64)], planned: &HashMap<AccountId, Account>) -> Result<()> {
    let ids: Vec<Vec<u8>> = chunk.iter().map(|d| d.0.to_bytes().to_vec()).collect();
    let dbs: Vec<i64> = chunk.iter().map(|d| d.1).collect();
    let dps: Vec<i64> = chunk.iter().map(|d| d.2).collect();
    let rows = query(tx, STORE_DELTAS_SQL, &[&ids, &dbs, &dps]).await?;
    if rows.len() != chunk.len() {
        return Err(LedgerError::Storage(format!("updated {} of {} accounts", rows.len(), chunk.len())));
    }
    for row in &rows {
        let stored = row_account(row)?;
        if !is_system(stored.id) && planned.get(&stored.id) != Some(&stored) {
            return Err(LedgerError::InvariantViolation(format!("locked account {} changed under the batch", stored.id)));
        }
        check_account(&stored)?;
    }
    Ok(())
}

async fn insert_transfers(tx: &Transaction<'_>, ts: &[Transfer]) -> Result<()> {
    let ids: Vec<Vec<u8>> = ts.iter().map(|t| t.id.to_bytes().to_vec()).collect();
    let keys: Vec<&str> = ts.iter().map(|t| t.idempotency_key.as_str()).collect();
    let debits: Vec<Vec<u8>> = ts.iter().map(|t| t.debit_account.to_bytes().to_vec()).collect();
    let credits: Vec<Vec<u8>> = ts.iter().map(|t| t.credit_account.to_bytes().to_vec()).collect();
    let amounts: Vec<i64> = ts.iter().map(|t| t.amount_micros).collect();
    let codes: Vec<i16> = ts.iter().map(|t| t.code.as_i16()).collect();
    let states: Vec<i16> = ts.iter().map(|t| t.state.as_i16()).collect();
    let hold: Vec<bool> = ts.iter().map(|t| t.hold).collect();
    let timeouts: Vec<i64> = ts.iter().map(|t| t.timeout_ms).collect();
    let expires: Vec<i64> = ts.iter().map(|t| t.expires_at_ms).collect();
    let created: Vec<i64> = ts.iter().map(|t| t.created_at_ms).collect();
    let pending: Vec<Option<Vec<u8>>> = ts.iter().map(|t| t.pending_id.map(|p| p.to_bytes().to_vec())).collect();
    let key_ids: Vec<Option<Vec<u8>>> = ts.iter().map(|t| t.key_id.map(|k| k.to_bytes().to_vec())).collect();
    let n = execute(
        tx,
        &INSERT_TRANSFERS_SQL,
        &[&ids, &keys, &debits, &credits, &amounts, &codes, &states, &hold, &timeouts, &expires, &created, &pending, &key_ids],
    )
    .await?;
    if n != ts.len() as u64 {
        return Err(LedgerError::Storage(format!("inserted {n} of {} transfers", ts.len())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u128) -> Job {
        let op = Op::Settle { hold_id: TransferId(n), amount: 1, now: 0, leaf: None };
        Job { op, reply: Reply::Settle(oneshot::channel().0) }
    }

    /// A job alone never waits; while a batch of 3 is in flight, the next batch waits for 3
    /// jobs (sent after it began waiting), or until `BATCH_WAIT_MAX` when they do not come.
    /// (Paused clock: no real sleeping; time moves only when every task is waiting.)
    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_only_to_match_the_one_in_flight() {
        let (tx, mut rx) = mpsc::channel(16);
        let in_flight = InFlight::default();
        tx.send(job(1)).await.unwrap();
        let t0 = tokio::time::Instant::now();
        assert_eq!(take_batch(&mut rx, &in_flight).await.unwrap().len(), 1);
        assert_eq!(t0.elapsed(), Duration::ZERO);

        // That batch (1 job) is in flight; finish it, start one of 3.
        in_flight.finish();
        in_flight.start(3);
        tx.send(job(2)).await.unwrap();
        let late = tx.clone();
        tokio::spawn(async move {
            for n in 3..5 {
                tokio::task::yield_now().await;
                late.send(job(n)).await.unwrap();
            }
        });
        let t0 = tokio::time::Instant::now();
        let batch = take_batch(&mut rx, &in_flight).await.unwrap();
        assert_eq!((batch.len(), t0.elapsed()), (3, Duration::ZERO));

        // Two batches in flight now (3 and 3); one job comes, nothing more: it goes at the deadline.
        tx.send(job(5)).await.unwrap();
        let t0 = tokio::time::Instant::now();
        assert_eq!(take_batch(&mut rx, &in_flight).await.unwrap().len(), 1);
        assert_eq!(t0.elapsed(), BATCH_WAIT_MAX);

        drop(tx);
        in_flight.finish();
        in_flight.finish();
        in_flight.finish();
        assert!(take_batch(&mut rx, &in_flight).await.is_none());
    }
}
