//! Usage reports read from the receipts log: what each account was charged for, by UTC day,
//! model and API key, on every node of the ledger and since the ledger began.
//!
//! Why from the log: the log is the ledger's own record of every charge, shared by the nodes
//! of one ledger and read in full at each start, so a report built while reading it is durable
//! and ledger-wide without a table or a write on the charging path. It counts what was charged
//! (a usage receipt each) and given back (refund receipts); a free model's requests have no
//! receipt and are not in it.
//!
//! Memory: one bucket per account, UTC day, model and key that had a charge, and one per UTC day
//! and model for the ledger: never more than twice the log's receipts (whose ids the log view
//! already keeps).

use std::collections::{BTreeMap, HashMap};

use tokenomy_ledger::{AccountId, Price};
use tokenomy_receipts::{Receipt, ReceiptKind};

pub const DAY_MS: u64 = 86_400_000;

/// Totals of one bucket (or of many added up).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UsageTotals {
    /// Charged requests (usage receipts).
    pub requests: u64,
    pub prompt_tokens: u64,
    /// Of `prompt_tokens`, those served from cache.
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// Of `completion_tokens`, the reasoning ones.
    pub reasoning_tokens: u64,
    /// Micro-credits charged for them (usage receipts' debits).
    pub charged_micros: u64,
    /// Micro-credits given back by refunds posted that day (bucketed under no model).
    pub refunded_micros: u64,
    /// What the same tokens would have cost at the reference list price, rounded per request
    /// as a charge is (0 without a reference price).
    pub reference_micros: u64,
}

impl UsageTotals {
    pub fn add(&mut self, o: &UsageTotals) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.cached_tokens += o.cached_tokens;
        self.completion_tokens += o.completion_tokens;
        self.reasoning_tokens += o.reasoning_tokens;
        self.charged_micros += o.charged_micros;
        self.refunded_micros += o.refunded_micros;
        self.reference_micros += o.reference_micros;
    }

    /// One receipt's contribution, or `None` for a receipt that is not usage or a refund.
    fn of(r: &Receipt, reference: Option<Price>) -> Option<UsageTotals> {
        let debit = u64::try_from(r.amount_micros.checked_neg()?).ok();
        match r.kind {
            ReceiptKind::Usage => {
                let u = tokenomy_ledger::Usage::from_openai(r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.reasoning_tokens);
                let reference_micros = reference.map_or(0, |p| tokenomy_ledger::cost_micros(u, p).map_or(0, |c| c.max(0) as u64));
                Some(UsageTotals {
                    requests: 1,
                    prompt_tokens: r.prompt_tokens,
                    cached_tokens: r.cached_tokens,
                    completion_tokens: r.completion_tokens,
                    reasoning_tokens: r.reasoning_tokens,
                    charged_micros: debit.unwrap_or(0),
                    refunded_micros: 0,
                    reference_micros,
                })
            }
            ReceiptKind::Refund => Some(UsageTotals { refunded_micros: u64::try_from(r.amount_micros).unwrap_or(0), ..Default::default() }),
            ReceiptKind::Mint | ReceiptKind::Transfer => None,
        }
    }
}

/// A bucket's key: the UTC day (days since 1970-01-01), the model and the API key id (both ""
/// for refunds; the key "" in the ledger's book, which is not kept by key).
pub type BucketKey = (u32, String, String);

/// Usage per account (by day, model and key) and for the whole ledger (by day and model), built
/// receipt by receipt in log order.
#[derive(Debug, Default)]
pub struct UsageBook {
    reference: Option<Price>,
    accounts: HashMap<AccountId, BTreeMap<BucketKey, UsageTotals>>,
    ledger: BTreeMap<BucketKey, UsageTotals>,
}

impl UsageBook {
    pub fn new(reference: Option<Price>) -> UsageBook {
        UsageBook { reference, ..Default::default() }
    }

    /// Counts one logged receipt of `account` (a no-op for mints and transfers).
    pub fn add(&mut self, account: AccountId, r: &Receipt) {
        let Some(t) = UsageTotals::of(r, self.reference) else { return };
        let day = u32::try_from(r.ended_at_ms / DAY_MS).unwrap_or(u32::MAX);
        let (model, key) = match r.kind {
            ReceiptKind::Usage => (r.model.clone(), r.key_id.clone()),
            _ => Default::default(),
        };
        self.ledger.entry((day, model.clone(), String::new())).or_default().add(&t);
        self.accounts.entry(account).or_default().entry((day, model, key)).or_default().add(&t);
    }

    /// The buckets of `account` (the whole ledger for `None`) whose day is in `days`, in day,
    /// model, then key order.
    pub fn buckets(&self, account: Option<AccountId>, days: std::ops::RangeInclusive<u32>) -> Vec<(BucketKey, UsageTotals)> {
        let book = match account {
            Some(a) => match self.accounts.get(&a) {
                Some(b) => b,
                None => return Vec::new(),
            },
            None => &self.ledger,
        };
        let (from, to) = ((*days.start(), String::new(), String::new()), (days.end().saturating_add(1), String::new(), String::new()));
        if from > to {
            return Vec::new();
        }
        book.range(from..to).map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Every account's buckets whose day is in `days`, by account (in no particular order).
    pub fn buckets_by_account(&self, days: std::ops::RangeInclusive<u32>) -> Vec<(AccountId, BucketKey, UsageTotals)> {
        let each = |&a: &AccountId| self.buckets(Some(a), days.clone()).into_iter().map(move |(k, t)| (a, k, t));
        self.accounts.keys().flat_map(each).collect()
    }

    /// Everything `account` (the whole ledger for `None`) was charged, and the first day
    /// with a charge.
    pub fn totals(&self, account: Option<AccountId>) -> (UsageTotals, Option<u32>) {
        let book = match account {
            Some(a) => self.accounts.get(&a),
            None => Some(&self.ledger),
        };
        let mut t = UsageTotals::default();
        book.into_iter().flat_map(|b| b.values()).for_each(|b| t.add(b));
        (t, book.and_then(|b| b.keys().next()).map(|(day, _, _)| *day))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(kind: ReceiptKind, model: &str, ended_at_ms: u64, amount_micros: i64, tokens: (u64, u64, u64)) -> Receipt {
        keyed(kind, model, "k1", ended_at_ms, amount_micros, tokens)
    }

    fn keyed(kind: ReceiptKind, model: &str, key: &str, ended_at_ms: u64, amount_micros: i64, tokens: (u64, u64, u64)) -> Receipt {
        Receipt {
            version: tokenomy_receipts::receipt::RECEIPT_VERSION,
            origin: "node".into(),
            receipt_id: format!("rcpt_{ended_at_ms}"),
            request_id: String::new(),
            account_id: String::new(),
            counterparty_id: String::new(),
            key_id: key.into(),
            kind,
            model: model.into(),
            model_sha256: [0; 32],
            prompt_tokens: tokens.0,
            cached_tokens: tokens.1,
            completion_tokens: tokens.2,
            reasoning_tokens: 0,
            price_input_micros_per_mtok: 0,
            price_cached_input_micros_per_mtok: 0,
            price_output_micros_per_mtok: 0,
            amount_micros,
            transfer_id: String::new(),
            started_at_ms: ended_at_ms,
            ended_at_ms,
            request_sha256: [0; 32],
            output_sha256: [0; 32],
            log_index: 0,
        }
    }

    #[test]
    fn usage_is_bucketed_by_account_day_and_model_and_refunds_by_day() {
        let reference = Price { input_micros_per_mtok: 1_000_000, cached_input_micros_per_mtok: 500_000, output_micros_per_mtok: 2_000_000 };
        let mut book = UsageBook::new(Some(reference));
        let (a, b) = (AccountId(10), AccountId(11));
        let day = 20_000 * DAY_MS;
        book.add(a, &receipt(ReceiptKind::Usage, "smollm2", day + 5, -7, (10, 4, 3)));
        book.add(a, &keyed(ReceiptKind::Usage, "smollm2", "k2", day + DAY_MS - 1, -5, (2, 0, 1)));
        book.add(a, &receipt(ReceiptKind::Usage, "qwen", day + DAY_MS, -9, (1, 0, 1)));
        book.add(a, &receipt(ReceiptKind::Refund, "", day + DAY_MS + 1, 5, (0, 0, 0)));
        book.add(a, &receipt(ReceiptKind::Mint, "", day, 1_000, (0, 0, 0)));
        book.add(b, &receipt(ReceiptKind::Usage, "smollm2", day, -1, (1, 0, 0)));
        book.add(b, &receipt(ReceiptKind::Transfer, "", day, -3, (0, 0, 0)));

        let days = book.buckets(Some(a), 20_000..=20_001);
        let keys: Vec<_> = days.iter().map(|(k, _)| k.clone()).collect();
        let k = |day: u32, model: &str, key: &str| (day, model.to_string(), key.to_string());
        assert_eq!(keys, [k(20_000, "smollm2", "k1"), k(20_000, "smollm2", "k2"), k(20_001, "", ""), k(20_001, "qwen", "k1")]);
        let (first, second) = (days[0].1, days[1].1);
        assert_eq!((first.requests, first.prompt_tokens, first.cached_tokens, first.completion_tokens, first.charged_micros), (1, 10, 4, 3, 7));
        assert_eq!((second.requests, second.prompt_tokens, second.charged_micros), (1, 2, 5));
        // Reference cost per request, rounded up as charges are: 6 + 2 + 6 = 14, then 2 + 2 = 4.
        assert_eq!((first.reference_micros, second.reference_micros), (14, 4));
        assert_eq!(days[2].1, UsageTotals { refunded_micros: 5, ..Default::default() });
        assert_eq!(book.buckets(Some(a), 20_001..=20_001).len(), 2, "a range of one day");
        let ledger: Vec<_> = book.buckets(None, 20_000..=20_000).into_iter().map(|(k, t)| (k, t.requests)).collect();
        assert_eq!(ledger, [(k(20_000, "smollm2", ""), 3)], "the ledger's book is by day and model only");
        assert!(book.buckets(Some(a), 19_000..=19_999).is_empty() && book.buckets(Some(AccountId(99)), 0..=u32::MAX).is_empty());
        let mut by_account: Vec<_> = book.buckets_by_account(20_000..=20_000).into_iter().map(|(acc, k, t)| (acc, k, t.requests)).collect();
        by_account.sort();
        assert_eq!(by_account, [(a, k(20_000, "smollm2", "k1"), 1), (a, k(20_000, "smollm2", "k2"), 1), (b, k(20_000, "smollm2", "k1"), 1)]);

        let (all, first_day) = book.totals(Some(a));
        assert_eq!((all.requests, all.charged_micros, all.refunded_micros, first_day), (3, 21, 5, Some(20_000)));
        let (ledger, _) = book.totals(None);
        assert_eq!((ledger.requests, ledger.charged_micros, ledger.prompt_tokens), (4, 22, 14), "every account's usage, no mints or transfers");
        assert_eq!(book.totals(Some(AccountId(99))), (UsageTotals::default(), None));
    }
}
