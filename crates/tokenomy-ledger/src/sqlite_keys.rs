//! The SQLite writer's filter of idempotency keys: why a new key costs no index lookup.
//!
//! Every hold, mint and transfer carries its caller's idempotency key, and before the
//! INSERT the writer must know whether the key is taken. Keys past the index file's head
//! are in the writer's memory (its index tail); the rest are in the index file's
//! `transfer_keys`, a B-tree the writer reads through a second connection, whose page cache
//! the indexer's every commit invalidates. Nearly every key is new, and proving it absent
//! there was the writer's most costly lookup: without it, 64 writers settled 1.1–1.3× more
//! charges per second (docs/benchmarks.md, session 14). So the writer keeps a Bloom filter
//! of every key the ledger holds: a key the filter lacks is new, and only the others
//! (retries, and about 0.5 % of new keys) are looked up.
//!
//! **Architecture Invariant:** once a filter serves, it holds every key of `transfer_keys`.
//! * It is created between two batches (no write of the writer is uncommitted) and filled
//!   by a builder thread whose read snapshots begin after that: every key committed before
//!   is in them, from `transfer_keys` up to the index file's head and from `transfers` past it.
//! * Every key that enters the writer's tail (inserted by this writer, or read back from
//!   `transfers` after a rollback) is added to it as well, before the indexer can take it
//!   out of the tail. This writer's keys only reach `transfer_keys` through the tail or the
//!   builder's snapshot.
//! * Another connection's commit (a second process on the file, whose own indexer may
//!   index its keys before this writer sees them) drops every filter: every time the writer
//!   reads `PRAGMA data_version` (at each batch's start, before any lookup, and in the
//!   upkeep between batches) it compares it with the last value it read, and builds a new
//!   filter once no such commit was seen for a second.
//! * Until the builder is done, the writer looks every key up, as before.
//!
//! A limit on everything: a filter is sized for twice the keys it starts with (at least
//! [`KEY_FILTER_KEYS_MIN`]), at [`KEY_FILTER_BITS_PER_KEY`] bits each and at most
//! [`KEY_FILTER_BYTES_MAX`]. Once it holds more keys than it was sized for, a filter twice
//! as large is built the same way while the old one goes on serving; past the byte limit
//! more keys only raise the false-positive rate (never a wrong answer).
//!
//! The filter is a split-block Bloom filter (Parquet's layout): one 256-bit block per key,
//! one bit in each of its eight 32-bit words, so a lookup reads one cache line.

use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use crate::domain::{LedgerError, Result};
use crate::sqlite::db_err;
use crate::sqlite_index::index_path;
use crate::sqlite_writer::Shared;

/// Bits per key a filter is sized for: a false-positive rate of about 0.5 %.
pub const KEY_FILTER_BITS_PER_KEY: u64 = 12;
/// Fewest keys a filter is sized for (1.5 MiB).
pub const KEY_FILTER_KEYS_MIN: u64 = 1 << 20;
/// Largest filter (about 179 million keys at the sized rate).
pub const KEY_FILTER_BYTES_MAX: u64 = 256 << 20;
/// After another connection's commit, how long no new filter is built (each such commit
/// drops the filters: a second process writing steadily would otherwise restart the build
/// at every batch).
pub const KEY_FILTER_QUIET_AFTER_FOREIGN_COMMIT: Duration = Duration::from_secs(1);
/// After a failed build, how long until the next try.
pub const KEY_FILTER_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

const SALTS: [u32; 8] = [0x47b6_137b, 0x4497_4d91, 0x8824_ad5b, 0xa2b7_289d, 0x7054_95c7, 0x2df1_424b, 0x9efc_4947, 0x5c6b_fb31];

/// The size of a filter for `keys_max` keys: whole 32-byte blocks, within the limits.
fn bytes_for(keys_max: u64) -> u64 {
    keys_max.saturating_mul(KEY_FILTER_BITS_PER_KEY).div_ceil(8).clamp(32, KEY_FILTER_BYTES_MAX) / 32 * 32
}

/// A Bloom filter of idempotency keys, shared by the writer and its builder thread.
pub(crate) struct KeyFilter {
    blocks: Box<[[AtomicU32; 8]]>,
    /// Seeded at random: no caller can aim keys at the filter's bits (and a key that hit
    /// them would only be looked up).
    hasher: foldhash::fast::RandomState,
    /// The keys it was sized for.
    keys_max: u64,
    /// Keys added (a key added twice counts twice).
    keys: AtomicU64,
    /// Set by the builder once every committed key of its snapshots is in.
    ready: AtomicBool,
    /// Set by the builder when it could not finish.
    failed: AtomicBool,
    /// Set by the writer when it dropped the filter: the builder stops.
    cancelled: AtomicBool,
}

impl KeyFilter {
    pub(crate) fn new(keys_max: u64) -> Self {
        let blocks = (0..bytes_for(keys_max) / 32).map(|_| Default::default()).collect();
        KeyFilter { blocks, hasher: Default::default(), keys_max, keys: AtomicU64::new(0), ready: AtomicBool::new(false), failed: AtomicBool::new(false), cancelled: AtomicBool::new(false) }
    }

    /// The key's block and the eight bits it sets there.
    fn position(&self, key: &str) -> (&[AtomicU32; 8], [u32; 8]) {
        let h = self.hasher.hash_one(key);
        let block = (((h >> 32) * self.blocks.len() as u64) >> 32) as usize;
        let low = h as u32;
        (&self.blocks[block], SALTS.map(|salt| 1u32 << (low.wrapping_mul(salt) >> 27)))
    }

    pub(crate) fn add(&self, key: &str) {
        let (block, bits) = self.position(key);
        for (word, bit) in block.iter().zip(bits) {
            word.fetch_or(bit, Ordering::Relaxed);
        }
        self.keys.fetch_add(1, Ordering::Relaxed);
    }

    /// False only for a key never added.
    pub(crate) fn may_contain(&self, key: &str) -> bool {
        let (block, bits) = self.position(key);
        block.iter().zip(bits).all(|(word, bit)| word.load(Ordering::Relaxed) & bit != 0)
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Holds more keys than it was sized for (and a larger one may be built).
    fn outgrown(&self) -> bool {
        self.keys.load(Ordering::Relaxed) > self.keys_max && (self.blocks.len() as u64) * 32 < KEY_FILTER_BYTES_MAX
    }
}

/// The writer's filters: the one serving, and the one being built.
pub(crate) struct KeyFilters {
    serving: Option<Arc<KeyFilter>>,
    building: Option<Arc<KeyFilter>>,
    keys_min: u64,
    ledger: PathBuf,
    /// The writer connection's `PRAGMA data_version` when last read: it changes when another
    /// connection commits. Every read of it goes through [`seen_data_version`](Self::seen_data_version).
    data_version: Option<i64>,
    /// Builder threads still running (one at most, cancelled ones included).
    builders: Arc<AtomicU64>,
    /// No new filter before this (after another connection's commit, or a failed build).
    not_before: Option<Instant>,
}

impl KeyFilters {
    pub(crate) fn new(ledger: PathBuf, keys_min: u64) -> Self {
        KeyFilters { serving: None, building: None, keys_min, ledger, data_version: None, builders: Arc::default(), not_before: None }
    }

    /// Between two batches only (see the module docs): starts serving a built filter, and
    /// starts building one when there is none or the one serving is outgrown (one builder at
    /// a time), after reading `data_version` (other connections' commits drop every filter).
    pub(crate) fn maintain(&mut self, shared: &Arc<Shared>, data_version: impl FnOnce() -> Result<i64>) {
        if self.building.as_ref().is_some_and(|b| b.failed.load(Ordering::Acquire)) {
            // The one serving, if any, still holds every key: only the new one is given up.
            self.building = None;
            return self.hold_back(shared, KEY_FILTER_RETRY_AFTER_FAILURE);
        }
        if self.building.as_ref().is_some_and(|b| b.is_ready()) {
            self.serving = self.building.take();
        }
        let keys = match (&self.serving, &self.building) {
            (_, Some(_)) => return,
            (None, None) => shared.committed_upto.load(Ordering::SeqCst).max(0) as u64,
            (Some(s), None) if s.outgrown() => s.keys.load(Ordering::Relaxed),
            (Some(_), None) => return,
        };
        if !self.quiet() {
            return;
        }
        // Found in review: a commit by another process between a batch and this upkeep must
        // not be taken for seen by a filter that goes on serving.
        match data_version() {
            Ok(v) => self.seen_data_version(v, shared),
            Err(e) => return self.drop_all(shared, KEY_FILTER_RETRY_AFTER_FAILURE, &format!("reading data_version: {e}")),
        }
        if !self.quiet() {
            return;
        }
        let f = Arc::new(KeyFilter::new(keys.saturating_mul(2).max(self.keys_min)));
        self.building = Some(f.clone());
        let generation = shared.key_filters_created.fetch_add(1, Ordering::SeqCst) + 1;
        let (ledger, sh, builders) = (self.ledger.clone(), shared.clone(), self.builders.clone());
        builders.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name("ledger-sqlite-keys".into()).spawn(move || {
            crate::sqlite_index::set_this_threads_priority(crate::sqlite_index::Background::Idle);
            match build(&ledger, &f) {
                Ok(()) => {
                    f.ready.store(true, Ordering::Release);
                    sh.key_filters_built.fetch_max(generation, Ordering::SeqCst);
                }
                Err(_) if f.cancelled.load(Ordering::SeqCst) => {}
                Err(e) => {
                    // The writer goes on looking every key up (slower, never wrong), and tries again later.
                    eprintln!("tokenomy-ledger: building the idempotency-key filter failed ({e}); keys are looked up in the index file");
                    f.failed.store(true, Ordering::Release);
                }
            }
            builders.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            self.builders.fetch_sub(1, Ordering::SeqCst);
            self.drop_all(shared, KEY_FILTER_RETRY_AFTER_FAILURE, &format!("cannot start its builder: {e}"));
        }
    }

    /// No builder runs, and none is held back.
    fn quiet(&self) -> bool {
        self.builders.load(Ordering::SeqCst) == 0 && self.not_before.is_none_or(|t| t <= Instant::now())
    }

    /// Every read of the writer connection's `PRAGMA data_version` (each batch's, and each
    /// `maintain`'s): a change means another connection committed, whose keys its own indexer
    /// may move into `transfer_keys` without this writer's tail ever holding them, so every
    /// filter is dropped and a new one built from snapshots taken after this.
    pub(crate) fn seen_data_version(&mut self, version: i64, shared: &Shared) {
        if self.data_version.is_some_and(|v| v != version) {
            self.drop_all(shared, KEY_FILTER_QUIET_AFTER_FOREIGN_COMMIT, "");
        }
        self.data_version = Some(version);
    }

    /// Drops every filter (their builders stop at their next check) and builds none before
    /// `wait` has passed; says why on stderr unless `why` is empty.
    fn drop_all(&mut self, shared: &Shared, wait: Duration, why: &str) {
        for f in self.serving.take().into_iter().chain(self.building.take()) {
            f.cancelled.store(true, Ordering::SeqCst);
        }
        self.hold_back(shared, wait);
        if !why.is_empty() {
            eprintln!("tokenomy-ledger: no idempotency-key filter for now ({why}); keys are looked up in the index file");
        }
    }

    /// Builds no filter before `wait` has passed. (What `SqliteStore::key_filter_ready`
    /// reads then no longer describes a filter in use.)
    fn hold_back(&mut self, shared: &Shared, wait: Duration) {
        self.not_before = Some(Instant::now() + wait);
        shared.key_filters_created.fetch_add(1, Ordering::SeqCst);
    }

    /// Adds a key entering the writer's tail to every filter.
    pub(crate) fn add(&self, key: &str) {
        for f in self.serving.iter().chain(&self.building) {
            f.add(key);
        }
    }

    /// True when `key` is surely in no transfer of `transfer_keys` (a serving filter lacks it).
    pub(crate) fn surely_absent(&self, key: &str) -> bool {
        self.serving.as_ref().is_some_and(|f| !f.may_contain(key))
    }
}

/// Adds every committed key to `filter`: those of `transfer_keys` up to the index file's
/// head, then those of `transfers` past it (two read snapshots, the index file's first, both
/// begun after the filter was created).
fn build(ledger: &Path, filter: &KeyFilter) -> Result<()> {
    let open = |path: &Path| -> Result<Connection> {
        let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(db_err)?;
        c.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err)?;
        Ok(c)
    };
    let index = open(&index_path(ledger))?;
    let mut pace = Pace { started: std::time::Instant::now(), idle: true };
    index.execute_batch("BEGIN").map_err(db_err)?;
    let head = crate::sqlite_index::indexed_upto(&index)?;
    add_all(&index, "SELECT idempotency_key FROM transfer_keys", [], filter, &mut pace)?;
    index.execute_batch("COMMIT").map_err(db_err)?;
    let ledger = open(ledger)?;
    add_all(&ledger, "SELECT idempotency_key FROM transfers WHERE seq > ?1", [head], filter, &mut pace)
}

/// Seconds a key filter's build runs as `SCHED_IDLE` before it takes nice 10: a build
/// starved by busy cores would hold its read snapshots, and no checkpoint could reset either
/// WAL meanwhile.
pub const KEY_FILTER_IDLE_SECS_MAX: u64 = 10;

/// How long a build has run, and whether it is still idle.
struct Pace {
    started: std::time::Instant,
    idle: bool,
}

impl Pace {
    fn check(&mut self) {
        if self.idle && self.started.elapsed().as_secs() >= KEY_FILTER_IDLE_SECS_MAX {
            self.idle = false;
            crate::sqlite_index::set_this_threads_priority(crate::sqlite_index::Background::Behind);
        }
    }
}

fn add_all(c: &Connection, sql: &str, params: impl rusqlite::Params, filter: &KeyFilter, pace: &mut Pace) -> Result<()> {
    let mut stmt = c.prepare(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    let mut n = 0u64;
    while let Some(row) = rows.next().map_err(db_err)? {
        n += 1;
        if n.is_multiple_of(4096) {
            if filter.cancelled.load(Ordering::Relaxed) {
                return Err(LedgerError::Storage("cancelled".into()));
            }
            pace.check();
        }
        let key = row.get_ref(0).map_err(db_err)?.as_str().map_err(|e| LedgerError::Storage(format!("an idempotency key is not text: {e}")))?;
        filter.add(key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_key_added_is_missed_and_few_others_match() {
        let f = KeyFilter::new(100_000);
        for i in 0..100_000 {
            f.add(&format!("key-{i}"));
        }
        assert!((0..100_000).all(|i| f.may_contain(&format!("key-{i}"))), "a key added was missed");
        let false_positives = (0..100_000).filter(|i| f.may_contain(&format!("other-{i}"))).count();
        // 12 bits per key: about 0.5 %; 2 % would mean the hashing is broken.
        assert!(false_positives < 2_000, "{false_positives} false positives in 100 000");
        assert!(!f.outgrown());
        f.add("one more");
        assert!(f.outgrown());
    }

    fn ready(keys_max: u64) -> Arc<KeyFilter> {
        let f = Arc::new(KeyFilter::new(keys_max));
        f.ready.store(true, Ordering::Release);
        f
    }

    /// Whenever the writer reads `data_version` (at a batch's start, or in `maintain` before
    /// it builds a filter: found in review, a commit by another process between a batch and
    /// the upkeep was otherwise taken as seen by the filter that went on serving) and it
    /// changed, every filter goes.
    #[test]
    fn a_commit_by_another_connection_drops_every_filter_whenever_it_is_seen() {
        let shared = Shared::new(0, 0);
        let mut filters = KeyFilters::new(PathBuf::from("/nonexistent/ledger.sqlite"), 64);
        filters.seen_data_version(1, &shared);
        let serving = ready(64);
        filters.serving = Some(serving.clone());
        filters.maintain(&shared, || panic!("nothing to build: no need to read it"));
        assert!(filters.serving.is_some());
        (0..65).for_each(|i| serving.add(&format!("key-{i}")));
        filters.maintain(&shared, || Ok(2)); // outgrown: about to build a larger one
        assert!(filters.serving.is_none() && filters.building.is_none());
        assert!(serving.cancelled.load(Ordering::SeqCst), "its builder would stop");
        filters.maintain(&shared, || Ok(2));
        assert!(filters.building.is_none(), "no new filter before the quiet time has passed");

        filters.serving = Some(ready(64));
        filters.seen_data_version(3, &shared);
        assert!(filters.serving.is_none(), "the same at a batch's start");
    }

    /// A build that failed is dropped, and tried again later (not left building for ever),
    /// while the filter serving goes on.
    #[test]
    fn a_failed_build_is_dropped_and_retried_later() {
        let shared = Shared::new(0, 0);
        let mut filters = KeyFilters::new(PathBuf::from("/nonexistent/ledger.sqlite"), 64);
        let failed = Arc::new(KeyFilter::new(64));
        failed.failed.store(true, Ordering::SeqCst);
        filters.serving = Some(ready(64));
        filters.building = Some(failed);
        filters.maintain(&shared, || Ok(1));
        assert!(filters.building.is_none() && filters.serving.is_some());
        assert!(filters.not_before.is_some_and(|t| t > Instant::now() + KEY_FILTER_RETRY_AFTER_FAILURE / 2));
    }

    #[test]
    fn sizes_are_bounded() {
        assert_eq!(KeyFilter::new(0).blocks.len(), 1);
        assert_eq!(bytes_for(KEY_FILTER_KEYS_MIN), 3 << 19);
        assert_eq!(bytes_for(u64::MAX), KEY_FILTER_BYTES_MAX);
    }
}
