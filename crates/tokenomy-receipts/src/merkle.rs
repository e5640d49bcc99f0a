//! RFC 6962 / RFC 9162 Merkle tree hashing, proofs and proof verification.
//!
//! * `leaf_hash(d) = SHA-256(0x00 || d)`, `node_hash(l, r) = SHA-256(0x01 || l || r)`.
//! * The root of the empty tree is `SHA-256("")`.
//! * Proof generation follows RFC 6962 §2.1.1 (`PATH`) and §2.1.2 (`SUBPROOF`);
//!   verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 step by step.
//!
//! The slice functions ([`root`], [`inclusion_proof`], [`consistency_proof`]) are
//! the plain definitions (O(n) per call) and serve as the reference. [`Tree`]
//! caches every complete subtree hash so that appends are amortised O(1) and
//! every root or proof at any historical size is O(log n).

use sha2::{Digest, Sha256};
use thiserror::Error;

/// A SHA-256 digest: a leaf hash, interior node hash or tree root.
pub type Hash = [u8; 32];

/// Why a proof was refused, or why a proof could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProofError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is not below tree size {tree_size}")]
    IndexOutOfRange { index: u64, tree_size: u64 },
    /// The old tree is larger than the new one.
    #[error("old size {old_size} is larger than new size {new_size}")]
    SizeOrder { old_size: u64, new_size: u64 },
    /// A size beyond the tree that was asked for a proof.
    #[error("size {size} is beyond the tree's {tree_size} leaves")]
    SizeBeyondTree { size: u64, tree_size: u64 },
    /// The proof has more hashes than the tree shape allows.
    #[error("proof has too many hashes")]
    ProofTooLong,
    /// The proof has fewer hashes than the tree shape requires.
    #[error("proof has too few hashes")]
    ProofTooShort,
    /// Recomputing from the proof did not give the expected (new) root.
    #[error("computed root does not match the expected root")]
    RootMismatch,
    /// A consistency proof did not reproduce the old root.
    #[error("computed old root does not match the old root")]
    OldRootMismatch,
}

/// `SHA-256(0x00 || data)`: the hash of one log entry.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`: the hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// `SHA-256("")`: the root of the tree with no leaves.
pub fn empty_root() -> Hash {
    Sha256::digest(b"").into()
}

/// The largest power of two strictly below `n` (`n >= 2`): RFC 6962's split point.
pub(crate) fn split_point(n: u64) -> u64 {
    assert!(n >= 2, "split_point needs at least two leaves");
    1 << (63 - (n - 1).leading_zeros())
}

/// Answers `MTH(D[start:end])`; lets one proof algorithm serve slices and [`Tree`].
pub(crate) trait SubtreeHashes {
    fn mth(&self, start: u64, end: u64) -> Hash;
}

struct SliceHashes<'a>(&'a [Hash]);

impl SubtreeHashes for SliceHashes<'_> {
    fn mth(&self, start: u64, end: u64) -> Hash {
        root(&self.0[start as usize..end as usize])
    }
}

/// The Merkle Tree Hash of `leaves` (RFC 6962 §2.1), computed in O(n).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split_point(n as u64) as usize;
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// RFC 6962 `PATH(m, D[lo:hi])`, appended leaf-first to `out`.
fn path<H: SubtreeHashes>(h: &H, m: u64, lo: u64, hi: u64, out: &mut Vec<Hash>) {
    let n = hi - lo;
    if n <= 1 {
        return;
    }
    let k = split_point(n);
    if m < k {
        path(h, m, lo, lo + k, out);
        out.push(h.mth(lo + k, hi));
    } else {
        path(h, m - k, lo + k, hi, out);
        out.push(h.mth(lo, lo + k));
    }
}

/// RFC 6962 `SUBPROOF(m, D[lo:hi], b)`, appended to `out`.
fn subproof<H: SubtreeHashes>(h: &H, m: u64, lo: u64, hi: u64, b: bool, out: &mut Vec<Hash>) {
    let n = hi - lo;
    if m == n {
        if !b {
            out.push(h.mth(lo, hi));
        }
        return;
    }
    let k = split_point(n);
    if m <= k {
        subproof(h, m, lo, lo + k, b, out);
        out.push(h.mth(lo + k, hi));
    } else {
        subproof(h, m - k, lo + k, hi, false, out);
        out.push(h.mth(lo, lo + k));
    }
}

pub(crate) fn inclusion_with<H: SubtreeHashes>(
    h: &H,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange {
            index,
            tree_size: size,
        });
    }
    let mut out = Vec::with_capacity(64);
    path(h, index, 0, size, &mut out);
    Ok(out)
}

pub(crate) fn consistency_with<H: SubtreeHashes>(
    h: &H,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizeOrder { old_size, new_size });
    }
    let mut out = Vec::with_capacity(64);
    if old_size > 0 && old_size < new_size {
        subproof(h, old_size, 0, new_size, true, &mut out);
    }
    Ok(out)
}

/// The inclusion proof (audit path) of leaf `index` in the tree of all `leaves`.
///
/// # Panics
/// If `index >= leaves.len()`.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Vec<Hash> {
    inclusion_with(&SliceHashes(leaves), index, leaves.len() as u64)
        .expect("index must be below the number of leaves")
}

/// The consistency proof from the tree of the first `old_size` leaves to the tree of all `leaves`.
/// Empty when `old_size` is 0 or equals `leaves.len()`.
///
/// # Panics
/// If `old_size > leaves.len()`.
pub fn consistency_proof(leaves: &[Hash], old_size: u64) -> Vec<Hash> {
    consistency_with(&SliceHashes(leaves), old_size, leaves.len() as u64)
        .expect("old_size must not exceed the number of leaves")
}

/// Right-shifts `fn_`/`sn` until the lowest bit of `fn_` is set or `fn_` is 0.
fn shift_while_even(fn_: &mut u64, sn: &mut u64) {
    while *fn_ & 1 == 0 && *fn_ != 0 {
        *fn_ >>= 1;
        *sn >>= 1;
    }
}

/// Verifies that `leaf_hash` is leaf `index` of the tree of `tree_size` leaves with `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= tree_size {
        return Err(ProofError::IndexOutOfRange { index, tree_size });
    }
    let (mut fn_, mut sn, mut r) = (index, tree_size - 1, *leaf_hash);
    for p in proof {
        if sn == 0 {
            return Err(ProofError::ProofTooLong);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                shift_while_even(&mut fn_, &mut sn);
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::ProofTooShort);
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Verifies that the tree of `old_size` leaves with `old_root` is a prefix of the tree of
/// `new_size` leaves with `new_root` (RFC 9162 §2.1.4.2).
///
/// As in RFC 9162 (and Go's `tlog`/`transparency-dev/merkle`): equal sizes need an empty proof
/// and equal roots; an empty old tree is consistent with anything given an empty proof.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizeOrder { old_size, new_size });
    }
    if old_size == new_size || old_size == 0 {
        if !proof.is_empty() {
            return Err(ProofError::ProofTooLong);
        }
        if old_size == new_size && old_root != new_root {
            return Err(ProofError::RootMismatch);
        }
        return Ok(());
    }
    let path = consistency_path(old_size, old_root, proof)?;
    let (fr, sr, sn) = walk_consistency(old_size, new_size, &path)?;
    if sn != 0 {
        return Err(ProofError::ProofTooShort);
    }
    if &fr != old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if &sr != new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// RFC 9162 §2.1.4.2 step 2: prepend the old root when `old_size` is a power of two.
fn consistency_path(
    old_size: u64,
    old_root: &Hash,
    proof: &[Hash],
) -> Result<Vec<Hash>, ProofError> {
    if proof.is_empty() {
        return Err(ProofError::ProofTooShort);
    }
    let mut path = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    Ok(path)
}

/// RFC 9162 §2.1.4.2 steps 3–6; returns `(fr, sr, sn)`.
fn walk_consistency(
    old_size: u64,
    new_size: u64,
    path: &[Hash],
) -> Result<(Hash, Hash, u64), ProofError> {
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return Err(ProofError::ProofTooLong);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                shift_while_even(&mut fn_, &mut sn);
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    Ok((fr, sr, sn))
}

/// An append-only in-memory Merkle tree that caches every complete subtree hash.
///
/// `levels[h][i]` is the hash of the complete subtree over leaves `[i·2^h, (i+1)·2^h)`.
/// Appends are amortised O(1); [`Tree::root_at`], [`Tree::inclusion_proof`] and
/// [`Tree::consistency_proof`] are O(log n) at any historical size. Memory is ~2n hashes.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf hash; returns its index.
    pub fn push(&mut self, leaf: Hash) -> u64 {
        let index = self.size();
        let mut node = leaf;
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            let row = &mut self.levels[level];
            row.push(node);
            if row.len() % 2 == 1 {
                break;
            }
            node = node_hash(&row[row.len() - 2], &row[row.len() - 1]);
            level += 1;
        }
        index
    }

    /// Appends `leaf_hash(data)`; returns its index.
    pub fn push_data(&mut self, data: &[u8]) -> u64 {
        self.push(leaf_hash(data))
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |row| row.len() as u64)
    }

    /// The leaf hash at `index`, if present.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.levels
            .first()?
            .get(usize::try_from(index).ok()?)
            .copied()
    }

    /// The root at the current size.
    pub fn root(&self) -> Hash {
        self.mth(0, self.size())
    }

    /// The root the tree had when it held `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        self.check_size(size)?;
        Ok(self.mth(0, size))
    }

    /// The inclusion proof of leaf `index` in the tree of the first `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(size)?;
        inclusion_with(self, index, size)
    }

    /// The consistency proof between the trees of the first `old_size` and `new_size` leaves.
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(new_size)?;
        consistency_with(self, old_size, new_size)
    }

    fn check_size(&self, size: u64) -> Result<(), ProofError> {
        let tree_size = self.size();
        if size > tree_size {
            return Err(ProofError::SizeBeyondTree { size, tree_size });
        }
        Ok(())
    }

    /// Cached hash of the complete subtree of height `level` starting at leaf `start`.
    pub(crate) fn complete(&self, level: u32, start: u64) -> Hash {
        debug_assert_eq!(start % (1 << level), 0, "complete subtrees are aligned");
        self.levels[level as usize][(start >> level) as usize]
    }
}

impl SubtreeHashes for Tree {
    /// `MTH(D[start:end])` for ranges whose `start` is aligned to the RFC split of the range,
    /// which is every range the proof algorithms ask for: O(log(end - start)).
    fn mth(&self, start: u64, end: u64) -> Hash {
        assert!(
            start <= end && end <= self.size(),
            "range must lie inside the tree"
        );
        let n = end - start;
        if n == 0 {
            return empty_root();
        }
        if n.is_power_of_two() {
            return self.complete(n.trailing_zeros(), start);
        }
        let k = split_point(n);
        assert_eq!(start % k, 0, "left subtree must be aligned");
        node_hash(
            &self.complete(k.trailing_zeros(), start),
            &self.mth(start + k, end),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_point_is_largest_power_below() {
        assert_eq!(split_point(2), 1);
        assert_eq!(split_point(3), 2);
        assert_eq!(split_point(8), 4);
        assert_eq!(split_point(9), 8);
    }

    #[test]
    fn empty_tree() {
        let t = Tree::new();
        assert_eq!(t.size(), 0);
        assert_eq!(t.root(), empty_root());
        assert_eq!(root(&[]), empty_root());
    }

    #[test]
    fn tree_rejects_out_of_range() {
        let mut t = Tree::new();
        t.push_data(b"a");
        assert_eq!(
            t.root_at(2),
            Err(ProofError::SizeBeyondTree {
                size: 2,
                tree_size: 1
            })
        );
        assert_eq!(
            t.inclusion_proof(1, 1),
            Err(ProofError::IndexOutOfRange {
                index: 1,
                tree_size: 1
            })
        );
        assert_eq!(
            t.consistency_proof(1, 0),
            Err(ProofError::SizeOrder {
                old_size: 1,
                new_size: 0
            })
        );
    }
}
