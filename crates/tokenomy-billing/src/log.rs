//! The node's view of its receipts log: an in-memory Merkle tree that mirrors the durable log
//! in the ledger store (the store is the truth; the tree is rebuilt from it at start and
//! caught up before every proof), an index from receipt id to log position, and the last
//! checkpoint this node signed.
//!
//! Architecture Invariant: the node never signs two inconsistent checkpoints. Every new
//! checkpoint is checked against the last one signed (kept in `DATA_DIR/checkpoint`, so the
//! rule survives restarts): the tree at the old size must have the old root.

mod index;

use tokenomy_ledger::{AccountId, LedgerStore, LogEntry, Price, TransferId};
use tokenomy_receipts::{Checkpoint, Hash, Receipt, SignerKey, Tree, VerifierKey};

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
    tree: Tree,
    /// receipt id → (log index, account); ledger transfer → receipt id.
    index: index::ReceiptIndex,
    last: Option<Signed>,
    /// What each account was charged, by day and model, from the receipts read so far.
    usage: crate::usage::UsageBook,
    /// The entry at the end of the tree: each sync reads it again, so a store whose log went
    /// back (a restored backup, a failover to a replica that lost commits) is noticed.
    tail: Option<LogEntry>,
}

impl LogState {
    /// A log state that continues from `last`, a checkpoint signed before (if any); its usage
    /// reports price tokens at `reference` too.
    pub fn new(last: Option<Signed>, reference: Option<Price>) -> LogState {
        let usage = crate::usage::UsageBook::new(reference);
        LogState { tree: Tree::new(), index: Default::default(), last, usage, tail: None }
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
    pub fn checkpoint(&mut self, signer: &SignerKey) -> Result<Signed, String> {
        if let Some(last) = &self.last {
            if last.checkpoint.size == self.tree.size() {
                assert_eq!(last.checkpoint.root, self.tree.root(), "same size, different root: the log was rewritten");
                return Ok(last.clone());
            }
            self.assert_consistent_with(&last.checkpoint)?;
        }
        let checkpoint = Checkpoint::new(signer.name(), self.tree.size(), self.tree.root());
        let note = checkpoint.sign(signer).map_err(|e| e.to_string())?;
        let signed = Signed { checkpoint, note };
        self.last = Some(signed.clone());
        Ok(signed)
    }

    /// Refuses to go on from a log that does not extend a checkpoint we signed.
    pub fn assert_consistent_with(&self, old: &Checkpoint) -> Result<(), String> {
        if old.size > self.tree.size() {
            return Err(format!("the log has {} entries but checkpoint {} was signed: entries were lost", self.tree.size(), old.size));
        }
        let root: Hash = self.tree.root_at(old.size).map_err(|e| e.to_string())?;
        if root != old.root {
            return Err(format!("the log at size {} does not match the signed checkpoint: history was rewritten", old.size));
        }
        Ok(())
    }

    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, String> {
        self.tree.inclusion_proof(index, size).map_err(|e| e.to_string())
    }

    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, String> {
        self.tree.consistency_proof(old, new).map_err(|e| e.to_string())
    }

    /// Reads a checkpoint note we signed, checking our own signature.
    pub fn open_signed(note: &str, key: &VerifierKey) -> Result<Signed, String> {
        let checkpoint = Checkpoint::open(note, key).map_err(|e| format!("stored checkpoint: {e}"))?;
        Ok(Signed { checkpoint, note: note.to_string() })
    }
}
