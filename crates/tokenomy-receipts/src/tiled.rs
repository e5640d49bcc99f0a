//! An append-only Merkle tree for a log of millions of entries, that keeps in memory only the
//! hashes of its complete 64-leaf tiles and of everything above them (about one byte per leaf),
//! plus the leaves of the one tile still filling.
//!
//! Why: the leaves are kept anyway, in the ledger's log, so a node need not hold them (or the
//! five levels just above them) twice. A root or proof that needs a hash inside a complete tile
//! answers [`TiledError::NeedTiles`], naming those tiles; the caller reads their leaves back from
//! where it keeps them and asks again with them. An inclusion proof needs at most the tile of
//! its leaf and the tile its tree size ends in; the current root needs none. This is the shape of
//! C2SP tlog-tiles, with tiles of height 6 rather than 8, so that a proof reads at most 64
//! entries per tile.
//!
//! Architecture Invariant: a tile given back is used only if its leaves hash to the tile's root
//! the tree computed when the tile filled ([`TiledError::TileMismatch`] otherwise), so leaves
//! read back from a store that changed cannot produce a proof for a tree that never was.

use std::cell::RefCell;
use std::collections::HashMap;

use thiserror::Error;

use crate::merkle::{
    consistency_with, empty_root, inclusion_with, leaf_hash, node_hash, split_point, Hash,
    ProofError, SubtreeHashes, Tree,
};

/// Height of a tile: the in-memory tree starts this many levels above the leaves.
pub const TILE_HEIGHT: u32 = 6;
/// Leaves per tile: tile `t` holds leaves `[t·64, t·64 + 64)`.
pub const TILE_LEAVES: u64 = 1 << TILE_HEIGHT;

/// Complete tiles read back, by tile number.
pub type Tiles = HashMap<u64, Tile>;

/// The 64 leaf hashes of a complete tile, with the subtree hashes above them up to the tile's
/// root (computed once, when it is read back: a proof then looks them up).
#[derive(Debug, Clone)]
pub struct Tile(Tree);

impl Tile {
    /// The tile of these leaves; `None` unless there are exactly [`TILE_LEAVES`].
    pub fn new(leaves: &[Hash]) -> Option<Tile> {
        if leaves.len() as u64 != TILE_LEAVES {
            return None;
        }
        let mut tree = Tree::new();
        for leaf in leaves {
            tree.push(*leaf);
        }
        Some(Tile(tree))
    }

    /// The tile's root: what the tree holds for it once it is complete.
    pub fn root(&self) -> Hash {
        self.0.root()
    }
}

/// Why a [`TiledTree`] gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TiledError {
    /// The sizes or index asked for are not in the tree.
    #[error(transparent)]
    Proof(#[from] ProofError),
    /// Read the leaves of these tiles (ascending) and ask again with them.
    #[error("the leaves of tiles {0:?} are needed")]
    NeedTiles(Vec<u64>),
    /// The tile given is not the one the tree hashed.
    #[error("the leaves given for tile {0} do not hash to the tree's tile {0}")]
    TileMismatch(u64),
}

/// An append-only Merkle tree holding hashes from tile level up (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct TiledTree {
    /// A tree whose leaves are the roots of complete tiles: its level `h` holds the complete
    /// subtrees of height `TILE_HEIGHT + h`.
    tiles: Tree,
    /// The leaves of the last tile, which is not complete (fewer than 64).
    tail: Tree,
}

impl TiledTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf hash; returns its index.
    pub fn push(&mut self, leaf: Hash) -> u64 {
        let index = self.size();
        self.tail.push(leaf);
        if self.tail.size() == TILE_LEAVES {
            self.tiles.push(self.tail.root());
            self.tail = Tree::new();
        }
        index
    }

    /// Appends `leaf_hash(data)`; returns its index.
    pub fn push_data(&mut self, data: &[u8]) -> u64 {
        self.push(leaf_hash(data))
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.tiles.size() * TILE_LEAVES + self.tail.size()
    }

    /// The root of complete tile `tile`, if it is complete.
    pub fn tile_root(&self, tile: u64) -> Option<Hash> {
        self.tiles.leaf(tile)
    }

    /// The root at the current size (never needs a tile).
    pub fn root(&self) -> Hash {
        let none = Tiles::new();
        let view = View::new(self, &none);
        let root = view.mth(0, self.size());
        assert!(
            view.missing.borrow().is_empty(),
            "the current root lies outside complete tiles"
        );
        root
    }

    /// The root the tree had when it held `size` leaves.
    pub fn root_at(&self, size: u64, tiles: &Tiles) -> Result<Hash, TiledError> {
        self.check_size(size)?;
        self.run(tiles, |v| Ok(v.mth(0, size)))
    }

    /// The leaf hash at `index`.
    pub fn leaf(&self, index: u64, tiles: &Tiles) -> Result<Hash, TiledError> {
        let size = self.size();
        if index >= size {
            return Err(ProofError::IndexOutOfRange {
                index,
                tree_size: size,
            }
            .into());
        }
        self.run(tiles, |v| Ok(v.mth(index, index + 1)))
    }

    /// The inclusion proof of leaf `index` in the tree of the first `size` leaves.
    pub fn inclusion_proof(
        &self,
        index: u64,
        size: u64,
        tiles: &Tiles,
    ) -> Result<Vec<Hash>, TiledError> {
        self.check_size(size)?;
        self.run(tiles, |v| inclusion_with(v, index, size))
    }

    /// The consistency proof between the trees of the first `old_size` and `new_size` leaves.
    pub fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
        tiles: &Tiles,
    ) -> Result<Vec<Hash>, TiledError> {
        self.check_size(new_size)?;
        self.run(tiles, |v| consistency_with(v, old_size, new_size))
    }

    fn check_size(&self, size: u64) -> Result<(), ProofError> {
        let tree_size = self.size();
        if size > tree_size {
            return Err(ProofError::SizeBeyondTree { size, tree_size });
        }
        Ok(())
    }

    fn run<T>(
        &self,
        tiles: &Tiles,
        f: impl FnOnce(&View) -> Result<T, ProofError>,
    ) -> Result<T, TiledError> {
        let view = View::new(self, tiles);
        let out = f(&view)?;
        if let Some(tile) = view.mismatch.take() {
            return Err(TiledError::TileMismatch(tile));
        }
        let mut missing = view.missing.take();
        if missing.is_empty() {
            return Ok(out);
        }
        missing.sort_unstable();
        missing.dedup();
        Err(TiledError::NeedTiles(missing))
    }
}

/// One question to the tree: the tiles given, and what was missing or wrong among them.
struct View<'a> {
    tree: &'a TiledTree,
    tiles: &'a Tiles,
    missing: RefCell<Vec<u64>>,
    mismatch: RefCell<Option<u64>>,
}

impl<'a> View<'a> {
    fn new(tree: &'a TiledTree, tiles: &'a Tiles) -> Self {
        View {
            tree,
            tiles,
            missing: RefCell::new(Vec::new()),
            mismatch: RefCell::new(None),
        }
    }

    /// `MTH` of leaves `[start, end)` of tile `tile` (`start < end <= 64`, offsets in the tile).
    fn in_tile(&self, tile: u64, start: u64, end: u64) -> Hash {
        if tile == self.tree.tiles.size() {
            return self.tree.tail.mth(start, end);
        }
        let Some(given) = self.tiles.get(&tile) else {
            self.missing.borrow_mut().push(tile);
            return [0; 32];
        };
        if self.tree.tile_root(tile) != Some(given.root()) {
            *self.mismatch.borrow_mut() = Some(tile);
            return [0; 32];
        }
        given.0.mth(start, end)
    }
}

impl SubtreeHashes for View<'_> {
    /// `MTH(D[start:end])` for the ranges the proof algorithms ask for (aligned as in
    /// [`Tree`]): from the tile-level tree when the range covers whole tiles, from a tile's
    /// leaves when it lies inside one.
    fn mth(&self, start: u64, end: u64) -> Hash {
        assert!(
            start <= end && end <= self.tree.size(),
            "range must lie inside the tree"
        );
        let n = end - start;
        if n == 0 {
            return empty_root();
        }
        let tile = start / TILE_LEAVES;
        if n.is_power_of_two() && n >= TILE_LEAVES {
            assert_eq!(start % n, 0, "complete subtrees are aligned");
            return self
                .tree
                .tiles
                .complete(n.trailing_zeros() - TILE_HEIGHT, tile);
        }
        if (end - 1) / TILE_LEAVES == tile {
            let base = tile * TILE_LEAVES;
            return self.in_tile(tile, start - base, end - base);
        }
        let k = split_point(n);
        assert_eq!(start % k, 0, "left subtree must be aligned");
        node_hash(&self.mth(start, start + k), &self.mth(start + k, end))
    }
}
