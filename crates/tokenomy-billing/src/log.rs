//! The node's view of its receipts log: an in-memory Merkle tree that mirrors the durable log
//! in the ledger store (the store is the truth; the tree is rebuilt from it at start and
//! caught up before every proof), an index from receipt id to log position, and the last
//! checkpoint this node signed.
//!
//! Architecture Invariant: the node never signs two inconsistent checkpoints. Every new
//! checkpoint is checked against the last one signed (kept in `DATA_DIR/checkpoint`, so the
//! rule survives restarts): the tree at the old size must have the old root.

use std::collections::HashMap;

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

/// A receipt id as the log view keeps it: `rcpt_` and 32 hex digits (every id this node
/// mints: a random one, or its request's UUID) as the number they spell, 16 bytes where the
/// text would take a 24-byte `String` and a 37-byte allocation; any other id as its text.
/// (Memory per logged receipt is what bounds the view: see `docs/benchmarks.md`.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ReceiptKey {
    Hex(u128),
    Text(Box<str>),
}

impl ReceiptKey {
    fn of(id: &str) -> ReceiptKey {
        let hex = id.strip_prefix("rcpt_").filter(|h| h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        match hex.and_then(|h| u128::from_str_radix(h, 16).ok()) {
            Some(n) => ReceiptKey::Hex(n),
            None => ReceiptKey::Text(id.into()),
        }
    }

    fn id(&self) -> String {
        match self {
            ReceiptKey::Hex(n) => format!("rcpt_{n:032x}"),
            ReceiptKey::Text(t) => t.to_string(),
        }
    }
}

#[derive(Debug)]
pub struct LogState {
    tree: Tree,
    /// receipt id → (log index, account).
    index: HashMap<ReceiptKey, (u64, AccountId)>,
    /// ledger transfer → receipt id.
    by_transfer: HashMap<TransferId, ReceiptKey>,
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
        LogState { tree: Tree::new(), index: HashMap::new(), by_transfer: HashMap::new(), last, usage, tail: None }
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
        self.tree.push_data(&e.leaf_bytes);
        let key = ReceiptKey::of(&r.receipt_id);
        self.by_transfer.insert(e.transfer_id, key.clone());
        self.usage.add(e.account_id, &r);
        self.index.insert(key, (e.log_index, e.account_id));
        Ok(())
    }

    pub fn receipt_for_transfer(&self, t: TransferId) -> Option<String> {
        self.by_transfer.get(&t).map(ReceiptKey::id)
    }

    pub fn find(&self, receipt_id: &str) -> Option<(u64, AccountId)> {
        self.index.get(&ReceiptKey::of(receipt_id)).copied()
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

#[cfg(test)]
mod tests {
    use super::ReceiptKey;

    #[test]
    fn receipt_ids_are_kept_as_numbers_where_they_spell_one_and_read_back_as_given() {
        let hex = "rcpt_0123456789abcdef0123456789abcdef";
        assert_eq!(ReceiptKey::of(hex), ReceiptKey::Hex(0x0123456789abcdef0123456789abcdef));
        assert_eq!(ReceiptKey::of("rcpt_00000000000000000000000000000001").id(), "rcpt_00000000000000000000000000000001");
        // Upper case, other lengths, other prefixes: kept as text, so each reads back as it was.
        for id in ["rcpt_0123456789ABCDEF0123456789ABCDEF", "rcpt_0123", "rcpt_+123456789abcdef0123456789abcdef", "chatcmpl-1", ""] {
            let key = ReceiptKey::of(id);
            assert!(matches!(key, ReceiptKey::Text(_)), "{id}");
            assert_eq!(key.id(), id);
        }
        assert_eq!(ReceiptKey::of(hex).id(), hex);
    }
}
