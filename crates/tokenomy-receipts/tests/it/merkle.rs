//! RFC 6962 known answers (see `vectors.rs` for provenance).

use crate::vectors::*;
use crate::{h, hs};
use tokenomy_receipts::merkle::*;

fn leaves() -> Vec<Hash> {
    LEAF_INPUTS
        .iter()
        .map(|d| leaf_hash(&hex::decode(d).unwrap()))
        .collect()
}

#[test]
fn leaf_and_empty_hashes() {
    assert_eq!(empty_root(), h(ROOTS[0]));
    assert_eq!(leaf_hash(b""), h(ROOTS[1]));
}

#[test]
fn roots_for_sizes_0_to_8() {
    let leaves = leaves();
    let mut tree = Tree::new();
    for (size, want) in ROOTS.iter().enumerate() {
        assert_eq!(root(&leaves[..size]), h(want), "slice root at {size}");
        assert_eq!(tree.root(), h(want), "tree root at {size}");
        if size < 8 {
            tree.push(leaves[size]);
        }
    }
    for (size, want) in ROOTS.iter().enumerate() {
        assert_eq!(tree.root_at(size as u64).unwrap(), h(want));
    }
}

#[test]
fn known_inclusion_proofs() {
    let leaves = leaves();
    let tree = tree_of(&leaves);
    for &(index, size, proof) in INCLUSION_PROOFS {
        let want = hs(proof);
        assert_eq!(
            inclusion_proof(&leaves[..size as usize], index),
            want,
            "slice {index}/{size}"
        );
        assert_eq!(
            tree.inclusion_proof(index, size).unwrap(),
            want,
            "tree {index}/{size}"
        );
        let r = h(ROOTS[size as usize]);
        verify_inclusion(&leaves[index as usize], index, size, &want, &r).unwrap();
        assert!(verify_inclusion(&leaves[index as usize], index + 1, size, &want, &r).is_err());
        assert!(verify_inclusion(&leaves[index as usize], index, size * 2, &want, &r).is_err());
    }
}

#[test]
fn known_consistency_proofs() {
    let leaves = leaves();
    let tree = tree_of(&leaves);
    for &(old, new, proof) in CONSISTENCY_PROOFS {
        let want = hs(proof);
        assert_eq!(
            consistency_proof(&leaves[..new as usize], old),
            want,
            "slice {old}->{new}"
        );
        assert_eq!(
            tree.consistency_proof(old, new).unwrap(),
            want,
            "tree {old}->{new}"
        );
        let (r1, r2) = (h(ROOTS[old as usize]), h(ROOTS[new as usize]));
        verify_consistency(old, new, &r1, &r2, &want).unwrap();
        if !want.is_empty() {
            assert!(verify_consistency(old, new, &r2, &r1, &want).is_err());
            assert!(verify_consistency(old, new, &r1, &r2, &want[1..]).is_err());
            assert!(
                verify_consistency(old, new, &r1, &r2, &[want.clone(), vec![r1]].concat()).is_err()
            );
        }
    }
}

/// The edge cases of transparency-dev/merkle `TestVerifyConsistency`.
#[test]
fn consistency_edge_cases() {
    let (a, b, e) = ([1u8; 32], [2u8; 32], empty_root());
    assert!(verify_consistency(0, 0, &a, &b, &[]).is_err());
    assert!(verify_consistency(1, 1, &a, &b, &[]).is_err());
    assert!(verify_consistency(0, 0, &a, &a, &[]).is_ok());
    assert!(verify_consistency(0, 1, &a, &b, &[]).is_ok());
    assert!(verify_consistency(1, 1, &b, &b, &[]).is_ok());
    assert!(verify_consistency(1, 0, &a, &b, &[]).is_err());
    assert!(verify_consistency(2, 1, &a, &b, &[]).is_err());
    assert!(verify_consistency(1, 2, &a, &b, &[]).is_err());
    assert!(verify_consistency(0, 0, &e, &e, &[e]).is_err());
    assert!(verify_consistency(0, 1, &e, &e, &[e]).is_err());
    assert!(verify_consistency(1, 1, &e, &e, &[e]).is_err());
}

/// The edge cases of transparency-dev/merkle `TestVerifyInclusion`.
#[test]
fn inclusion_edge_cases() {
    let some = [0xab; 32];
    for (index, size) in [(0, 0), (1, 0), (2, 1)] {
        assert!(verify_inclusion(&some, index, size, &[], &empty_root()).is_err());
    }
    let leaf = leaf_hash(b"data");
    assert!(verify_inclusion(&leaf, 0, 1, &[], &leaf).is_ok());
    assert!(verify_inclusion(&leaf, 0, 1, &[], &some).is_err());
}

#[test]
fn large_tree_is_fast_and_consistent() {
    let mut tree = Tree::new();
    for i in 0u32..100_000 {
        tree.push_data(&i.to_be_bytes());
    }
    let size = tree.size();
    let r = tree.root();
    for index in [0, 1, 4095, 65_536, size - 1] {
        let proof = tree.inclusion_proof(index, size).unwrap();
        verify_inclusion(&tree.leaf(index).unwrap(), index, size, &proof, &r).unwrap();
    }
    let old_root = tree.root_at(77_777).unwrap();
    let proof = tree.consistency_proof(77_777, size).unwrap();
    verify_consistency(77_777, size, &old_root, &r, &proof).unwrap();
}

pub fn tree_of(leaves: &[Hash]) -> Tree {
    let mut t = Tree::new();
    for l in leaves {
        t.push(*l);
    }
    t
}

/// The node's scale: a million leaves, then proofs at the current and historical sizes.
/// Run with `cargo test --release -- --ignored million`.
#[test]
#[ignore = "slow in debug builds"]
fn million_leaves() {
    let mut tree = Tree::new();
    for i in 0u32..1_000_000 {
        tree.push_data(&i.to_be_bytes());
    }
    let size = tree.size();
    let r = tree.root();
    for index in (0..size).step_by(9_973) {
        let proof = tree.inclusion_proof(index, size).unwrap();
        verify_inclusion(&tree.leaf(index).unwrap(), index, size, &proof, &r).unwrap();
        let old_root = tree.root_at(index + 1).unwrap();
        let proof = tree.consistency_proof(index + 1, size).unwrap();
        verify_consistency(index + 1, size, &old_root, &r, &proof).unwrap();
    }
}
