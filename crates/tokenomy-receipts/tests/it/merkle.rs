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

/// Asks a tiled tree, giving it the tiles it names from `leaves` (read back, as a node reads
/// them from its log), and checks that it names each tile at most once.
fn tiled_ask<T>(
    leaves: &[Hash],
    ask: impl Fn(&tokenomy_receipts::Tiles) -> Result<T, tokenomy_receipts::TiledError>,
) -> (Result<T, tokenomy_receipts::TiledError>, usize) {
    use tokenomy_receipts::{TiledError, TILE_LEAVES};
    let mut tiles = tokenomy_receipts::Tiles::new();
    match ask(&tiles) {
        Err(TiledError::NeedTiles(needed)) => {
            assert!(
                !needed.is_empty() && needed.len() <= 2,
                "a proof needs at most two tiles: {needed:?}"
            );
            for t in &needed {
                let from = (t * TILE_LEAVES) as usize;
                tiles.insert(
                    *t,
                    tokenomy_receipts::Tile::new(&leaves[from..from + TILE_LEAVES as usize])
                        .unwrap(),
                );
            }
            let again = ask(&tiles);
            assert!(
                !matches!(again, Err(TiledError::NeedTiles(_))),
                "named tiles suffice"
            );
            (again, needed.len())
        }
        r => (r, 0),
    }
}

/// Every root and proof of the tiled tree equals the full tree's, at every size up to a few
/// tiles and at sampled ones beyond, and the tiles it asks for are the ones it needs.
#[test]
fn tiled_tree_answers_as_the_full_tree() {
    use tokenomy_receipts::TiledTree;
    let leaves: Vec<Hash> = (0u32..700).map(|i| leaf_hash(&i.to_be_bytes())).collect();
    let (mut full, mut tiled) = (Tree::new(), TiledTree::new());
    let mut asked_for_tiles = 0;
    for (n, leaf) in leaves.iter().enumerate() {
        assert_eq!(tiled.push(*leaf), n as u64);
        full.push(*leaf);
        assert_eq!(tiled.size(), full.size());
        assert_eq!(tiled.root(), full.root(), "root at {}", n + 1);
    }
    let size = full.size();
    let sizes: Vec<u64> = (0..=200)
        .chain((201..=size).step_by(37))
        .chain([size - 1, size])
        .collect();
    for &s in &sizes {
        let (got, _) = tiled_ask(&leaves, |t| tiled.root_at(s, t));
        assert_eq!(got.unwrap(), full.root_at(s).unwrap(), "root_at {s}");
        if s < size {
            let (got, _) = tiled_ask(&leaves, |t| tiled.leaf(s, t));
            assert_eq!(got.unwrap(), leaves[s as usize], "leaf {s}");
        }
        for &i in sizes.iter().filter(|&&i| i < s) {
            let (got, n) = tiled_ask(&leaves, |t| tiled.inclusion_proof(i, s, t));
            assert_eq!(
                got.unwrap(),
                full.inclusion_proof(i, s).unwrap(),
                "inclusion {i} in {s}"
            );
            asked_for_tiles += n;
        }
        for &new in sizes.iter().filter(|&&new| new >= s) {
            let (got, _) = tiled_ask(&leaves, |t| tiled.consistency_proof(s, new, t));
            assert_eq!(
                got.unwrap(),
                full.consistency_proof(s, new).unwrap(),
                "consistency {s} -> {new}"
            );
        }
    }
    assert!(
        asked_for_tiles > 0,
        "some proofs reach inside complete tiles"
    );
    // Out of range is the full tree's error, whatever tiles are given.
    let none = tokenomy_receipts::Tiles::new();
    assert_eq!(
        tiled.inclusion_proof(size, size, &none),
        Err(ProofError::IndexOutOfRange {
            index: size,
            tree_size: size
        }
        .into())
    );
    assert_eq!(
        tiled.root_at(size + 1, &none),
        Err(ProofError::SizeBeyondTree {
            size: size + 1,
            tree_size: size
        }
        .into())
    );
}

/// The proofs that never leave memory: the newest leaves at the current size, and the root.
/// Inside a complete tile, exactly that tile is named; given wrong leaves, it is refused.
#[test]
fn tiled_tree_names_the_tiles_it_needs_and_checks_them() {
    use tokenomy_receipts::{Tile, TiledError, TiledTree, Tiles};
    let leaves: Vec<Hash> = (0u32..200).map(|i| leaf_hash(&i.to_be_bytes())).collect();
    let mut tiled = TiledTree::new();
    for l in &leaves {
        tiled.push(*l);
    }
    let none = Tiles::new();
    // 200 = 3 tiles + 8: the tail is in memory.
    assert!(tiled.inclusion_proof(199, 200, &none).is_ok());
    assert!(tiled.consistency_proof(192, 200, &none).is_ok());
    assert!(tiled.consistency_proof(128, 200, &none).is_ok());
    assert_eq!(
        tiled.inclusion_proof(70, 200, &none),
        Err(TiledError::NeedTiles(vec![1]))
    );
    assert_eq!(
        tiled.inclusion_proof(3, 100, &none),
        Err(TiledError::NeedTiles(vec![0, 1]))
    );
    assert_eq!(
        tiled.root_at(130, &none),
        Err(TiledError::NeedTiles(vec![2]))
    );
    let mut wrong = Tiles::new();
    let mut tile = leaves[64..128].to_vec();
    tile.swap(0, 1);
    wrong.insert(1, Tile::new(&tile).unwrap());
    assert_eq!(
        tiled.inclusion_proof(70, 200, &wrong),
        Err(TiledError::TileMismatch(1))
    );
    wrong.insert(1, Tile::new(&leaves[0..64]).unwrap());
    assert_eq!(
        tiled.inclusion_proof(70, 200, &wrong),
        Err(TiledError::TileMismatch(1))
    );
    assert!(Tile::new(&leaves[64..127]).is_none(), "a tile is 64 leaves");
    assert_eq!(tiled.tile_root(1), Some(root(&leaves[64..128])));
    assert_eq!(
        Tile::new(&leaves[64..128]).unwrap().root(),
        root(&leaves[64..128])
    );
    assert_eq!(tiled.tile_root(3), None, "the tail is not a complete tile");
}
