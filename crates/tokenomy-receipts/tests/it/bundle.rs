//! End-to-end: a node logs receipts, serves bundles; a client verifies them.

use crate::{node_key, sample_receipt, ORIGIN};
use tokenomy_receipts::*;

/// A node's state: a tree of receipt leaves and the receipts.
pub struct Node {
    pub key: SignerKey,
    pub tree: Tree,
    pub receipts: Vec<(Receipt, Vec<u8>, [u8; 64])>,
}

impl Node {
    pub fn with_receipts(n: u64) -> Self {
        let mut node = Node {
            key: node_key(),
            tree: Tree::new(),
            receipts: Vec::new(),
        };
        for i in 0..n {
            let r = sample_receipt(i);
            let (bytes, sig) = r.sign(&node.key).unwrap();
            assert_eq!(node.tree.push_data(&bytes), i);
            node.receipts.push((r, bytes, sig));
        }
        node
    }

    pub fn checkpoint_note(&self, size: u64) -> String {
        Checkpoint::new(ORIGIN, size, self.tree.root_at(size).unwrap())
            .sign(&self.key)
            .unwrap()
    }

    pub fn tlog_proof(&self, index: u64) -> TlogProof {
        let size = self.tree.size();
        let hashes = self.tree.inclusion_proof(index, size).unwrap();
        TlogProof {
            extra: None,
            index,
            hashes,
            checkpoint_note: self.checkpoint_note(size),
        }
    }

    pub fn bundle(&self, index: u64) -> ReceiptBundle {
        let (r, bytes, sig) = &self.receipts[index as usize];
        ReceiptBundle::new(
            r.clone(),
            bytes,
            sig,
            &self.key.verifier(),
            &self.tlog_proof(index),
        )
    }
}

#[test]
fn bundles_verify() {
    let node = Node::with_receipts(13);
    for i in 0..13 {
        let v = verify_bundle(&node.bundle(i).to_json(), &node.key.verifier()).unwrap();
        assert_eq!(v.receipt, sample_receipt(i));
        assert_eq!(v.checkpoint.size, 13);
        assert_eq!(v.checkpoint.origin, ORIGIN);
    }
}

#[test]
fn tlog_proof_text_round_trips_and_verifies() {
    let node = Node::with_receipts(6);
    let mut p = node.tlog_proof(4);
    p.extra = Some(b"hello".to_vec());
    let text = p.format();
    assert!(text.starts_with("c2sp.org/tlog-proof@v1\nextra aGVsbG8=\nindex 4\n"));
    assert_eq!(TlogProof::parse(&text).unwrap(), p);
    let leaf = &node.receipts[4].1;
    let cp = verify_tlog_proof(Leaf::Data(leaf), &text, &node.key.verifier()).unwrap();
    assert_eq!(cp.size, 6);
    verify_tlog_proof(
        Leaf::Hash(merkle::leaf_hash(leaf)),
        &text,
        &node.key.verifier(),
    )
    .unwrap();
    let err = verify_tlog_proof(Leaf::Data(b"other"), &text, &node.key.verifier()).unwrap_err();
    assert_eq!(err, TlogProofError::Inclusion(ProofError::RootMismatch));
}

#[test]
fn each_failure_is_named() {
    let node = Node::with_receipts(5);
    let key = node.key.verifier();
    let check = |b: &ReceiptBundle| verify_bundle(&b.to_json(), &key).unwrap_err();

    let mut b = node.bundle(2);
    b.receipt.amount_micros = -1;
    assert_eq!(check(&b), VerifyError::FieldMismatch("amount_micros"));

    let mut b = node.bundle(2);
    b.signature = node.bundle(3).signature;
    assert_eq!(check(&b), VerifyError::Signature);

    let mut b = node.bundle(2);
    b.proof = node.bundle(3).proof;
    assert!(matches!(
        check(&b),
        VerifyError::LogIndexMismatch {
            receipt: 2,
            proof: 3
        }
    ));

    let mut b = node.bundle(2);
    let mut p = TlogProof::parse(&b.proof).unwrap();
    p.hashes[0][0] ^= 1;
    b.proof = p.format();
    assert!(matches!(check(&b), VerifyError::Inclusion(_)));

    let mut b = node.bundle(2);
    let mut p = TlogProof::parse(&b.proof).unwrap();
    p.checkpoint_note = node.checkpoint_note(5).replacen("\n5\n", "\n4\n", 1);
    b.proof = p.format();
    assert!(matches!(check(&b), VerifyError::CheckpointSignature(_)));

    let other = SignerKey::from_seed(ORIGIN, &[1; 32]).unwrap().verifier();
    assert!(matches!(
        verify_bundle(&node.bundle(2).to_json(), &other),
        Err(VerifyError::KeyMismatch { .. })
    ));
    assert!(matches!(
        verify_bundle("{}", &key),
        Err(VerifyError::MalformedJson(_))
    ));
}

#[test]
fn consistency_between_checkpoints() {
    let node = Node::with_receipts(40);
    let key = node.key.verifier();
    let old = node.checkpoint_note(17);
    let new = node.checkpoint_note(40);
    let proof = node.tree.consistency_proof(17, 40).unwrap();
    let (a, b) = verify_consistency_notes(&old, &new, &proof, &key).unwrap();
    assert_eq!((a.size, b.size), (17, 40));
    let mut bad = proof.clone();
    bad[1][3] ^= 0x40;
    assert!(matches!(
        verify_consistency_notes(&old, &new, &bad, &key),
        Err(VerifyError::Consistency(_))
    ));
    assert!(matches!(
        verify_consistency_notes(&new, &old, &proof, &key),
        Err(VerifyError::Consistency(_))
    ));
}
