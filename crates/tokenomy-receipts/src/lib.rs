//! Signed, logged usage receipts for tokenomy, and everything needed to check them offline.
//!
//! # Why the crate is shaped this way
//!
//! A receipt is only worth something if the person billed can check it *without trusting the
//! node*. So the verification side lives here, alone, as a small pure library that a wallet, an
//! auditor, a browser (wasm) or the node itself can embed identically:
//!
//! * **No I/O.** No files, sockets or clock: timestamps, keys and randomness are passed in.
//!   The same bytes give the same answer everywhere, and the crate compiles to wasm.
//! * **Standard formats, not new ones.** Merkle hashing and proofs are RFC 6962 / RFC 9162;
//!   signatures are C2SP signed notes; tree heads are C2SP tlog checkpoints; inclusion proofs
//!   are C2SP tlog-proofs. Existing Go tooling (`sumdb/note`, `transparency-dev/merkle`) and
//!   witnesses can check our log without knowing about tokenomy.
//! * **One canonical byte string per receipt** ([`receipt`]): it is what gets signed and what
//!   becomes the log leaf, and decoding refuses any other spelling, so a receipt cannot be
//!   re-encoded into a second valid-looking form.
//! * **Errors that say what failed** ([`bundle::VerifyError`]): a disputed charge needs to know
//!   whether the signature, a field, the inclusion or the checkpoint was wrong.
//! * **The node's hot path is here too** ([`merkle::Tree`]): proofs per request at ~10⁶ leaves
//!   must be O(log n), so the tree caches complete subtree hashes; [`tiled::TiledTree`] keeps
//!   only those from 64-leaf tiles up (a byte per leaf) and asks for a tile's leaves when a
//!   proof reaches inside it, for a node whose log holds the leaves anyway.
//!
//! # Example
//!
//! ```
//! use tokenomy_receipts::*;
//! # let receipt = |log_index| Receipt {
//! #     version: 1, origin: "node.example/log".into(), receipt_id: "r1".into(),
//! #     request_id: "q1".into(), account_id: "a1".into(), counterparty_id: String::new(), key_id: "k1".into(),
//! #     kind: ReceiptKind::Usage, model: "m".into(), model_sha256: [1; 32],
//! #     prompt_tokens: 10, cached_tokens: 0, completion_tokens: 5, reasoning_tokens: 0,
//! #     price_input_micros_per_mtok: 1, price_cached_input_micros_per_mtok: 1,
//! #     price_output_micros_per_mtok: 2, amount_micros: -1, transfer_id: String::new(),
//! #     started_at_ms: 1, ended_at_ms: 2, request_sha256: [2; 32], output_sha256: [3; 32],
//! #     log_index,
//! # };
//! // Node side: sign, log, prove.
//! let key = SignerKey::from_seed("node.example/log", &[7; 32]).unwrap();
//! let mut tree = Tree::new();
//! let r = receipt(tree.size());
//! let (canonical, signature) = r.sign(&key).unwrap();
//! let index = tree.push_data(&canonical);
//! let checkpoint = Checkpoint::new("node.example/log", tree.size(), tree.root()).sign(&key).unwrap();
//! let hashes = tree.inclusion_proof(index, tree.size()).unwrap();
//! let proof = TlogProof { extra: None, index, hashes, checkpoint_note: checkpoint };
//! let json = ReceiptBundle::new(r, &canonical, &signature, &key.verifier(), &proof).to_json();
//!
//! // Client side: only the node's public key string is trusted.
//! let trusted = VerifierKey::parse(&key.verifier().to_string()).unwrap();
//! let verified = verify_bundle(&json, &trusted).unwrap();
//! assert_eq!(verified.checkpoint.size, 1);
//! ```
//!
//! Modules, bottom up: [`merkle`] (and [`tiled`] on it) → [`note`] → [`checkpoint`] → [`proof`] → [`receipt`] →
//! [`bundle`].
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod bundle;
pub mod checkpoint;
pub mod merkle;
pub mod note;
pub mod proof;
pub mod receipt;
pub mod tiled;

pub use bundle::{
    verify_bundle, verify_consistency_notes, ReceiptBundle, VerifiedReceipt, VerifyError,
};
pub use checkpoint::{Checkpoint, CheckpointError};
pub use merkle::{Hash, ProofError, Tree};
pub use note::{open_note, sign_note, Note, NoteError, SignerKey, VerifierKey};
pub use proof::{verify_tlog_proof, Leaf, TlogProof, TlogProofError};
pub use receipt::{verify_receipt_signature, Receipt, ReceiptError, ReceiptKind};
pub use tiled::{Tile, TiledError, TiledTree, Tiles, TILE_LEAVES};
