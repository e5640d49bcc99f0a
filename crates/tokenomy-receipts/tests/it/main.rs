//! Integration tests: known-answer vectors, properties, snapshots.

mod bundle;
mod formats;
mod merkle;
mod note;
mod props;
mod receipt;
mod vectors;

use tokenomy_receipts::merkle::Hash;
use tokenomy_receipts::{Receipt, ReceiptKind, SignerKey};

pub fn h(hex_str: &str) -> Hash {
    hex::decode(hex_str).unwrap().try_into().unwrap()
}

pub fn hs(list: &[&str]) -> Vec<Hash> {
    list.iter().map(|s| h(s)).collect()
}

pub const ORIGIN: &str = "node.tokenomy.example/receipts";

pub fn node_key() -> SignerKey {
    SignerKey::from_seed(ORIGIN, &[42; 32]).unwrap()
}

/// A fixed, realistic usage receipt.
pub fn sample_receipt(log_index: u64) -> Receipt {
    Receipt {
        version: 1,
        origin: ORIGIN.to_owned(),
        receipt_id: format!("rcpt_{log_index:06}"),
        request_id: "req_01HZX3K9".to_owned(),
        account_id: "acct_alice".to_owned(),
        counterparty_id: String::new(),
        key_id: "key_7f3a".to_owned(),
        kind: ReceiptKind::Usage,
        model: "qwen2.5-0.5b-instruct q4_k_m".to_owned(),
        model_sha256: [0xab; 32],
        prompt_tokens: 1200,
        cached_tokens: 1024,
        completion_tokens: 350,
        reasoning_tokens: 0,
        price_input_micros_per_mtok: 150_000,
        price_cached_input_micros_per_mtok: 75_000,
        price_output_micros_per_mtok: 600_000,
        amount_micros: -313,
        transfer_id: "tx_000123".to_owned(),
        started_at_ms: 1_767_225_600_000,
        ended_at_ms: 1_767_225_601_250,
        request_sha256: [0x11; 32],
        output_sha256: [0x22; 32],
        log_index,
    }
}
