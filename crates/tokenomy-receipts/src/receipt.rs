//! Usage receipts and their canonical bytes.
//!
//! # Canonical encoding (`tokenomy-receipt/v1`)
//!
//! UTF-8 text, one line per field, every line ending in a single `\n` (no `\r`), in exactly
//! this order:
//!
//! ```text
//! tokenomy-receipt/v1
//! origin <text>
//! receipt_id <text>
//! request_id <text>
//! account_id <text>
//! key_id <text>
//! kind <usage|mint|transfer|refund>
//! model <text>
//! model_sha256 <hex64>
//! prompt_tokens <u64>
//! cached_tokens <u64>
//! completion_tokens <u64>
//! reasoning_tokens <u64>
//! price_input_micros_per_mtok <u64>
//! price_cached_input_micros_per_mtok <u64>
//! price_output_micros_per_mtok <u64>
//! amount_micros <i64>
//! transfer_id <text>
//! started_at_ms <u64>
//! ended_at_ms <u64>
//! request_sha256 <hex64>
//! output_sha256 <hex64>
//! log_index <u64>
//! ```
//!
//! * Each field line is `name`, one space (U+0020), then the value; the value runs to `\n`.
//! * `<text>`: any Unicode text without control characters (U+0000–U+001F, U+007F–U+009F),
//!   possibly empty and possibly containing spaces, copied verbatim (no trimming or normalising).
//! * `<u64>` / `<i64>`: ASCII decimal, no `+`, no leading zeros, `-` only for negative i64
//!   (so `0`, never `-0`).
//! * `<hex64>`: 64 lowercase hex digits (32 bytes); all zeros when not applicable.
//! * `transfer_id` is empty when the receipt records no ledger transfer.
//!
//! # `tokenomy-receipt/v2`: money that moves between two accounts
//!
//! A mint or a transfer has two parties. Its receipt is `tokenomy-receipt/v2`: the v1 lines
//! with one more, `counterparty_id <text>` (never empty), right after `account_id`: the
//! account credited by a transfer (or debited by a mint: the treasury), so the log proves
//! where the credits went and the recipient can fetch the receipt too. A receipt without a
//! counterparty is always v1, so every receipt still has exactly one encoding.
//!
//! Encoding is a pure function of the [`Receipt`]; decoding refuses any byte string that is not
//! exactly the encoding of the receipt it decodes to, so one receipt has one byte string.
//! The transparency-log leaf is these bytes (leaf hash `SHA-256(0x00 || bytes)`). The receipt
//! signature is Ed25519 over [`SIGNATURE_CONTEXT`] `||` bytes, so a receipt signature can never
//! be confused with a note or checkpoint signature made by the same key.

use crate::note::{SignerKey, VerifierKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// The receipt format version of a receipt with no counterparty (usage).
pub const RECEIPT_VERSION: u32 = 1;
/// The version of a receipt with a counterparty (mints and transfers).
pub const RECEIPT_VERSION_COUNTERPARTY: u32 = 2;
/// The domain-separation prefix of the receipt signature message.
pub const SIGNATURE_CONTEXT: &[u8] = b"tokenomy-receipt-signature/v1\n";

/// Why a receipt could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReceiptError {
    #[error("unsupported receipt version {0}")]
    UnsupportedVersion(u32),
    #[error("field {field}: {reason}")]
    InvalidField {
        field: &'static str,
        reason: &'static str,
    },
    #[error("receipt bytes are malformed: {0}")]
    Malformed(&'static str),
    #[error("receipt bytes are not in canonical form")]
    NonCanonical,
}

/// What a receipt bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptKind {
    /// Tokens served and charged to an account.
    Usage,
    /// Credit created by the node operator.
    Mint,
    /// Credit moved between accounts.
    Transfer,
    /// A usage charge given back (in whole or in part) from operator revenue.
    Refund,
}

impl ReceiptKind {
    /// The canonical spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptKind::Usage => "usage",
            ReceiptKind::Mint => "mint",
            ReceiptKind::Transfer => "transfer",
            ReceiptKind::Refund => "refund",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [ReceiptKind::Usage, ReceiptKind::Mint, ReceiptKind::Transfer, ReceiptKind::Refund]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl fmt::Display for ReceiptKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One billed event. Hashes are shown as lowercase hex in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Format version; must be [`RECEIPT_VERSION`].
    pub version: u32,
    /// The node's name: the origin of its transparency log.
    pub origin: String,
    pub receipt_id: String,
    pub request_id: String,
    pub account_id: String,
    /// The other party of a mint or transfer (v2 receipts only; empty in v1).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub counterparty_id: String,
    /// The API key that made the request.
    pub key_id: String,
    pub kind: ReceiptKind,
    pub model: String,
    #[serde(with = "hex32")]
    pub model_sha256: [u8; 32],
    pub prompt_tokens: u64,
    /// Prompt tokens served from cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_tokens: u64,
    pub price_input_micros_per_mtok: u64,
    pub price_cached_input_micros_per_mtok: u64,
    pub price_output_micros_per_mtok: u64,
    /// Signed ledger amount in micro-units (negative for a debit).
    pub amount_micros: i64,
    /// Ledger transfer this receipt records; may be empty.
    pub transfer_id: String,
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    #[serde(with = "hex32")]
    pub request_sha256: [u8; 32],
    #[serde(with = "hex32")]
    pub output_sha256: [u8; 32],
    /// Index of this receipt's leaf in the node's transparency log.
    pub log_index: u64,
}

mod hex32 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        super::parse_hex32(&s).ok_or_else(|| D::Error::custom("expected 64 lowercase hex digits"))
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The field names, in canonical order.
pub const FIELD_NAMES: [&str; 22] = [
    "origin",
    "receipt_id",
    "request_id",
    "account_id",
    "key_id",
    "kind",
    "model",
    "model_sha256",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "price_input_micros_per_mtok",
    "price_cached_input_micros_per_mtok",
    "price_output_micros_per_mtok",
    "amount_micros",
    "transfer_id",
    "started_at_ms",
    "ended_at_ms",
    "request_sha256",
    "output_sha256",
    "log_index",
];

fn is_clean_text(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

impl Receipt {
    /// The fields of this receipt's version, named, in canonical order.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields: Vec<(&'static str, String)> = FIELD_NAMES.iter().copied().zip(self.field_values()).collect();
        if self.version == RECEIPT_VERSION_COUNTERPARTY {
            fields.insert(4, ("counterparty_id", self.counterparty_id.clone()));
        }
        fields
    }

    /// Each v1 field's canonical value, in [`FIELD_NAMES`] order.
    fn field_values(&self) -> [String; 22] {
        [
            self.origin.clone(),
            self.receipt_id.clone(),
            self.request_id.clone(),
            self.account_id.clone(),
            self.key_id.clone(),
            self.kind.as_str().to_owned(),
            self.model.clone(),
            hex::encode(self.model_sha256),
            self.prompt_tokens.to_string(),
            self.cached_tokens.to_string(),
            self.completion_tokens.to_string(),
            self.reasoning_tokens.to_string(),
            self.price_input_micros_per_mtok.to_string(),
            self.price_cached_input_micros_per_mtok.to_string(),
            self.price_output_micros_per_mtok.to_string(),
            self.amount_micros.to_string(),
            self.transfer_id.clone(),
            self.started_at_ms.to_string(),
            self.ended_at_ms.to_string(),
            hex::encode(self.request_sha256),
            hex::encode(self.output_sha256),
            self.log_index.to_string(),
        ]
    }

    /// Checks the invariants the encoding and the ledger rely on.
    pub fn validate(&self) -> Result<(), ReceiptError> {
        match (self.version, self.counterparty_id.is_empty()) {
            (RECEIPT_VERSION, true) | (RECEIPT_VERSION_COUNTERPARTY, false) => {}
            (RECEIPT_VERSION, false) => return Err(ReceiptError::InvalidField { field: "counterparty_id", reason: "only in v2 receipts" }),
            (RECEIPT_VERSION_COUNTERPARTY, true) => return Err(ReceiptError::InvalidField { field: "counterparty_id", reason: "must not be empty" }),
            (v, _) => return Err(ReceiptError::UnsupportedVersion(v)),
        }
        let texts = [
            ("origin", &self.origin),
            ("receipt_id", &self.receipt_id),
            ("request_id", &self.request_id),
            ("account_id", &self.account_id),
            ("counterparty_id", &self.counterparty_id),
            ("key_id", &self.key_id),
            ("model", &self.model),
            ("transfer_id", &self.transfer_id),
        ];
        if let Some((field, _)) = texts.iter().find(|(_, v)| !is_clean_text(v)) {
            return Err(ReceiptError::InvalidField {
                field,
                reason: "control character",
            });
        }
        self.validate_semantics()
    }

    fn validate_semantics(&self) -> Result<(), ReceiptError> {
        let invalid = |field, reason| Err(ReceiptError::InvalidField { field, reason });
        if self.origin.is_empty() {
            return invalid("origin", "must not be empty");
        }
        if self.receipt_id.is_empty() {
            return invalid("receipt_id", "must not be empty");
        }
        if self.cached_tokens > self.prompt_tokens {
            return invalid("cached_tokens", "exceeds prompt_tokens");
        }
        if self.ended_at_ms < self.started_at_ms {
            return invalid("ended_at_ms", "is before started_at_ms");
        }
        Ok(())
    }

    /// The canonical bytes (see the module docs). Fails if [`Receipt::validate`] fails.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, ReceiptError> {
        self.validate()?;
        let mut out = format!("tokenomy-receipt/v{}\n", self.version);
        for (name, value) in self.fields() {
            out.push_str(name);
            out.push(' ');
            out.push_str(&value);
            out.push('\n');
        }
        Ok(out.into_bytes())
    }

    /// Decodes canonical bytes; refuses anything that is not exactly a canonical encoding.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self, ReceiptError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ReceiptError::Malformed("not UTF-8"))?;
        let (version, mut lines) = FieldLines::new(text)?;
        let r = Self::from_lines(version, &mut lines)?;
        lines.finish()?;
        if r.canonical_bytes()? != bytes {
            return Err(ReceiptError::NonCanonical);
        }
        Ok(r)
    }

    fn from_lines(version: u32, l: &mut FieldLines<'_>) -> Result<Self, ReceiptError> {
        Ok(Self {
            version,
            origin: l.text("origin")?,
            receipt_id: l.text("receipt_id")?,
            request_id: l.text("request_id")?,
            account_id: l.text("account_id")?,
            counterparty_id: match version {
                RECEIPT_VERSION_COUNTERPARTY => l.text("counterparty_id")?,
                _ => String::new(),
            },
            key_id: l.text("key_id")?,
            kind: l.kind()?,
            model: l.text("model")?,
            model_sha256: l.hash("model_sha256")?,
            prompt_tokens: l.num("prompt_tokens")?,
            cached_tokens: l.num("cached_tokens")?,
            completion_tokens: l.num("completion_tokens")?,
            reasoning_tokens: l.num("reasoning_tokens")?,
            price_input_micros_per_mtok: l.num("price_input_micros_per_mtok")?,
            price_cached_input_micros_per_mtok: l.num("price_cached_input_micros_per_mtok")?,
            price_output_micros_per_mtok: l.num("price_output_micros_per_mtok")?,
            amount_micros: l.num("amount_micros")?,
            transfer_id: l.text("transfer_id")?,
            started_at_ms: l.num("started_at_ms")?,
            ended_at_ms: l.num("ended_at_ms")?,
            request_sha256: l.hash("request_sha256")?,
            output_sha256: l.hash("output_sha256")?,
            log_index: l.num("log_index")?,
        })
    }

    /// The name of the first field (in canonical order) where `self` and `other` differ.
    pub fn first_difference(&self, other: &Receipt) -> Option<&'static str> {
        if self.version != other.version {
            return Some("version");
        }
        let (a, b) = (self.fields(), other.fields());
        a.iter().zip(b.iter()).find(|(x, y)| x.1 != y.1).map(|(x, _)| x.0)
    }

    /// Signs the canonical bytes; returns `(canonical bytes, signature)`.
    pub fn sign(&self, signer: &SignerKey) -> Result<(Vec<u8>, [u8; 64]), ReceiptError> {
        let bytes = self.canonical_bytes()?;
        let sig = signer.sign(&signature_message(&bytes));
        Ok((bytes, sig))
    }
}

/// The message a receipt signature covers: [`SIGNATURE_CONTEXT`] `||` canonical bytes.
pub fn signature_message(canonical: &[u8]) -> Vec<u8> {
    [SIGNATURE_CONTEXT, canonical].concat()
}

/// Whether `signature` is `key`'s signature over these canonical bytes.
pub fn verify_receipt_signature(canonical: &[u8], signature: &[u8], key: &VerifierKey) -> bool {
    key.verify(&signature_message(canonical), signature)
}

/// A cursor over `name value` lines that expects names in order.
struct FieldLines<'a> {
    lines: std::str::Split<'a, char>,
}

impl<'a> FieldLines<'a> {
    /// The version the header names (one this crate reads), and the field lines after it.
    fn new(text: &'a str) -> Result<(u32, Self), ReceiptError> {
        let body = text
            .strip_suffix('\n')
            .ok_or(ReceiptError::Malformed("must end with a newline"))?;
        let mut lines = body.split('\n');
        match lines
            .next()
            .and_then(|h| h.strip_prefix("tokenomy-receipt/v"))
        {
            Some("1") => Ok((RECEIPT_VERSION, Self { lines })),
            Some("2") => Ok((RECEIPT_VERSION_COUNTERPARTY, Self { lines })),
            Some(v) => Err(v.parse().map_or(
                ReceiptError::Malformed("bad header"),
                ReceiptError::UnsupportedVersion,
            )),
            None => Err(ReceiptError::Malformed("missing tokenomy-receipt header")),
        }
    }

    fn value(&mut self, field: &'static str) -> Result<&'a str, ReceiptError> {
        let line = self
            .lines
            .next()
            .ok_or(ReceiptError::Malformed("missing field"))?;
        let (name, value) = line
            .split_once(' ')
            .ok_or(ReceiptError::Malformed("field line without a space"))?;
        if name != field {
            return Err(ReceiptError::InvalidField {
                field,
                reason: "missing or out of order",
            });
        }
        Ok(value)
    }

    fn text(&mut self, field: &'static str) -> Result<String, ReceiptError> {
        let v = self.value(field)?;
        if !is_clean_text(v) {
            return Err(ReceiptError::InvalidField {
                field,
                reason: "control character",
            });
        }
        Ok(v.to_owned())
    }

    fn num<T: std::str::FromStr>(&mut self, field: &'static str) -> Result<T, ReceiptError> {
        self.value(field)?
            .parse()
            .map_err(|_| ReceiptError::InvalidField {
                field,
                reason: "not a decimal integer in range",
            })
    }

    fn hash(&mut self, field: &'static str) -> Result<[u8; 32], ReceiptError> {
        parse_hex32(self.value(field)?).ok_or(ReceiptError::InvalidField {
            field,
            reason: "not 64 lowercase hex digits",
        })
    }

    fn kind(&mut self) -> Result<ReceiptKind, ReceiptError> {
        ReceiptKind::parse(self.value("kind")?).ok_or(ReceiptError::InvalidField {
            field: "kind",
            reason: "unknown kind",
        })
    }

    fn finish(mut self) -> Result<(), ReceiptError> {
        match self.lines.next() {
            None => Ok(()),
            Some(_) => Err(ReceiptError::Malformed("trailing lines")),
        }
    }
}
