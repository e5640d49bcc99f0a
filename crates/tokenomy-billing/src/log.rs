//! The node's view of its receipts log: an in-memory Merkle tree that mirrors the durable log
//! in the ledger store (the store is the truth; the tree is rebuilt from it at start and
//! caught up before every proof), an index from receipt id to log position, and the last
//! checkpoint this node signed.
//!
//! The tree holds hashes from 64-leaf tiles up ([`TiledTree`]): a proof that reaches inside a
//! complete tile reads that tile's entries back from the store (at most two tiles per proof),
//! and the tree checks them against the tile root it computed when it appended them.
//!
//! Architecture Invariant: the node never signs two inconsistent checkpoints. Every new
//! checkpoint is checked against the last one signed (kept in `DATA_DIR/checkpoint`, so the
//! rule survives restarts): the tree at the old size must have the old root.

mod index;

use tokenomy_ledger::{AccountId, LedgerStore, LogEntry, Price, TransferId};
use tokenomy_receipts::{Checkpoint, Hash, Receipt, SignerKey, Tile, TiledError, TiledTree, Tiles, VerifierKey, TILE_LEAVES};

/// Entries read from the store per catch-up query.
const SYNC_BATCH: u32 = 999; // + the tail read again: the store's page limit of 1 000

#[derive(Debug, Clone)]
pub struct Signed {
    pub checkpoint: Checkpoint,
    /// The signed note, exactly as published.
    pub note: String,
}

#[derive(Debug)]
pub struct LogState {
    tree: TiledTree,
    /// receipt id → (log index, account); ledger transfer → receipt id.
    index: index::ReceiptIndex,
    last: Option<Signed>,
    /// What each account was charged, by day and model, from the receipts read so far.
    usage: crate::usage::UsageBook,
    /// The entry at the end of the tree: each sync reads it again, so a store whose log went
    /// back (a restored backup, a failover to a replica that lost commits) is noticed.
    tail: Option<LogEntry>,
    /// Tiles read back for proofs, kept for the next ones (a client fetches its receipt soon
    /// after the request, so recent tiles are asked for again and again).
    tiles: TileCache,
}

/// Tiles read back from the store, at most [`TILE_CACHE_MAX`], the oldest read going first.
#[derive(Debug, Default)]
struct TileCache {
    tiles: Tiles,
    order: std::collections::VecDeque<u64>,
}

/// 256 tiles of 127 hashes: 1 MiB, 16 384 entries' worth.
const TILE_CACHE_MAX: usize = 256;

impl TileCache {
    fn insert(&mut self, number: u64, tile: Tile) {
        if self.tiles.insert(number, tile).is_none() {
            self.order.push_back(number);
        }
        while self.order.len() > TILE_CACHE_MAX {
            let oldest = self.order.pop_front().expect("order is not empty");
            self.tiles.remove(&oldest);
        }
        debug_assert_eq!(self.order.len(), self.tiles.len());
    }

    fn remove(&mut self, tile: u64) {
        if self.tiles.remove(&tile).is_some() {
            self.order.retain(|&t| t != tile);
        }
    }
}

impl LogState {
    /// A log state that continues from `last`, a checkpoint signed before (if any); its usage
    /// reports price tokens at `reference` too.
    pub fn new(last: Option<Signed>, reference: Option<Price>) -> LogState {
        let usage = crate::usage::UsageBook::new(reference);
        LogState { tree: TiledTree::new(), index: Default::default(), last, usage, tail: None, tiles: TileCache::default() }
    }

    /// The usage of the receipts read so far (call [`sync`](Self::sync) first).
    pub fn usage(&self) -> &crate::usage::UsageBook {
        &self.usage
    }

    pub fn size(&self) -> u64 {
        self.tree.size()
    }

    pub fn last(&self) -> Option<&Signed> {
        self.last.as_ref()
    }

    /// Appends every entry the store has beyond our tree, in log order.
    /// Fails with [`crate::BillingError::LogRewritten`] when the store no longer holds the
    /// entry this node saw last: its log went back under the running node.
    pub async fn sync<S: LedgerStore>(&mut self, store: &S) -> Result<(), crate::BillingError> {
        loop {
            let from = self.tree.size();
            let mut entries = store.log_entries(from.saturating_sub(1), SYNC_BATCH + 1).await?.into_iter();
            if let Some(tail) = &self.tail {
                match entries.next() {
                    Some(e) if e == *tail => {}
                    found => {
                        return Err(crate::BillingError::LogRewritten(match found {
                            None => format!("the ledger's log has fewer than the {from} entries this node has read"),
                            Some(_) => format!("the ledger's log entry {} is not the one this node read", from - 1),
                        }))
                    }
                }
            }
            let mut n = 0;
            for e in entries {
                self.push(&e).map_err(crate::BillingError::Internal)?;
                self.tail = Some(e);
                n += 1;
            }
            if n < SYNC_BATCH as usize {
                return Ok(());
            }
        }
    }

    fn push(&mut self, e: &LogEntry) -> Result<(), String> {
        assert_eq!(e.log_index, self.tree.size(), "the store returned log entries out of order");
        let r = Receipt::from_canonical_bytes(&e.leaf_bytes).map_err(|err| format!("log entry {}: {err}", e.log_index))?;
        if r.log_index != e.log_index {
            return Err(format!("log entry {} holds a receipt for index {}", e.log_index, r.log_index));
        }
        self.index.push(&r.receipt_id, e.transfer_id, e.account_id)?;
        self.tree.push_data(&e.leaf_bytes);
        assert_eq!(self.index.len(), self.tree.size(), "the receipt index and the tree went out of step");
        self.usage.add(e.account_id, &r);
        Ok(())
    }

    pub fn receipt_for_transfer(&self, t: TransferId) -> Option<String> {
        self.index.receipt_for_transfer(t)
    }

    pub fn find(&self, receipt_id: &str) -> Option<(u64, AccountId)> {
        self.index.find(receipt_id)
    }

    /// The latest checkpoint, signing a new one if the tree grew since the last.
    pub async fn checkpoint<S: LedgerStore>(&mut self, signer: &SignerKey, store: &S) -> Result<Signed, crate::BillingError> {
        if let Some(last) = self.last.clone() {
            if last.checkpoint.size == self.tree.size() {
                assert_eq!(last.checkpoint.root, self.tree.root(), "same size, different root: the log was rewritten");
                return Ok(last);
            }
            self.assert_consistent_with(&last.checkpoint, store).await?;
        }
        let checkpoint = Checkpoint::new(signer.name(), self.tree.size(), self.tree.root());
        let note = checkpoint.sign(signer).map_err(|e| crate::BillingError::Internal(e.to_string()))?;
        let signed = Signed { checkpoint, note };
        self.last = Some(signed.clone());
        Ok(signed)
    }

    /// Refuses to go on from a log that does not extend `old`, a checkpoint signed before:
    /// [`crate::BillingError::LogRewritten`].
    pub async fn assert_consistent_with<S: LedgerStore>(&mut self, old: &Checkpoint, store: &S) -> Result<(), crate::BillingError> {
        self.extends(old, store).await?.map_err(crate::BillingError::LogRewritten)
    }

    /// Whether this view of the log extends checkpoint `old` (`Err(why)` if not). The outer
    /// error is the store's: a failed read, or tiles read back that are not the ones this view
    /// hashed ([`crate::BillingError::LogRewritten`]).
    pub async fn extends<S: LedgerStore>(&mut self, old: &Checkpoint, store: &S) -> Result<Result<(), String>, crate::BillingError> {
        if old.size > self.tree.size() {
            return Ok(Err(format!("the log has {} entries but checkpoint {} was signed: entries were lost", self.tree.size(), old.size)));
        }
        let root = self.ask(store, |tree, tiles| tree.root_at(old.size, tiles)).await?;
        if root != old.root {
            return Ok(Err(format!("the log at size {} does not match the checkpoint: history was rewritten", old.size)));
        }
        Ok(Ok(()))
    }

    /// Checks that `bytes`, read from the store as entry `index`, are the entry this view
    /// hashed; [`crate::BillingError::LogRewritten`] if not.
    pub async fn assert_entry<S: LedgerStore>(&mut self, index: u64, bytes: &[u8], store: &S) -> Result<(), crate::BillingError> {
        let leaf = self.ask(store, |tree, tiles| tree.leaf(index, tiles)).await?;
        if leaf != tokenomy_receipts::merkle::leaf_hash(bytes) {
            return Err(crate::BillingError::LogRewritten(format!("the ledger's log entry {index} is not the one this node read")));
        }
        Ok(())
    }

    pub async fn inclusion_proof<S: LedgerStore>(&mut self, index: u64, size: u64, store: &S) -> Result<Vec<Hash>, crate::BillingError> {
        self.ask(store, |tree, tiles| tree.inclusion_proof(index, size, tiles)).await
    }

    pub async fn consistency_proof<S: LedgerStore>(&mut self, old: u64, new: u64, store: &S) -> Result<Vec<Hash>, crate::BillingError> {
        self.ask(store, |tree, tiles| tree.consistency_proof(old, new, tiles)).await
    }

    /// Asks the tree with the tiles kept; if it names others, reads their entries from the
    /// store and asks again (the tree checks them against the tile roots it holds).
    async fn ask<S: LedgerStore, T>(
        &mut self,
        store: &S,
        ask: impl Fn(&TiledTree, &Tiles) -> Result<T, TiledError>,
    ) -> Result<T, crate::BillingError> {
        let mut read = false;
        loop {
            match ask(&self.tree, &self.tiles.tiles) {
                Ok(answer) => return Ok(answer),
                Err(TiledError::NeedTiles(needed)) if !read => {
                    for t in needed {
                        let tile = read_tile(store, t).await?;
                        self.tiles.insert(t, tile);
                    }
                    read = true;
                }
                Err(TiledError::NeedTiles(needed)) => unreachable!("the tree asked again for tiles {needed:?}"),
                Err(TiledError::TileMismatch(t)) => {
                    self.tiles.remove(t);
                    let (from, to) = (t * TILE_LEAVES, t * TILE_LEAVES + TILE_LEAVES - 1);
                    return Err(crate::BillingError::LogRewritten(format!("the ledger's log entries {from}..={to} are not the ones this node read")));
                }
                Err(TiledError::Proof(e)) => return Err(crate::BillingError::Invalid(e.to_string())),
            }
        }
    }

    /// Reads a checkpoint note we signed, checking our own signature.
    pub fn open_signed(note: &str, key: &VerifierKey) -> Result<Signed, String> {
        let checkpoint = Checkpoint::open(note, key).map_err(|e| format!("stored checkpoint: {e}"))?;
        Ok(Signed { checkpoint, note: note.to_string() })
    }
}

/// Tile `t` of the log, read from the store.
async fn read_tile<S: LedgerStore>(store: &S, t: u64) -> Result<Tile, crate::BillingError> {
    let from = t * TILE_LEAVES;
    let entries = store.log_entries(from, TILE_LEAVES as u32).await?;
    if entries.len() as u64 != TILE_LEAVES {
        let why = format!("the ledger's log has {} entries from {from}, where this node read {TILE_LEAVES}", entries.len());
        return Err(crate::BillingError::LogRewritten(why));
    }
    if let Some((e, i)) = entries.iter().zip(from..).find(|(e, i)| e.log_index != *i) {
        let why = format!("the ledger's log has entry {} where this node read entry {i}", e.log_index);
        return Err(crate::BillingError::LogRewritten(why));
    }
    let leaves: Vec<Hash> = entries.iter().map(|e| tokenomy_receipts::merkle::leaf_hash(&e.leaf_bytes)).collect();
    Ok(Tile::new(&leaves).expect("a tile's worth of entries"))
}
