"""The KV cache's blocks: who holds each one, and the prefix cache over the full ones.

The cache is a pool of fixed-size blocks; a sequence holds a list of them (its block table).
A full block of prompt tokens is known by a SHA-256 digest chained over every token before it, so
two prompts that share a prefix (the system prompt, the MCQ instruction) share its blocks, counted
by reference. The digest is cryptographic because prompts come from clients: with a forgeable key
(Python's `hash()`), a crafted prompt could collide with another user's prefix and be served its
K/V (vLLM's advisory GHSA-rm76-4mrf-v9r8). A block nobody holds keeps its contents and its key
until a fresh block is needed: the least recently freed one is reused first (LRU), so a prefix
stays cached as long as memory allows. Only this pool hands out blocks; the scheduler owns it.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque

# What the first block's digest chains from: a fixed 32 bytes, like every digest after it. It
# need not be secret: keys are safe because SHA-256 collisions cannot be found, not because the
# root is unknown.
ROOT_HASH = hashlib.sha256(b"replica prefix cache: root").digest()


def block_hashes(tokens: list[int], block_size: int, full_blocks: int) -> list[bytes]:
    """The chained keys of the first `full_blocks` blocks of `tokens`: block i's key is
    sha256(key of block i - 1, or ROOT_HASH || its tokens as unsigned 32-bit little-endian).

    The encoding is injective: the parent is always 32 bytes and every token id 4 (a Qwen3 id is
    below 2**18; one outside 0..2**32-1 raises rather than wrapping). So equal keys mean equal
    token prefixes, unless SHA-256 itself collides. Costs about 40 ns a token on one CPU core."""
    pack = struct.Struct(f"<{block_size}I").pack
    sha256 = hashlib.sha256
    hashes, parent = [], ROOT_HASH
    for i in range(full_blocks):
        parent = sha256(parent + pack(*tokens[i * block_size : (i + 1) * block_size])).digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens: reference counts, free list, prefix cache.
    `caching` False shares no prefix (the ablation; `set_caching` between runs)."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.refs: list[int] = []
        self.forget()

    def forget(self) -> None:
        """Every block free, nothing cached, counts at zero (after the start-up warm-up)."""
        assert not any(self.refs), "blocks are still held"
        self.refs = [0] * self.num_blocks
        self.hash_of: list[bytes | None] = [None] * self.num_blocks
        self.by_hash: dict[bytes, int] = {}  # key -> the block holding those tokens' K/V
        self._free: deque[int] = deque(range(self.num_blocks))  # no contents worth keeping
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, held by none; oldest first
        self.hit_tokens = 0  # prompt tokens found in the cache, over all lookups
        self.lookup_tokens = 0  # prompt tokens looked up

    def set_caching(self, on: bool) -> None:
        """Share cached prefixes or not from now on, starting from an empty cache."""
        self.forget()
        self.caching = on

    @property
    def num_free(self) -> int:
        """Blocks a caller may take now: never used, or cached and held by no sequence."""
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self.by_hash)

    def cached_prefix(self, tokens: list[int]) -> list[int]:
        """The cached blocks that hold the longest full-block prefix of `tokens`, leaving at
        least the last token to compute (its logits are what a prefill is for)."""
        full = (len(tokens) - 1) // self.block_size if self.caching else 0
        found = []
        for value in block_hashes(tokens, self.block_size, full):
            block = self.by_hash.get(value)
            if block is None:
                break
            found.append(block)
        return found

    def note_lookup(self, tokens: int, hit_blocks: int) -> None:
        """Count an admitted prompt of `tokens` tokens that found `hit_blocks` blocks cached."""
        self.lookup_tokens += tokens
        self.hit_tokens += hit_blocks * self.block_size

    def hold(self, blocks: list[int]) -> None:
        """One more holder of each block (a cache hit, or a forked sequence)."""
        for block in blocks:
            if self.refs[block] == 0:
                del self._idle[block]
            self.refs[block] += 1

    def take(self, count: int) -> list[int]:
        """`count` fresh blocks, each held once; never-used blocks first, then the least
        recently idle cached ones (their hashes are forgotten)."""
        if count > self.num_free:
            raise RuntimeError(f"{count} blocks asked for, {self.num_free} free")
        taken = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._idle.popitem(last=False)
                del self.by_hash[self.hash_of[block]]  # type: ignore[index]
                self.hash_of[block] = None
            self.refs[block] = 1
            taken.append(block)
        return taken

    def release(self, blocks: list[int]) -> None:
        """Drop one holder of each block; a block nobody holds stays cached if it has a hash.
        Released in reverse, so a sequence's last blocks are the first reused."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            assert self.refs[block] >= 0, f"block {block} released more often than held"
            if self.refs[block] == 0:
                if self.hash_of[block] is None:
                    self._free.append(block)
                else:
                    self._idle[block] = None

    def register(self, blocks: list[int], tokens: list[int], computed: int) -> None:
        """Record the full blocks among the first `computed` tokens of `tokens` (now in the
        cache) under their hashes, so later prompts can share them."""
        full = computed // self.block_size if self.caching else 0
        for block, value in zip(blocks, block_hashes(tokens, self.block_size, full), strict=False):
            if self.hash_of[block] is None and value not in self.by_hash:
                self.hash_of[block] = value
                self.by_hash[value] = block
