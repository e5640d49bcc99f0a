//! Canonical encoding: snapshot, round trip, strictness.

use crate::{node_key, sample_receipt};
use expect_test::expect;
use tokenomy_receipts::receipt::*;

#[test]
fn canonical_bytes_snapshot() {
    let bytes = sample_receipt(7).canonical_bytes().unwrap();
    expect![[r#"
        tokenomy-receipt/v1
        origin node.tokenomy.example/receipts
        receipt_id rcpt_000007
        request_id req_01HZX3K9
        account_id acct_alice
        key_id key_7f3a
        kind usage
        model qwen2.5-0.5b-instruct q4_k_m
        model_sha256 abababababababababababababababababababababababababababababababab
        prompt_tokens 1200
        cached_tokens 1024
        completion_tokens 350
        reasoning_tokens 0
        price_input_micros_per_mtok 150000
        price_cached_input_micros_per_mtok 75000
        price_output_micros_per_mtok 600000
        amount_micros -313
        transfer_id tx_000123
        started_at_ms 1767225600000
        ended_at_ms 1767225601250
        request_sha256 1111111111111111111111111111111111111111111111111111111111111111
        output_sha256 2222222222222222222222222222222222222222222222222222222222222222
        log_index 7
    "#]]
    .assert_eq(std::str::from_utf8(&bytes).unwrap());
}

#[test]
fn round_trip() {
    let r = sample_receipt(3);
    let bytes = r.canonical_bytes().unwrap();
    assert_eq!(Receipt::from_canonical_bytes(&bytes).unwrap(), r);
    assert_eq!(r.canonical_bytes().unwrap(), bytes, "deterministic");
}

#[test]
fn text_fields_may_hold_spaces_and_unicode_but_not_controls() {
    let mut r = sample_receipt(0);
    r.model = " spaced  model é ".into();
    r.transfer_id.clear();
    let bytes = r.canonical_bytes().unwrap();
    assert_eq!(Receipt::from_canonical_bytes(&bytes).unwrap(), r);
    r.model = "a\nkind mint".into();
    assert!(matches!(
        r.canonical_bytes(),
        Err(ReceiptError::InvalidField { field: "model", .. })
    ));
}

#[test]
fn non_canonical_spellings_are_refused() {
    let good = String::from_utf8(sample_receipt(5).canonical_bytes().unwrap()).unwrap();
    let variants = [
        good.replace("log_index 5\n", "log_index 05\n"),
        good.replace("log_index 5\n", "log_index +5\n"),
        good.replace("amount_micros -313\n", "amount_micros -0313\n"),
        good.replace("prompt_tokens 1200\n", "prompt_tokens  1200\n"),
        good.replace(&"ab".repeat(32), &"AB".repeat(32)),
        good.replace('\n', "\r\n"),
        good.replace("kind usage", "kind Usage"),
        good.replace("tokenomy-receipt/v1", "tokenomy-receipt/v2"),
        good.trim_end().to_owned(),
        format!("{good}extra 1\n"),
        format!("{good}\n"),
        good.replacen("origin", "receipt_id", 1),
    ];
    for v in variants {
        assert_ne!(v, good);
        assert!(Receipt::from_canonical_bytes(v.as_bytes()).is_err(), "{v}");
    }
}

#[test]
fn invariants_are_checked() {
    let mut r = sample_receipt(1);
    r.cached_tokens = r.prompt_tokens + 1;
    assert!(r.canonical_bytes().is_err());
    let mut r = sample_receipt(1);
    r.ended_at_ms = r.started_at_ms - 1;
    assert!(r.canonical_bytes().is_err());
    let mut r = sample_receipt(1);
    r.version = 3;
    assert_eq!(
        r.canonical_bytes(),
        Err(ReceiptError::UnsupportedVersion(3))
    );
}

#[test]
fn signature_is_domain_separated() {
    let key = node_key();
    let (bytes, sig) = sample_receipt(1).sign(&key).unwrap();
    assert!(verify_receipt_signature(&bytes, &sig, &key.verifier()));
    assert!(
        !key.verifier().verify(&bytes, &sig),
        "a bare signature over the bytes must differ"
    );
}

/// A transfer's receipt is v2: one more line, `counterparty_id`, after `account_id`; a receipt
/// has a counterparty exactly when it is v2, so each still has one encoding.
#[test]
fn a_transfer_receipt_is_v2_and_names_its_counterparty() {
    let t = Receipt {
        version: RECEIPT_VERSION_COUNTERPARTY,
        kind: ReceiptKind::Transfer,
        counterparty_id: "acct_bob".into(),
        model: String::new(),
        ..sample_receipt(9)
    };
    let bytes = t.canonical_bytes().unwrap();
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(text.starts_with("tokenomy-receipt/v2\norigin node.tokenomy.example/receipts\nreceipt_id rcpt_000009\nrequest_id req_01HZX3K9\naccount_id acct_alice\ncounterparty_id acct_bob\nkey_id key_7f3a\n"), "{text}");
    assert_eq!(Receipt::from_canonical_bytes(&bytes).unwrap(), t);
    // Another counterparty is another receipt (its signature no longer matches).
    let (_, sig) = t.sign(&node_key()).unwrap();
    let moved = text.replace("counterparty_id acct_bob", "counterparty_id acct_eve");
    assert!(!verify_receipt_signature(moved.as_bytes(), &sig, &node_key().verifier()));
    assert_eq!(Receipt::from_canonical_bytes(moved.as_bytes()).unwrap().first_difference(&t), Some("counterparty_id"));
    // v1 with a counterparty, or v2 without one, has no encoding; v1 bytes with the line don't decode.
    assert!(Receipt { version: RECEIPT_VERSION, ..t.clone() }.canonical_bytes().is_err());
    assert!(Receipt { counterparty_id: String::new(), ..t.clone() }.canonical_bytes().is_err());
    assert!(Receipt::from_canonical_bytes(text.replacen("/v2", "/v1", 1).as_bytes()).is_err());
    let without = text.replace("counterparty_id acct_bob\n", "");
    assert!(Receipt::from_canonical_bytes(without.as_bytes()).is_err());
    // A usage receipt's bytes are unchanged (v1).
    assert!(sample_receipt(9).canonical_bytes().unwrap().starts_with(b"tokenomy-receipt/v1\n"));
}
