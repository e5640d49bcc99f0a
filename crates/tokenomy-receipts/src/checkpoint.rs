//! C2SP tlog checkpoints (<https://c2sp.org/tlog-checkpoint>).
//!
//! The body is `origin\nsize\nbase64(root)\n` followed by zero or more non-empty extension
//! lines; `size` is ASCII decimal without leading zeros. A signed checkpoint is a
//! [signed note](crate::note) of that body. Parsing is strict: anything that would not be
//! re-emitted byte for byte is refused.

use crate::merkle::Hash;
use crate::note::{self, NoteError, SignerKey, VerifierKey};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use thiserror::Error;

/// Why a checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CheckpointError {
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
    #[error("checkpoint signature: {0}")]
    Signature(#[from] NoteError),
    #[error("checkpoint origin {found:?} is not the expected {expected:?}")]
    OriginMismatch { expected: String, found: String },
}

/// A tree head: which log, how many entries, and the root over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's unique identity, e.g. `tokenomy.example/receipts`.
    pub origin: String,
    /// Number of leaves.
    pub size: u64,
    /// RFC 6962 root of the first `size` leaves.
    pub root: Hash,
    /// Optional extension lines (without their `\n`).
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// A checkpoint without extension lines.
    pub fn new(origin: &str, size: u64, root: Hash) -> Self {
        Self {
            origin: origin.to_owned(),
            size,
            root,
            extensions: Vec::new(),
        }
    }

    /// The note body: `origin\nsize\nbase64(root)\n[extension\n]*`.
    pub fn to_body(&self) -> String {
        let mut s = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for ext in &self.extensions {
            s.push_str(ext);
            s.push('\n');
        }
        s
    }

    /// Parses a note body strictly.
    pub fn parse_body(text: &str) -> Result<Self, CheckpointError> {
        let body = text
            .strip_suffix('\n')
            .ok_or(CheckpointError::Malformed("body must end with a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(CheckpointError::Malformed("empty origin"))?;
        let size = parse_decimal(lines.next().unwrap_or(""))?;
        let root = parse_hash(
            lines
                .next()
                .ok_or(CheckpointError::Malformed("missing root hash"))?,
        )?;
        let extensions: Vec<String> = lines.map(str::to_owned).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(CheckpointError::Malformed("empty extension line"));
        }
        if origin.chars().any(char::is_control) {
            return Err(CheckpointError::Malformed("control character in origin"));
        }
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
            extensions,
        })
    }

    /// Signs the body as a C2SP signed note.
    pub fn sign(&self, signer: &SignerKey) -> Result<String, CheckpointError> {
        Ok(note::sign_note(&self.to_body(), signer)?)
    }

    /// Opens a signed checkpoint note: `verifier` must have signed it, and the origin must
    /// equal the verifier's key name (C2SP says the key name SHOULD match the origin;
    /// tokenomy requires it, as Go's `log.ParseCheckpoint` requires the expected origin).
    pub fn open(signed_note: &str, verifier: &VerifierKey) -> Result<Self, CheckpointError> {
        let n = note::open_note(signed_note, std::slice::from_ref(verifier))?;
        let cp = Self::parse_body(&n.text)?;
        if cp.origin != verifier.name() {
            return Err(CheckpointError::OriginMismatch {
                expected: verifier.name().to_owned(),
                found: cp.origin,
            });
        }
        Ok(cp)
    }
}

/// ASCII decimal u64 without sign or leading zeros.
pub(crate) fn parse_decimal(s: &str) -> Result<u64, CheckpointError> {
    let digits_ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_ok || (s.len() > 1 && s.starts_with('0')) {
        return Err(CheckpointError::Malformed(
            "size must be decimal without leading zeros",
        ));
    }
    s.parse()
        .map_err(|_| CheckpointError::Malformed("size overflows u64"))
}

/// Canonical standard base64 of exactly 32 bytes.
pub(crate) fn parse_hash(s: &str) -> Result<Hash, CheckpointError> {
    let bytes = B64
        .decode(s)
        .map_err(|_| CheckpointError::Malformed("hash is not base64"))?;
    let hash: Hash = bytes
        .try_into()
        .map_err(|_| CheckpointError::Malformed("hash is not 32 bytes"))?;
    if B64.encode(hash) != s {
        return Err(CheckpointError::Malformed("hash base64 is not canonical"));
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trip_and_strictness() {
        let mut cp = Checkpoint::new("example.com/log", 7, [9; 32]);
        cp.extensions.push("ext line".into());
        assert_eq!(Checkpoint::parse_body(&cp.to_body()).unwrap(), cp);
        for bad in [
            "o\n07\nCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n",
            "o\n7\nAAAA\n",
            "\n7\nx\n",
            "o\n7\n",
        ] {
            assert!(Checkpoint::parse_body(bad).is_err(), "{bad:?}");
        }
    }
}
