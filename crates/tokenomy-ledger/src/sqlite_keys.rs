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
//!   `transfers` after a rollback or another process's commit) is added to it as well,
//!   before the indexer can take it out of the tail. Keys only reach `transfer_keys` through
//!   the tail or the builder's snapshot.
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
}

impl KeyFilter {
    pub(crate) fn new(keys_max: u64) -> Self {
        let blocks = (0..bytes_for(keys_max) / 32).map(|_| Default::default()).collect();
        KeyFilter { blocks, hasher: Default::default(), keys_max, keys: AtomicU64::new(0), ready: AtomicBool::new(false) }
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
}

impl KeyFilters {
    pub(crate) fn new(ledger: PathBuf, keys_min: u64) -> Self {
        KeyFilters { serving: None, building: None, keys_min, ledger }
    }

    /// Between two batches only (see the module docs): starts serving a built filter, and
    /// starts building one when there is none or the one serving is outgrown.
    pub(crate) fn maintain(&mut self, shared: &Arc<Shared>) {
        if self.building.as_ref().is_some_and(|b| b.is_ready()) {
            self.serving = self.building.take();
        }
        let keys = match (&self.serving, &self.building) {
            (_, Some(_)) => return,
            (None, None) => shared.committed_upto.load(Ordering::SeqCst).max(0) as u64,
            (Some(s), None) if s.outgrown() => s.keys.load(Ordering::Relaxed),
            (Some(_), None) => return,
        };
        let filter = Arc::new(KeyFilter::new(keys.saturating_mul(2).max(self.keys_min)));
        self.building = Some(filter.clone());
        shared.key_filter_ready.store(false, Ordering::SeqCst);
        let (ledger, shared) = (self.ledger.clone(), shared.clone());
        let spawned = std::thread::Builder::new().name("ledger-sqlite-keys".into()).spawn(move || {
            crate::sqlite_index::lower_this_threads_priority();
            match build(&ledger, &filter) {
                Ok(()) => {
                    filter.ready.store(true, Ordering::Release);
                    shared.key_filter_ready.store(true, Ordering::SeqCst);
                }
                // The writer goes on looking every key up: slower, never wrong.
                Err(e) => eprintln!("tokenomy-ledger: building the idempotency-key filter failed ({e}); keys are looked up in the index file"),
            }
        });
        if let Err(e) = spawned {
            eprintln!("tokenomy-ledger: cannot start the key filter's builder ({e}); keys are looked up in the index file");
        }
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
    index.execute_batch("BEGIN").map_err(db_err)?;
    let head = crate::sqlite_index::indexed_upto(&index)?;
    add_all(&index, "SELECT idempotency_key FROM transfer_keys", [], filter)?;
    index.execute_batch("COMMIT").map_err(db_err)?;
    let ledger = open(ledger)?;
    add_all(&ledger, "SELECT idempotency_key FROM transfers WHERE seq > ?1", [head], filter)
}

fn add_all(c: &Connection, sql: &str, params: impl rusqlite::Params, filter: &KeyFilter) -> Result<()> {
    let mut stmt = c.prepare(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    while let Some(row) = rows.next().map_err(db_err)? {
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

    #[test]
    fn sizes_are_bounded() {
        assert_eq!(KeyFilter::new(0).blocks.len(), 1);
        assert_eq!(bytes_for(KEY_FILTER_KEYS_MIN), 3 << 19);
        assert_eq!(bytes_for(u64::MAX), KEY_FILTER_BYTES_MAX);
    }
}
