//! C2SP tlog proofs (<https://c2sp.org/tlog-proof>): a self-contained, offline-verifiable
//! proof that an entry is in a log.
//!
//! ```text
//! c2sp.org/tlog-proof@v1
//! extra <base64>            (optional)
//! index <decimal, no leading zeros>
//! <base64 hash>             (zero or more, leaf's sibling first)
//!
//! <signed checkpoint note, verbatim>
//! ```
//!
//! Formatting matches transparency-dev/merkle's `NewTLogProof`; parsing is strict (canonical
//! base64 hashes of 32 bytes, canonical decimal index, non-empty checkpoint).

use crate::checkpoint::{parse_decimal, parse_hash, Checkpoint, CheckpointError};
use crate::merkle::{self, Hash, ProofError};
use crate::note::VerifierKey;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use thiserror::Error;

/// The first line of every tlog proof.
pub const TLOG_PROOF_HEADER: &str = "c2sp.org/tlog-proof@v1";

/// Why a tlog proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TlogProofError {
    #[error("malformed tlog proof: {0}")]
    Malformed(&'static str),
    #[error("tlog proof checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("tlog proof inclusion: {0}")]
    Inclusion(#[from] ProofError),
}

/// A parsed tlog proof. The checkpoint stays as the verbatim signed note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlogProof {
    /// Optional unauthenticated application data.
    pub extra: Option<Vec<u8>>,
    /// Zero-based index of the entry.
    pub index: u64,
    /// Inclusion proof hashes, leaf's sibling first.
    pub hashes: Vec<Hash>,
    /// The signed checkpoint note, verbatim.
    pub checkpoint_note: String,
}

/// What the caller has of the entry: its bytes, or its RFC 6962 leaf hash.
#[derive(Debug, Clone, Copy)]
pub enum Leaf<'a> {
    /// The entry bytes; hashed with [`merkle::leaf_hash`].
    Data(&'a [u8]),
    /// An already computed leaf hash.
    Hash(Hash),
}

impl Leaf<'_> {
    /// The RFC 6962 leaf hash.
    pub fn hash(&self) -> Hash {
        match self {
            Leaf::Data(d) => merkle::leaf_hash(d),
            Leaf::Hash(h) => *h,
        }
    }
}

impl TlogProof {
    /// The text form.
    pub fn format(&self) -> String {
        let mut s = format!("{TLOG_PROOF_HEADER}\n");
        if let Some(extra) = &self.extra {
            s.push_str(&format!("extra {}\n", B64.encode(extra)));
        }
        s.push_str(&format!("index {}\n", self.index));
        for h in &self.hashes {
            s.push_str(&B64.encode(h));
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&self.checkpoint_note);
        s
    }

    /// Parses the text form strictly (the checkpoint is not opened here).
    pub fn parse(text: &str) -> Result<Self, TlogProofError> {
        let mut rest = text;
        if take_line(&mut rest)? != TLOG_PROOF_HEADER {
            return Err(TlogProofError::Malformed(
                "missing c2sp.org/tlog-proof@v1 header",
            ));
        }
        let mut line = take_line(&mut rest)?;
        let extra = match line.strip_prefix("extra ") {
            Some(e) => {
                let bytes = B64
                    .decode(e)
                    .map_err(|_| TlogProofError::Malformed("extra is not base64"))?;
                line = take_line(&mut rest)?;
                Some(bytes)
            }
            None => None,
        };
        let index_str = line
            .strip_prefix("index ")
            .ok_or(TlogProofError::Malformed("missing index line"))?;
        let index = parse_decimal(index_str)
            .map_err(|_| TlogProofError::Malformed("index must be canonical decimal"))?;
        let hashes = take_hashes(&mut rest)?;
        if rest.is_empty() {
            return Err(TlogProofError::Malformed("missing checkpoint"));
        }
        let proof = Self {
            extra,
            index,
            hashes,
            checkpoint_note: rest.to_owned(),
        };
        if proof.format() != text {
            return Err(TlogProofError::Malformed("not in canonical form"));
        }
        Ok(proof)
    }

    /// Opens the checkpoint with `key` and checks the inclusion of `leaf` at `self.index`.
    pub fn verify(&self, leaf: Leaf<'_>, key: &VerifierKey) -> Result<Checkpoint, TlogProofError> {
        let cp = Checkpoint::open(&self.checkpoint_note, key)?;
        merkle::verify_inclusion(&leaf.hash(), self.index, cp.size, &self.hashes, &cp.root)?;
        Ok(cp)
    }
}

/// Takes one `\n`-terminated line off the front of `rest`.
fn take_line<'a>(rest: &mut &'a str) -> Result<&'a str, TlogProofError> {
    let (line, tail) = rest
        .split_once('\n')
        .ok_or(TlogProofError::Malformed("truncated"))?;
    *rest = tail;
    Ok(line)
}

/// Takes hash lines up to and including the blank separator line.
fn take_hashes(rest: &mut &str) -> Result<Vec<Hash>, TlogProofError> {
    let mut hashes = Vec::new();
    loop {
        let line = take_line(rest)?;
        if line.is_empty() {
            return Ok(hashes);
        }
        hashes.push(
            parse_hash(line)
                .map_err(|_| TlogProofError::Malformed("proof hash must be base64 of 32 bytes"))?,
        );
        if hashes.len() > 64 {
            return Err(TlogProofError::Malformed("more than 64 proof hashes"));
        }
    }
}

/// Parses `proof_text` and verifies it for `leaf` under the log key `key`; returns the
/// verified checkpoint (origin = key name, size, root).
pub fn verify_tlog_proof(
    leaf: Leaf<'_>,
    proof_text: &str,
    key: &VerifierKey,
) -> Result<Checkpoint, TlogProofError> {
    TlogProof::parse(proof_text)?.verify(leaf, key)
}
