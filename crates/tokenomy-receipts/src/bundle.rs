//! The receipt bundle: the JSON document `GET /v1/receipts/{id}` returns, and its verifier.
//!
//! ```json
//! { "receipt":   { ...readable fields... },
//!   "canonical": "<base64 canonical bytes>",
//!   "signature": "<base64 Ed25519 signature over the domain-separated canonical bytes>",
//!   "key":       "<note verifier key string of the node>",
//!   "proof":     "<c2sp.org/tlog-proof@v1 text>" }
//! ```
//!
//! The readable `receipt` is a convenience; the canonical bytes are what is signed and logged,
//! and [`verify_bundle`] insists that the two agree field by field.

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::merkle::{self, Hash, ProofError};
use crate::note::VerifierKey;
use crate::proof::{TlogProof, TlogProofError};
use crate::receipt::{verify_receipt_signature, Receipt, ReceiptError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The JSON bundle for one receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBundle {
    pub receipt: Receipt,
    /// base64 of the canonical bytes.
    pub canonical: String,
    /// base64 of the 64-byte Ed25519 signature.
    pub signature: String,
    /// The node's verifier key string.
    pub key: String,
    /// The tlog-proof text for leaf = canonical bytes.
    pub proof: String,
}

impl ReceiptBundle {
    /// Assembles a bundle from parts the node already has.
    pub fn new(
        receipt: Receipt,
        canonical: &[u8],
        signature: &[u8; 64],
        key: &VerifierKey,
        proof: &TlogProof,
    ) -> Self {
        Self {
            receipt,
            canonical: B64.encode(canonical),
            signature: B64.encode(signature),
            key: key.to_string(),
            proof: proof.format(),
        }
    }

    /// The JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a bundle always serialises")
    }
}

/// A receipt whose bundle verified, with the checkpoint that includes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReceipt {
    pub receipt: Receipt,
    pub canonical: Vec<u8>,
    /// RFC 6962 leaf hash of the canonical bytes.
    pub leaf_hash: Hash,
    /// The signed checkpoint the inclusion proof was checked against.
    pub checkpoint: Checkpoint,
}

/// Exactly what failed while verifying a bundle or a pair of checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    #[error("bundle is not valid JSON of the expected shape: {0}")]
    MalformedJson(String),
    #[error("bundle key {found:?} is not the trusted key {expected:?}")]
    KeyMismatch { expected: String, found: String },
    #[error("canonical bytes are not valid base64")]
    MalformedCanonical,
    #[error("canonical bytes do not decode to a receipt: {0}")]
    NonCanonicalReceipt(ReceiptError),
    #[error("signature is not 64 bytes of base64")]
    MalformedSignature,
    #[error("receipt signature does not verify")]
    Signature,
    #[error("readable field {0} does not match the canonical bytes")]
    FieldMismatch(&'static str),
    #[error("tlog proof is malformed: {0}")]
    MalformedProof(TlogProofError),
    #[error("proof index {proof} is not the receipt's log_index {receipt}")]
    LogIndexMismatch { receipt: u64, proof: u64 },
    /// (Its own message says what failed: the note's form, signature or origin.)
    #[error("{0}")]
    CheckpointSignature(CheckpointError),
    #[error("checkpoint origin {checkpoint:?} is not the receipt origin {receipt:?}")]
    OriginMismatch { receipt: String, checkpoint: String },
    #[error("inclusion proof does not verify: {0}")]
    Inclusion(ProofError),
    #[error("consistency proof does not verify: {0}")]
    Consistency(ProofError),
}

/// Verifies a bundle against the trusted node key: signature over the canonical bytes, every
/// readable field, the log index, the checkpoint signature, and inclusion of the canonical
/// bytes at `log_index` in that checkpoint's tree.
pub fn verify_bundle(json: &str, key: &VerifierKey) -> Result<VerifiedReceipt, VerifyError> {
    let bundle: ReceiptBundle =
        serde_json::from_str(json).map_err(|e| VerifyError::MalformedJson(e.to_string()))?;
    let expected_key = key.to_string();
    if bundle.key != expected_key {
        return Err(VerifyError::KeyMismatch {
            expected: expected_key,
            found: bundle.key,
        });
    }
    let (receipt, canonical) = verify_signed_receipt(&bundle, key)?;
    if let Some(field) = bundle.receipt.first_difference(&receipt) {
        return Err(VerifyError::FieldMismatch(field));
    }
    let (checkpoint, leaf_hash) = verify_inclusion(&bundle.proof, &receipt, &canonical, key)?;
    Ok(VerifiedReceipt {
        receipt,
        canonical,
        leaf_hash,
        checkpoint,
    })
}

/// Decodes the canonical bytes and checks the receipt signature over them.
fn verify_signed_receipt(
    bundle: &ReceiptBundle,
    key: &VerifierKey,
) -> Result<(Receipt, Vec<u8>), VerifyError> {
    let canonical = B64
        .decode(&bundle.canonical)
        .map_err(|_| VerifyError::MalformedCanonical)?;
    let signature = B64
        .decode(&bundle.signature)
        .map_err(|_| VerifyError::MalformedSignature)?;
    if signature.len() != 64 {
        return Err(VerifyError::MalformedSignature);
    }
    if !verify_receipt_signature(&canonical, &signature, key) {
        return Err(VerifyError::Signature);
    }
    let receipt =
        Receipt::from_canonical_bytes(&canonical).map_err(VerifyError::NonCanonicalReceipt)?;
    Ok((receipt, canonical))
}

/// Checks the tlog proof: index, checkpoint signature and origin, then inclusion.
fn verify_inclusion(
    proof_text: &str,
    receipt: &Receipt,
    canonical: &[u8],
    key: &VerifierKey,
) -> Result<(Checkpoint, Hash), VerifyError> {
    let proof = TlogProof::parse(proof_text).map_err(VerifyError::MalformedProof)?;
    if proof.index != receipt.log_index {
        return Err(VerifyError::LogIndexMismatch {
            receipt: receipt.log_index,
            proof: proof.index,
        });
    }
    let checkpoint =
        Checkpoint::open(&proof.checkpoint_note, key).map_err(VerifyError::CheckpointSignature)?;
    if checkpoint.origin != receipt.origin {
        return Err(VerifyError::OriginMismatch {
            receipt: receipt.origin.clone(),
            checkpoint: checkpoint.origin,
        });
    }
    let leaf_hash = merkle::leaf_hash(canonical);
    merkle::verify_inclusion(
        &leaf_hash,
        proof.index,
        checkpoint.size,
        &proof.hashes,
        &checkpoint.root,
    )
    .map_err(VerifyError::Inclusion)?;
    Ok((checkpoint, leaf_hash))
}

/// Verifies that the log signed by `key` grew append-only from `old_note` to `new_note`;
/// returns both opened checkpoints.
pub fn verify_consistency_notes(
    old_note: &str,
    new_note: &str,
    proof_hashes: &[Hash],
    key: &VerifierKey,
) -> Result<(Checkpoint, Checkpoint), VerifyError> {
    let old = Checkpoint::open(old_note, key).map_err(VerifyError::CheckpointSignature)?;
    let new = Checkpoint::open(new_note, key).map_err(VerifyError::CheckpointSignature)?;
    merkle::verify_consistency(old.size, new.size, &old.root, &new.root, proof_hashes)
        .map_err(VerifyError::Consistency)?;
    Ok((old, new))
}
