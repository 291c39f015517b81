"""Vote receipts and their inclusion proofs in a finalized round's tree (results_svc/final.py
stores it).

A receipt is found in O(log n): its block by ledger-order key (round_result_blocks), that
block's leaves in one stored chunk, and the path above the block from the block roots, cached
per round. Results stored before block roots were fall back to the whole tree.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, TypeVar

from results_svc import store
from results_svc.checkpoint import LEAVES_PER_CHUNK
from results_svc.config import ResultsConfig
from results_svc.final import FinalResult, read_final
from results_svc.merkle import HASH_SIZE, MerkleTree, TopTree
from runtime.storage import Storage, fetch_one


@dataclass(frozen=True)
class Receipt:
    """A ledger vote's receipt and, once its round is final, where it stands in the result."""

    leaf_data: bytes
    receipt_hash: bytes
    final: FinalResult | None
    #: (leaf index, tree size, audit path, root); None before the result, or for a vote
    #: committed after the signed tree was taken (not part of it)
    proof: tuple[int, int, list[bytes], bytes] | None
    counted: bool  # the final result counts it (meaningful with a proof)


class Proofs:
    """Serves inclusion proofs of stored results, with the trees they need cached."""

    def __init__(self, storage: Storage, config: ResultsConfig) -> None:
        self._storage = storage
        self._config = config
        self._trees: OrderedDict[str, MerkleTree] = OrderedDict()
        self._tops: OrderedDict[str, TopTree] = OrderedDict()
        self._tree_lock = asyncio.Lock()

    async def receipt(self, vote_id: str) -> Receipt | None:
        """The receipt of ledger vote `vote_id` (canonical), None if there is no such vote."""
        async with self._storage.pool.connection() as connection:
            row: Any = await fetch_one(connection, store.VOTE_RECEIPT, (vote_id,))
            if row is None:
                return None
            final = await read_final(connection, row["round_id"])
            invalid = None
            if final is not None:
                invalid = await fetch_one(connection, store.INVALID_REASON,
                                          (row["round_id"], vote_id))
        receipt_hash = bytes(row["receipt_hash"])
        proof = None if final is None else await self.inclusion(
            row["round_id"], row["admitted_ms"], vote_id, receipt_hash)
        return Receipt(bytes(row["leaf_data"]), receipt_hash, final, proof, invalid is None)

    async def inclusion(self, round_id: str, admitted_ms: int, vote_id: str, receipt: bytes
                        ) -> tuple[int, int, list[bytes], bytes] | None:
        """(leaf index, tree size, audit path, root) of a ledger row in its round's signed
        tree, or None if the row is not in it (committed after the tree was taken).

        O(log n): the row's block is found by its ledger-order key in round_result_blocks,
        that block's leaves are one slice of a stored chunk, and the path above the block
        comes from the block roots (a few KiB per million votes, cached)."""
        top = await self._top_tree(round_id)
        if top is None:  # finalized before block roots were stored: the whole tree
            tree = await self.tree(round_id)
            try:
                index = tree.levels[0].index(receipt)
            except ValueError:
                return None
            return index, tree.size, tree.inclusion_proof(index), tree.root
        async with self._storage.pool.connection() as connection:
            row: Any = await fetch_one(connection, store.BLOCK_OF_VOTE,
                                       (round_id, admitted_ms, vote_id, receipt))
            if row is None:
                return None
            start = row["block"] * top.block_leaves
            row = await fetch_one(
                connection, store.LEAVES_OF_CHUNK,
                ((start % LEAVES_PER_CHUNK) * HASH_SIZE + 1, top.block_leaves * HASH_SIZE,
                 round_id, start // LEAVES_PER_CHUNK))
        blob = bytes(row["leaves"]) if row is not None else b""
        block = [blob[i:i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)]
        try:
            index = start + block.index(receipt)
        except ValueError:
            return None
        return index, top.size, top.inclusion_proof(index, block), top.root

    async def _top_tree(self, round_id: str) -> TopTree | None:
        top = _lookup(self._tops, round_id)
        if top is not None:
            return top
        async with self._storage.pool.connection() as connection:
            row: Any = await fetch_one(connection, store.BLOCK_ROOTS_OF_RESULT, (round_id,))
        if row is None:
            return None
        roots = bytes(row["roots"])
        top = TopTree([roots[i:i + HASH_SIZE] for i in range(0, len(roots), HASH_SIZE)],
                      row["block_leaves"], row["tree_size"])
        return _keep(self._tops, round_id, top, 256)  # ~0.3 MB each at 10 million votes

    async def tree(self, round_id: str) -> MerkleTree:
        """The whole signed tree of a finalized round, from its stored leaves (cached): for
        results stored before block roots were (see `inclusion`)."""
        async with self._tree_lock:
            tree = _lookup(self._trees, round_id)
            if tree is not None:
                return tree
            async with self._storage.pool.connection() as connection:
                cursor = await connection.execute(
                    store.ALL_LEAVES,
                    (round_id,))
                chunks: list[Any] = await cursor.fetchall()
                blob = b"".join([bytes(r["leaves"]) for r in chunks])
            tree = MerkleTree([blob[i:i + 32] for i in range(0, len(blob), 32)])
            return _keep(self._trees, round_id, tree, self._config.results_cached_trees)


CachedT = TypeVar("CachedT")


def _lookup(cache: OrderedDict[str, CachedT], key: str) -> CachedT | None:
    """A cached value, now the most recently used."""
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _keep(cache: OrderedDict[str, CachedT], key: str, value: CachedT, size: int) -> CachedT:
    """Cache `value`, dropping the least recently used beyond `size`."""
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)
    return value
