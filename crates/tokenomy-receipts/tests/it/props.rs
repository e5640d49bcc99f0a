//! Property tests: proofs always verify; any flipped bit breaks verification.

use crate::bundle::Node;
use proptest::prelude::*;
use tokenomy_receipts::merkle::*;
use tokenomy_receipts::*;

fn leaves(n: usize) -> Vec<Hash> {
    (0..n as u32).map(|i| leaf_hash(&i.to_le_bytes())).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_inclusion_proof_verifies(n in 1usize..300) {
        let leaves = leaves(n);
        let tree = crate::merkle::tree_of(&leaves);
        let r = root(&leaves);
        prop_assert_eq!(tree.root(), r);
        for i in 0..n as u64 {
            let p = inclusion_proof(&leaves, i);
            prop_assert_eq!(&tree.inclusion_proof(i, n as u64).unwrap(), &p);
            prop_assert!(verify_inclusion(&leaves[i as usize], i, n as u64, &p, &r).is_ok());
        }
    }

    #[test]
    fn every_consistency_proof_verifies(n in 1usize..300) {
        let leaves = leaves(n);
        let tree = crate::merkle::tree_of(&leaves);
        let r = root(&leaves);
        for m in 0..=n {
            let p = consistency_proof(&leaves, m as u64);
            prop_assert_eq!(&tree.consistency_proof(m as u64, n as u64).unwrap(), &p);
            let old = root(&leaves[..m]);
            prop_assert_eq!(tree.root_at(m as u64).unwrap(), old);
            prop_assert!(verify_consistency(m as u64, n as u64, &old, &r, &p).is_ok());
        }
    }

    #[test]
    fn flipped_proof_bit_breaks_inclusion(n in 2usize..300, i in any::<prop::sample::Index>(), bit in 0usize..256, which in any::<prop::sample::Index>()) {
        let leaves = leaves(n);
        let idx = i.index(n);
        let mut p = inclusion_proof(&leaves, idx as u64);
        let k = which.index(p.len());
        p[k][bit / 8] ^= 1 << (bit % 8);
        prop_assert!(verify_inclusion(&leaves[idx], idx as u64, n as u64, &p, &root(&leaves)).is_err());
    }

    #[test]
    fn flipped_proof_bit_breaks_consistency(n in 3usize..300, m in any::<prop::sample::Index>(), bit in 0usize..256, which in any::<prop::sample::Index>()) {
        let leaves = leaves(n);
        let m = 1 + m.index(n - 1);
        let mut p = consistency_proof(&leaves, m as u64);
        let k = which.index(p.len());
        p[k][bit / 8] ^= 1 << (bit % 8);
        prop_assert!(verify_consistency(m as u64, n as u64, &root(&leaves[..m]), &root(&leaves), &p).is_err());
    }
}

fn flip(bytes: &mut [u8], bit: usize) {
    let bit = bit % (bytes.len() * 8);
    bytes[bit / 8] ^= 1 << (bit % 8);
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn flipped_canonical_bit_fails(bit in any::<usize>()) {
        use base64::Engine;
        let node = Node::with_receipts(9);
        let mut b = node.bundle(6);
        let mut bytes = b64().decode(&b.canonical).unwrap();
        flip(&mut bytes, bit);
        b.canonical = b64().encode(bytes);
        prop_assert!(verify_bundle(&b.to_json(), &node.key.verifier()).is_err());
    }

    #[test]
    fn flipped_signature_bit_fails(bit in any::<usize>()) {
        use base64::Engine;
        let node = Node::with_receipts(9);
        let mut b = node.bundle(6);
        let mut sig = b64().decode(&b.signature).unwrap();
        flip(&mut sig, bit);
        b.signature = b64().encode(sig);
        prop_assert_eq!(verify_bundle(&b.to_json(), &node.key.verifier()).unwrap_err(), VerifyError::Signature);
    }

    #[test]
    fn flipped_bundle_proof_hash_bit_fails(bit in any::<usize>(), which in any::<prop::sample::Index>()) {
        let node = Node::with_receipts(9);
        let mut b = node.bundle(6);
        let mut p = TlogProof::parse(&b.proof).unwrap();
        let k = which.index(p.hashes.len());
        flip(&mut p.hashes[k], bit);
        b.proof = p.format();
        prop_assert!(matches!(verify_bundle(&b.to_json(), &node.key.verifier()), Err(VerifyError::Inclusion(_))));
    }

    #[test]
    fn flipped_checkpoint_text_bit_fails(bit in any::<usize>()) {
        let node = Node::with_receipts(9);
        let mut b = node.bundle(6);
        let mut p = TlogProof::parse(&b.proof).unwrap();
        let mut note = p.checkpoint_note.into_bytes();
        flip(&mut note, bit);
        let Ok(note) = String::from_utf8(note) else { return Ok(()) }; // not even text
        p.checkpoint_note = note;
        b.proof = p.format();
        prop_assert!(verify_bundle(&b.to_json(), &node.key.verifier()).is_err());
    }

    #[test]
    fn flipped_verifier_key_bit_fails(bit in 0usize..256) {
        let node = Node::with_receipts(9);
        let json = node.bundle(6).to_json();
        let mut pk = node.key.verifier().public_key();
        flip(&mut pk, bit);
        if let Ok(key) = VerifierKey::from_public_key(crate::ORIGIN, &pk) {
            prop_assert!(verify_bundle(&json, &key).is_err());
        }
    }

    #[test]
    fn flipped_verifier_key_string_bit_fails(bit in any::<usize>()) {
        let node = Node::with_receipts(9);
        let json = node.bundle(6).to_json();
        let mut s = node.key.verifier().to_string().into_bytes();
        flip(&mut s, bit);
        if let Ok(key) = std::str::from_utf8(&s).map_err(|_| ()).and_then(|s| VerifierKey::parse(s).map_err(|_| ())) {
            prop_assert!(verify_bundle(&json, &key).is_err());
        }
    }
}
