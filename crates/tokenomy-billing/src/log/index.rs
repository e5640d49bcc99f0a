//! Where each logged receipt is, by receipt id and by ledger transfer, in about 60 bytes per
//! entry (besides the Merkle tree's 64): one row per log index in plain vectors, and two hash
//! tables that hold only log indexes, hashed from those rows. Two `HashMap`s keyed by id
//! (`receipt id → (index, account)`, `transfer → receipt id`) took ~260 bytes per entry, and
//! the view holds every entry of the log (see `docs/benchmarks.md`).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use tokenomy_ledger::{AccountId, TransferId};

/// A receipt id as the index keeps it: `rcpt_` and 32 hex digits (every id this node mints: a
/// random one, or its request's UUID) as the number they spell; any other id as its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ReceiptKey<'a> {
    Hex(u128),
    Text(&'a str),
}

impl<'a> ReceiptKey<'a> {
    fn of(id: &'a str) -> ReceiptKey<'a> {
        let hex = id.strip_prefix("rcpt_").filter(|h| h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        match hex.and_then(|h| u128::from_str_radix(h, 16).ok()) {
            Some(n) => ReceiptKey::Hex(n),
            None => ReceiptKey::Text(id),
        }
    }

    fn id(&self) -> String {
        match self {
            ReceiptKey::Hex(n) => format!("rcpt_{n:032x}"),
            ReceiptKey::Text(t) => t.to_string(),
        }
    }
}

/// The rows, by log index.
#[derive(Debug, Default)]
struct Rows {
    /// The receipt id's number; 0 where the id is text (in `texts`).
    receipt: Vec<u128>,
    /// The receipt ids that are not `rcpt_` + 32 hex digits, by log index (none that this
    /// node mints).
    texts: HashMap<u64, Box<str>>,
    transfer: Vec<TransferId>,
    /// The account, as its place in `ReceiptIndex::accounts`.
    account: Vec<u32>,
}

impl Rows {
    fn key(&self, i: u64) -> ReceiptKey<'_> {
        match self.texts.get(&i) {
            Some(t) => ReceiptKey::Text(t),
            None => ReceiptKey::Hex(self.receipt[i as usize]),
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct ReceiptIndex {
    rows: Rows,
    /// Every account with a receipt, once (many receipts share few accounts).
    accounts: Vec<AccountId>,
    account_places: HashMap<AccountId, u32>,
    /// Log indexes, hashed by their row's receipt id.
    by_receipt: HashTable<u64>,
    /// Log indexes, hashed by their row's transfer.
    by_transfer: HashTable<u64>,
    /// Keyed (SipHash): receipt ids can come from clients' request ids.
    hasher: RandomState,
}

impl ReceiptIndex {
    pub(super) fn len(&self) -> u64 {
        self.rows.receipt.len() as u64
    }

    /// Adds the entry at log index [`len`](Self::len). A receipt id or transfer logged twice
    /// is found at its latest entry.
    pub(super) fn push(&mut self, receipt_id: &str, transfer: TransferId, account: AccountId) -> Result<(), String> {
        let i = self.len();
        let place = self.account_place(account)?;
        let key = ReceiptKey::of(receipt_id);
        let Self { rows, by_receipt, by_transfer, hasher, .. } = self;
        rows.receipt.push(match key {
            ReceiptKey::Hex(n) => n,
            ReceiptKey::Text(t) => {
                rows.texts.insert(i, t.into());
                0
            }
        });
        rows.transfer.push(transfer);
        rows.account.push(place);
        let rows = &*rows;
        let (hash, eq) = (hasher.hash_one(key), |&j: &u64| rows.key(j) == key);
        point_at(by_receipt.entry(hash, eq, |&j| hasher.hash_one(rows.key(j))), i);
        let (hash, eq) = (hasher.hash_one(transfer), |&j: &u64| rows.transfer[j as usize] == transfer);
        point_at(by_transfer.entry(hash, eq, |&j| hasher.hash_one(rows.transfer[j as usize])), i);
        Ok(())
    }

    fn account_place(&mut self, account: AccountId) -> Result<u32, String> {
        if let Some(&p) = self.account_places.get(&account) {
            return Ok(p);
        }
        let p = u32::try_from(self.accounts.len()).map_err(|_| "more than 2^32 accounts with receipts".to_string())?;
        self.accounts.push(account);
        self.account_places.insert(account, p);
        Ok(p)
    }

    /// The log index and account of a receipt.
    pub(super) fn find(&self, receipt_id: &str) -> Option<(u64, AccountId)> {
        let key = ReceiptKey::of(receipt_id);
        let i = *self.by_receipt.find(self.hasher.hash_one(key), |&j| self.rows.key(j) == key)?;
        Some((i, self.accounts[self.rows.account[i as usize] as usize]))
    }

    /// The id of a transfer's receipt.
    pub(super) fn receipt_for_transfer(&self, t: TransferId) -> Option<String> {
        let i = *self.by_transfer.find(self.hasher.hash_one(t), |&j| self.rows.transfer[j as usize] == t)?;
        Some(self.rows.key(i).id())
    }
}

/// Points a table's entry at log index `i`: a new one, or one found (a key logged again).
fn point_at(entry: hashbrown::hash_table::Entry<'_, u64>, i: u64) {
    match entry {
        hashbrown::hash_table::Entry::Occupied(mut o) => *o.get_mut() = i,
        hashbrown::hash_table::Entry::Vacant(v) => {
            v.insert(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The index against the two maps it replaced, over ids of both forms (the zero id too,
    /// whose number is the text ids' placeholder), repeated ids and transfers, and enough
    /// entries that both tables grow many times.
    #[test]
    fn finds_what_two_maps_would() {
        let mut index = ReceiptIndex::default();
        let mut by_id: HashMap<String, (u64, AccountId)> = HashMap::new();
        let mut by_transfer: HashMap<TransferId, String> = HashMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000u64 {
            let r = next();
            let id = match r % 10 {
                0 => format!("req-{}", r % 300), // text, often repeated
                1 => "rcpt_00000000000000000000000000000000".to_string(),
                2 => format!("rcpt_{:032x}", r % 500), // repeated
                _ => format!("rcpt_{:016x}{:016x}", r, next()),
            };
            let transfer = TransferId(u128::from(if r % 7 == 0 { r % 100 } else { next() }));
            let account = AccountId(u128::from(r % 37));
            index.push(&id, transfer, account).unwrap();
            by_transfer.insert(transfer, id.clone());
            by_id.insert(id, (i, account));
        }
        assert_eq!(index.len(), 20_000);
        for (id, want) in &by_id {
            assert_eq!(index.find(id), Some(*want), "{id}");
        }
        for (t, want) in &by_transfer {
            assert_eq!(index.receipt_for_transfer(*t).as_ref(), Some(want), "{t:?}");
        }
        assert_eq!(index.find("rcpt_ffffffffffffffffffffffffffffffff"), None);
        assert_eq!(index.find("req-301"), None);
        assert_eq!(index.receipt_for_transfer(TransferId(u128::MAX)), None);
    }
}
