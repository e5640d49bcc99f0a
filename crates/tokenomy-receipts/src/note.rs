//! C2SP signed notes (<https://c2sp.org/signed-note>), Ed25519 only, compatible with
//! Go's `golang.org/x/mod/sumdb/note`.
//!
//! * key hash = first 4 bytes (big-endian u32) of `SHA-256(name || "\n" || 0x01 || pubkey)`;
//! * verifier key = `name+hex8(keyhash)+base64(0x01 || pubkey)`;
//! * signer key = `PRIVATE+KEY+name+hex8(keyhash)+base64(0x01 || seed)`;
//! * a note is `text` (ending in `\n`), a blank line, then one or more lines
//!   `— name base64(keyhash_be32 || signature)` (U+2014 em dash), each ending in `\n`.
//!
//! The signature covers exactly `text`. Opening follows Go's `note.Open`: the whole note must be
//! valid UTF-8 without control characters other than `\n`; signatures by unknown keys are kept
//! as unverified; a known key whose signature fails makes the note invalid.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// The algorithm byte for Ed25519 keys.
pub const ALG_ED25519: u8 = 0x01;
/// The prefix of every signature line: U+2014 EM DASH and a space.
pub const SIG_PREFIX: &str = "\u{2014} ";
/// Most signature lines a note may carry (as in Go).
pub const MAX_SIGNATURES: usize = 100;

/// Why a key or note was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NoteError {
    #[error("invalid key name {0:?}: must be non-empty, without spaces or '+'")]
    InvalidName(String),
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    #[error("unknown key algorithm {0:#04x}")]
    UnknownAlgorithm(u8),
    #[error("key hash does not match the key")]
    KeyHashMismatch,
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("invalid signature for key {name}+{key_hash:08x}")]
    InvalidSignature { name: String, key_hash: u32 },
    #[error("ambiguous key {name}+{key_hash:08x}")]
    AmbiguousKey { name: String, key_hash: u32 },
    #[error("note has no verifiable signatures")]
    NoVerifiedSignature,
}

/// Whether `name` is a valid key name: non-empty, no Unicode whitespace, no `+`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(char::is_whitespace) && !name.contains('+')
}

/// The key hash of `name` and an encoded key `alg || key bytes`.
pub fn key_hash(name: &str, encoded_key: &[u8]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update(encoded_key);
    let sum = h.finalize();
    u32::from_be_bytes([sum[0], sum[1], sum[2], sum[3]])
}

fn encoded(key: &[u8; 32]) -> [u8; 33] {
    let mut out = [0u8; 33];
    out[0] = ALG_ED25519;
    out[1..].copy_from_slice(key);
    out
}

/// Splits `name+hash8+base64` into checked parts: `(name, hash, alg || key bytes)`.
fn split_key(s: &str) -> Result<(&str, u32, Vec<u8>), NoteError> {
    let mut parts = s.splitn(3, '+');
    let (name, hash8, key64) = match (parts.next(), parts.next(), parts.next()) {
        (Some(n), Some(h), Some(k)) => (n, h, k),
        _ => return Err(NoteError::MalformedKey("expected name+hash+key")),
    };
    if !is_valid_name(name) {
        return Err(NoteError::InvalidName(name.to_owned()));
    }
    // Lowercase only (stricter than Go), so one key has exactly one key string.
    if hash8.len() != 8
        || !hash8
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(NoteError::MalformedKey(
            "key hash must be 8 lowercase hex digits",
        ));
    }
    let hash =
        u32::from_str_radix(hash8, 16).map_err(|_| NoteError::MalformedKey("bad key hash"))?;
    let key = B64
        .decode(key64)
        .map_err(|_| NoteError::MalformedKey("key is not base64"))?;
    match key.first() {
        None => Err(NoteError::MalformedKey("empty key")),
        Some(&ALG_ED25519) if key.len() == 33 => Ok((name, hash, key)),
        Some(&ALG_ED25519) => Err(NoteError::MalformedKey("Ed25519 key must be 32 bytes")),
        Some(&alg) => Err(NoteError::UnknownAlgorithm(alg)),
    }
}

/// A public Ed25519 note verifier key with its name and key hash.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key_hash: u32,
    key: VerifyingKey,
}

impl VerifierKey {
    /// A verifier key for `name` and a raw Ed25519 public key.
    pub fn from_public_key(name: &str, public_key: &[u8; 32]) -> Result<Self, NoteError> {
        if !is_valid_name(name) {
            return Err(NoteError::InvalidName(name.to_owned()));
        }
        let key = VerifyingKey::from_bytes(public_key)
            .map_err(|_| NoteError::MalformedKey("not an Ed25519 point"))?;
        let key_hash = key_hash(name, &encoded(public_key));
        Ok(Self {
            name: name.to_owned(),
            key_hash,
            key,
        })
    }

    /// Parses `name+hash8+base64(0x01 || pubkey)`, checking the key hash.
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let (name, hash, key) = split_key(s)?;
        let public_key: [u8; 32] = key[1..].try_into().expect("split_key checked the length");
        let v = Self::from_public_key(name, &public_key)?;
        if v.key_hash != hash {
            return Err(NoteError::KeyHashMismatch);
        }
        Ok(v)
    }

    /// The key name (for a log, its origin).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key hash.
    pub fn key_hash(&self) -> u32 {
        self.key_hash
    }

    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Whether `signature` is a valid (strict) Ed25519 signature of `msg` by this key.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = Signature::from_slice(signature) else {
            return false;
        };
        self.key.verify_strict(msg, &sig).is_ok()
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}+{:08x}+{}",
            self.name,
            self.key_hash,
            B64.encode(encoded(&self.public_key()))
        )
    }
}

impl fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifierKey({self})")
    }
}

impl FromStr for VerifierKey {
    type Err = NoteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A private Ed25519 note signer key. Its `Debug` output never shows the seed.
#[derive(Clone)]
pub struct SignerKey {
    name: String,
    key_hash: u32,
    key: SigningKey,
}

impl SignerKey {
    /// A signer key for `name` from a 32-byte Ed25519 seed.
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<Self, NoteError> {
        if !is_valid_name(name) {
            return Err(NoteError::InvalidName(name.to_owned()));
        }
        let key = SigningKey::from_bytes(seed);
        let key_hash = key_hash(name, &encoded(&key.verifying_key().to_bytes()));
        Ok(Self {
            name: name.to_owned(),
            key_hash,
            key,
        })
    }

    /// A fresh signer key for `name` drawn from the caller's cryptographic RNG.
    pub fn generate<R: CryptoRngCore + ?Sized>(name: &str, rng: &mut R) -> Result<Self, NoteError> {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Self::from_seed(name, &seed)
    }

    /// Parses `PRIVATE+KEY+name+hash8+base64(0x01 || seed)`, checking the key hash.
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let rest = s
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::MalformedKey("missing PRIVATE+KEY+ prefix"))?;
        let (name, hash, key) = split_key(rest)?;
        let seed: [u8; 32] = key[1..].try_into().expect("split_key checked the length");
        let k = Self::from_seed(name, &seed)?;
        if k.key_hash != hash {
            return Err(NoteError::KeyHashMismatch);
        }
        Ok(k)
    }

    /// The secret key string `PRIVATE+KEY+name+hash8+base64(0x01 || seed)`.
    pub fn to_key_string(&self) -> String {
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.key_hash,
            B64.encode(encoded(&self.key.to_bytes()))
        )
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key hash (same as the verifier's).
    pub fn key_hash(&self) -> u32 {
        self.key_hash
    }

    /// The matching public verifier key.
    pub fn verifier(&self) -> VerifierKey {
        let key = self.key.verifying_key();
        VerifierKey {
            name: self.name.clone(),
            key_hash: self.key_hash,
            key,
        }
    }

    /// A raw Ed25519 signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }
}

impl fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SignerKey({}+{:08x}+<redacted>)",
            self.name, self.key_hash
        )
    }
}

/// One signature line of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    pub name: String,
    pub key_hash: u32,
    /// base64 of `key_hash_be32 || signature`, as it appeared on the line.
    pub base64: String,
}

/// An opened note: its signed text and its signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The signed text, ending in `\n`.
    pub text: String,
    /// Signatures verified by a known key.
    pub sigs: Vec<NoteSignature>,
    /// Signatures by keys not in the known list (not checked).
    pub unverified_sigs: Vec<NoteSignature>,
}

fn check_text(text: &str) -> Result<(), NoteError> {
    if !text.ends_with('\n') {
        return Err(NoteError::Malformed("text must end with a newline"));
    }
    if text.chars().any(|c| c < ' ' && c != '\n') {
        return Err(NoteError::Malformed("control character"));
    }
    Ok(())
}

/// Signs `text` (which must end in `\n`) and returns the note `text\n— name sig\n`.
pub fn sign_note(text: &str, signer: &SignerKey) -> Result<String, NoteError> {
    check_text(text)?;
    let mut blob = signer.key_hash.to_be_bytes().to_vec();
    blob.extend_from_slice(&signer.sign(text.as_bytes()));
    Ok(format!(
        "{text}\n{SIG_PREFIX}{} {}\n",
        signer.name,
        B64.encode(blob)
    ))
}

/// Parses one signature line (without its `\n`) into `(name, key hash, sig bytes, base64)`.
fn parse_sig_line(line: &str) -> Result<(&str, u32, Vec<u8>, &str), NoteError> {
    let rest = line.strip_prefix(SIG_PREFIX).ok_or(NoteError::Malformed(
        "signature line must start with an em dash",
    ))?;
    let (name, b64) = rest.split_once(' ').ok_or(NoteError::Malformed(
        "signature line needs a name and a signature",
    ))?;
    if !is_valid_name(name) {
        return Err(NoteError::Malformed("invalid signer name"));
    }
    let blob = B64
        .decode(b64)
        .map_err(|_| NoteError::Malformed("signature is not base64"))?;
    if blob.len() < 5 {
        return Err(NoteError::Malformed("signature too short"));
    }
    let hash = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]);
    Ok((name, hash, blob[4..].to_vec(), b64))
}

/// The single known key matching `name` and `hash`, if any.
fn find_key<'k>(
    known: &'k [VerifierKey],
    name: &str,
    hash: u32,
) -> Result<Option<&'k VerifierKey>, NoteError> {
    let mut hits = known
        .iter()
        .filter(|k| k.name == name && k.key_hash == hash);
    match (hits.next(), hits.next()) {
        (Some(_), Some(_)) => Err(NoteError::AmbiguousKey {
            name: name.to_owned(),
            key_hash: hash,
        }),
        (hit, _) => Ok(hit),
    }
}

/// Opens a signed note, verifying every signature by a `known` key (like Go's `note.Open`).
///
/// Fails unless at least one known key signed the note; fails if a known key's signature is bad.
pub fn open_note(note: &str, known: &[VerifierKey]) -> Result<Note, NoteError> {
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(NoteError::Malformed("control character"));
    }
    let split = note
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no blank line before signatures"))?;
    let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
    if sigs.is_empty() || !sigs.ends_with('\n') {
        return Err(NoteError::Malformed(
            "signature block must end with a newline",
        ));
    }
    let mut out = Note {
        text: text.to_owned(),
        sigs: Vec::new(),
        unverified_sigs: Vec::new(),
    };
    for (count, line) in sigs[..sigs.len() - 1].split('\n').enumerate() {
        if count >= MAX_SIGNATURES {
            return Err(NoteError::Malformed("too many signatures"));
        }
        add_signature(&mut out, line, known)?;
    }
    if out.sigs.is_empty() {
        return Err(NoteError::NoVerifiedSignature);
    }
    Ok(out)
}

/// Checks one signature line and records it as verified or unverified (dropping repeats).
fn add_signature(note: &mut Note, line: &str, known: &[VerifierKey]) -> Result<(), NoteError> {
    let (name, key_hash, sig, b64) = parse_sig_line(line)?;
    let record = NoteSignature {
        name: name.to_owned(),
        key_hash,
        base64: b64.to_owned(),
    };
    let Some(key) = find_key(known, name, key_hash)? else {
        if !note.unverified_sigs.contains(&record) {
            note.unverified_sigs.push(record);
        }
        return Ok(());
    };
    if note
        .sigs
        .iter()
        .any(|s| s.name == name && s.key_hash == key_hash)
    {
        return Ok(());
    }
    if !key.verify(note.text.as_bytes(), &sig) {
        return Err(NoteError::InvalidSignature {
            name: name.to_owned(),
            key_hash,
        });
    }
    note.sigs.push(record);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_valid_name("example.com/log"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("a+b"));
        assert!(!is_valid_name("a\u{a0}b"));
    }

    #[test]
    fn seed_round_trip() {
        let k = SignerKey::from_seed("n", &[7; 32]).unwrap();
        let again = SignerKey::parse(&k.to_key_string()).unwrap();
        assert_eq!(again.verifier(), k.verifier());
        assert!(!format!("{k:?}").contains(&k.to_key_string()[20..]));
    }

    #[test]
    fn text_must_end_in_newline() {
        let k = SignerKey::from_seed("n", &[7; 32]).unwrap();
        assert_eq!(
            sign_note("abc", &k),
            Err(NoteError::Malformed("text must end with a newline"))
        );
    }
}
