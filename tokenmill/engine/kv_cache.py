"""The paged KV-cache manager: which blocks of the pool hold which request's keys and values.

Pure Python over integers: the tensors live in the model runner, this only hands out block ids.

    pool of num_blocks blocks, each block_size token slots
    request -> block table [block ids], enough for its computed + scheduled tokens
    block   -> ref count (requests using it) and, once full and computed, a hash

Prefix caching: a full block is identified by a hash chain, hash(parent block's hash, its tokens), so
equal hashes mean equal whole prefixes. A new request walks its prompt's chain and reuses every
cached block it finds (ref count + 1) instead of recomputing it. A block whose ref count drops to zero
goes to the free queue but keeps its hash and contents, so a later request can still hit it; the queue is
LRU (a dict in insertion order) and allocation evicts from its front. Freed requests release their
blocks tail-first, so a prefix's first blocks, shared by most requests, are evicted last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The parent hash of a request's first block.
_ROOT_HASH = 0x7F4A_7C15


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0
    """Prompt tokens looked up in the prefix cache."""
    hits: int = 0
    """Prompt tokens found there (not recomputed)."""


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


@dataclass(slots=True)
class _RequestBlocks:
    block_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    """Hashes of the request's full blocks, computed so far (a prefix of block_ids)."""


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))  # LRU order, front is evicted first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._requests: dict[str, _RequestBlocks] = {}
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self._requests[request_id].block_ids

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache

    def find_cached_prefix(self, request_id: str, token_ids: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of `token_ids` (full blocks only).

        The last token is never taken from the cache: its logits are needed to sample the next token.
        Does not take the blocks (`allocate` does) nor count the lookup (`record_lookup` does, once admitted).
        """
        if not self.enable_prefix_caching:
            return []
        hashes = self._hashes_for(request_id, token_ids, (len(token_ids) - 1) // self.block_size)
        found = []
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_tokens
        self.stats.hits += num_hit_tokens

    def _hashes_for(self, request_id: str, token_ids: list[int], num_full_blocks: int) -> list[int]:
        """The hash chain of the first `num_full_blocks` blocks, extending the request's memo."""
        entry = self._requests.setdefault(request_id, _RequestBlocks())
        bs = self.block_size
        while len(entry.hashes) < num_full_blocks:
            i = len(entry.hashes)
            parent = entry.hashes[-1] if entry.hashes else _ROOT_HASH
            entry.hashes.append(hash((parent, tuple(token_ids[i * bs:(i + 1) * bs]))))
        return entry.hashes[:num_full_blocks]

    # ------------------------------------------------------------------ allocation

    def allocate(self, request_id: str, num_tokens: int, cached_prefix: list[int] | None = None) -> bool:
        """Make the request's block table cover `num_tokens` tokens, taking `cached_prefix` blocks first.

        Returns False, changing nothing, when the free queue cannot supply the new blocks.
        """
        entry = self._requests.setdefault(request_id, _RequestBlocks())
        cached_prefix = cached_prefix or []
        if cached_prefix and entry.block_ids:
            raise ValueError("a cached prefix can only start an empty block table")
        need = self.blocks_needed(num_tokens) - len(entry.block_ids) - len(cached_prefix)
        # Cached blocks sitting in the free queue are taken out of it, so they can't be counted as free.
        reclaimed = sum(1 for b in cached_prefix if self._blocks[b].ref_cnt == 0)
        if need > len(self._free) - reclaimed:
            return False
        for block_id in cached_prefix:
            block = self._blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1
            entry.block_ids.append(block_id)
        for _ in range(max(need, 0)):
            entry.block_ids.append(self._pop_free())
        return True

    def _pop_free(self) -> int:
        block_id = next(iter(self._free))
        del self._free[block_id]
        block = self._blocks[block_id]
        if block.block_hash is not None:  # evict: its contents are about to be overwritten
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block_id

    def cache_computed(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Register the request's blocks that are now full and computed under their prefix hash."""
        if not self.enable_prefix_caching:
            return
        entry = self._requests[request_id]
        num_full = min(num_computed // self.block_size, len(entry.block_ids))
        for i, h in enumerate(self._hashes_for(request_id, token_ids, num_full)):
            block = self._blocks[entry.block_ids[i]]
            if block.block_hash is None and h not in self._cached:
                block.block_hash = h
                self._cached[h] = block.block_id

    def free(self, request_id: str) -> None:
        """Release the request's blocks. Tail blocks go first into the LRU queue: evicted before the prefix."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return
        for block_id in reversed(entry.block_ids):
            block = self._blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their contents)."""
        for block in self._blocks:
            block.block_hash = None
        self._cached.clear()
