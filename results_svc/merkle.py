"""RFC 6962 / RFC 9162 Merkle trees over a round's vote receipts.

Leaves are hashed `SHA-256(0x00 || leaf_data)` (vote_svc stores that as `votes.receipt_hash`),
interior nodes `SHA-256(0x01 || left || right)`. For n leaves the RFC splits at k, the largest
power of two smaller than n; that is the same tree as building it level by level and carrying
an unpaired last node up unchanged (never duplicated), which is how it is built here.
The empty tree's hash is SHA-256 of nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from runtime.receipts import leaf_hash as leaf_hash  # the receipts' leaf hash, with its tree

HASH_SIZE = 32


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class MerkleTree:
    """All levels of a tree, for its root and any leaf's inclusion proof."""

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        self.levels: list[list[bytes]] = [list(leaf_hashes)]
        level = self.levels[0]
        while len(level) > 1:
            up = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                up.append(level[-1])
            self.levels.append(up)
            level = up

    @property
    def size(self) -> int:
        return len(self.levels[0])

    @property
    def root(self) -> bytes:
        if not self.levels[0]:
            return hashlib.sha256(b"").digest()
        return self.levels[-1][0]

    def inclusion_proof(self, index: int) -> list[bytes]:
        """PATH(index, D[n]) of RFC 9162 section 2.1.3.1, from the leaf up."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        path = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index //= 2
        return path


class TopTree:
    """The levels of a tree from its blocks up: each block is `block_leaves` (a power of two)
    consecutive leaves, the last block possibly fewer, and its root is the node of the full
    tree at that height (the level-by-level construction pairs nodes inside aligned blocks
    and carries a last unpaired node up unchanged, so a block's own tree is exactly its part
    of the full tree). With one block's leaves this gives any leaf's inclusion proof, while
    keeping n / block_leaves nodes instead of 2n."""

    def __init__(self, block_roots: Sequence[bytes], block_leaves: int, size: int) -> None:
        assert block_leaves & (block_leaves - 1) == 0, "a power of two"
        self.block_leaves = block_leaves
        self.size = size
        self.top = MerkleTree(block_roots)

    @staticmethod
    def block_roots_of(tree: MerkleTree, block_leaves: int) -> list[bytes]:
        height = block_leaves.bit_length() - 1
        if not tree.size:
            return []
        if height < len(tree.levels):
            return list(tree.levels[height])
        return [tree.root]

    @property
    def root(self) -> bytes:
        return self.top.root

    def block_of(self, index: int) -> int:
        return index // self.block_leaves

    def inclusion_proof(self, index: int, block_leaf_hashes: Sequence[bytes]) -> list[bytes]:
        """PATH(index, D[n]), given the leaves of the block holding `index`."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        block = self.block_of(index)
        lower = MerkleTree(block_leaf_hashes).inclusion_proof(index - block * self.block_leaves)
        return lower + self.top.inclusion_proof(block)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    return MerkleTree(leaf_hashes).root


def reference_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) exactly as RFC 9162 section 2.1.1 writes it (recursive; for tests)."""
    n = len(leaf_hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hashes[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(reference_root(leaf_hashes[:k]), reference_root(leaf_hashes[k:]))


def verify_inclusion(leaf: bytes, index: int, tree_size: int, path: Sequence[bytes],
                     root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: does `path` lead from leaf hash `leaf` at `index` to `root`?"""
    if index >= tree_size or tree_size <= 0:
        return False
    fn, sn = index, tree_size - 1
    r = leaf
    for p in path:
        if len(p) != HASH_SIZE or sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


class IncrementalRoot:
    """MTH(D[n]) of RFC 9162 over leaves fed in order, in O(log n) memory.

    n leaves split into perfect subtrees, one per binary digit of n, largest first (the
    RFC's split at the largest power of two smaller than n, applied recursively); only their
    roots are kept, and the tree's root folds them from the right. Appending a perfect subtree
    of s leaves when n is a multiple of s merges it with the trailing subtrees as a binary
    carry does, so a caller may hash a whole aligned block of leaves first (faster in Python
    than one leaf at a time) and append its root."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []

    def add(self, leaf: bytes) -> None:
        """Append one leaf hash."""
        self.add_subtree(leaf, 1)

    def add_subtree(self, root: bytes, leaves: int) -> None:
        """Append the root of a perfect subtree of `leaves` (a power of two) leaf hashes."""
        assert leaves > 0 and leaves & (leaves - 1) == 0, "a power of two"
        assert self.size % leaves == 0, "a subtree starts at a multiple of its size"
        self._stack.append(root)
        self.size += leaves
        carry = self.size // leaves
        while carry % 2 == 0:
            right = self._stack.pop()
            self._stack.append(node_hash(self._stack.pop(), right))
            carry //= 2

    @property
    def root(self) -> bytes:
        if not self._stack:
            return hashlib.sha256(b"").digest()
        root = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            root = node_hash(left, root)
        return root


def perfect_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The root of a perfect subtree (a power of two of leaf hashes), level by level."""
    level = list(leaf_hashes)
    sha256 = hashlib.sha256
    while len(level) > 1:
        level = [sha256(b"\x01" + level[i] + level[i + 1]).digest()
                 for i in range(0, len(level), 2)]
    return level[0]
