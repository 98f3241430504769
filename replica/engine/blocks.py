"""The KV cache's blocks: who holds each one, and the prefix cache over the full ones.

The cache is a pool of fixed-size blocks; a sequence holds a list of them (its block table).
A full block of prompt tokens is known by a hash chained over every token before it, so two
prompts that share a prefix (the system prompt, the MCQ instruction) share its blocks, counted by
reference. A block nobody holds keeps its contents and its hash until a fresh block is needed:
the least recently freed one is reused first (LRU), so a prefix stays cached as long as memory
allows. Only this pool hands out blocks; the scheduler owns it.
"""

from __future__ import annotations

from collections import OrderedDict, deque

ROOT_HASH = 0  # what the first block's hash chains from


def block_hashes(tokens: list[int], block_size: int, full_blocks: int) -> list[int]:
    """The chained hashes of the first `full_blocks` blocks of `tokens`.

    Python's hash of a tuple of ints is the same in every process (only str and bytes hashes are
    salted); two different prefixes collide with probability about 2**-64 per pair."""
    hashes, parent = [], ROOT_HASH
    for i in range(full_blocks):
        parent = hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens: reference counts, free list, prefix cache.
    `caching` False shares no prefix (the ablation; settable between runs, after `forget`)."""

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
        self.hash_of: list[int | None] = [None] * self.num_blocks
        self.by_hash: dict[int, int] = {}  # hash -> the block holding those tokens' K/V
        self._free: deque[int] = deque(range(self.num_blocks))  # no contents worth keeping
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, held by none; oldest first
        self.hit_tokens = 0  # prompt tokens found in the cache, over all lookups
        self.lookup_tokens = 0  # prompt tokens looked up

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
