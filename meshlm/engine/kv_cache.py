"""Rank 0's accounting of the paged KV cache: which block belongs to which request, and prefix reuse.

The pool is ``num_blocks`` blocks of ``block_size`` token slots; block ids are ``0..num_blocks-1``
and index the same physical block on every rank (each rank's pool holds only its own KV heads and
layers). A request's ``block_ids`` is its block table: token position ``p`` lives in slot
``p % block_size`` of block ``block_ids[p // block_size]``.

Prefix caching: once a block is full and computed, it is keyed by a chained hash of its tokens and
of every token before it, so two requests share a block only when their whole prefix up to the end
of that block is identical. Only full blocks are shared, and they are never written again: a
request always computes at least its last known token itself, into a block of its own. A freed
block keeps its key and can be found again until the allocator needs it for something else; free
blocks without a key are handed out first, then keyed free blocks, least recently freed first.

Forking (``n > 1`` samples and beam search): a child sequence takes its parent's whole block table,
each block's reference count going up by one, so a prompt prefilled once serves every sample. A
block several sequences hold may be partly filled; the first of them that writes into it gets a
copy of its own (copy-on-write): ``allocate`` swaps in a fresh block and records the (source,
destination) pair, which the step plan carries and every rank copies before its forward.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

from meshlm.engine.request import Request

__all__ = ["KVCacheManager", "num_blocks_for", "hash_block"]


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The chained key of a full block: SHA-256 of the parent block's key and this block's tokens.

    A cryptographic hash, not Python's ``hash``: prompts come from clients, and a crafted prompt
    whose key collided with another client's prefix would be served that client's KV.
    """
    data = array("q", token_ids).tobytes()  # 8 bytes a token id
    return hashlib.sha256(data if parent is None else parent + data).digest()


class KVCacheManager:
    """Allocates KV blocks to requests, with ref-counted sharing of cached full-block prefixes.

    Runs on rank 0 only; the other ranks learn a request's block table from the step plan.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_keys: list[bytes | None] = [None] * num_blocks
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._cached: dict[bytes, int] = {}  # key -> block id
        # request id -> key of each of its full, computed blocks, from its first block on
        self._request_keys: dict[str, list[bytes]] = {}
        self._block_copies: list[tuple[int, int]] = []  # (src, dst) pairs since take_block_copies

    # ---- accounting -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds, including cached ones that may be evicted."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by prefix lookup, whether held by a request or free."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        """How many requests hold ``block_id``."""
        return self._ref_counts[block_id]

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """Blocks ``request`` lacks to hold its computed tokens plus ``num_new_tokens`` more,
        counting a copy of each shared block those new tokens are written into."""
        needed = num_blocks_for(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(request.block_ids)) + len(self._shared_written(request, needed))

    def _shared_written(self, request: Request, num_blocks_needed: int) -> list[int]:
        """Indices into ``request.block_ids`` of the blocks the next tokens are written into
        (from its first uncomputed token on) that other sequences hold too."""
        block_ids, ref_counts = request.block_ids, self._ref_counts
        first = request.num_computed_tokens // self.block_size
        last = min(num_blocks_needed, len(block_ids))
        return [i for i in range(first, last) if ref_counts[block_ids[i]] > 1]

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(request, num_new_tokens) <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        """Extend ``request.block_ids`` to cover its computed tokens plus ``num_new_tokens``."""
        if not self.try_allocate(request, num_new_tokens):
            raise RuntimeError(
                f"request {request.request_id}: {self.num_new_blocks(request, num_new_tokens)} new KV blocks "
                f"needed for num_computed_tokens={request.num_computed_tokens} + num_new_tokens={num_new_tokens} "
                f"(block_size={self.block_size}, holds {len(request.block_ids)}), but only "
                f"{self.num_free_blocks} of {self.num_blocks} are free; check can_allocate first")

    def try_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """``allocate`` when the free blocks suffice (True), else change nothing (False)."""
        block_ids = request.block_ids
        needed = num_blocks_for(request.num_computed_tokens + num_new_tokens, self.block_size)
        shared = self._shared_written(request, needed)
        if max(0, needed - len(block_ids)) + len(shared) > self.num_free_blocks:
            return False
        for index in shared:  # copy-on-write
            src, dst = block_ids[index], self._take_free_block()
            self._release(src)  # still held by the others
            block_ids[index] = dst
            self._block_copies.append((src, dst))
            request.block_table_version += 1
        for _ in range(needed - len(block_ids)):
            block_ids.append(self._take_free_block())
        return True

    def fork(self, parent: Request, child: Request) -> None:
        """Give ``child`` (holding no blocks) ``parent``'s block table, every block shared."""
        assert not child.block_ids, f"request {child.request_id} already holds blocks"
        for block_id in parent.block_ids:
            self._share(block_id)
        child.block_ids.extend(parent.block_ids)
        child.block_table_version += 1
        self._request_keys[child.request_id] = list(self._request_keys.get(parent.request_id, ()))

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) copy-on-write pairs made since the last call; every rank copies them
        before the next forward."""
        copies, self._block_copies = self._block_copies, []
        return copies

    def free(self, request: Request) -> None:
        """Release every block of ``request`` and clear its block table.

        Blocks are released last block first, so that when they are evicted later the tail of a
        prefix goes before its head (the head is the part other requests are likelier to share).
        """
        for block_id in reversed(request.block_ids):
            self._release(block_id)
        request.block_ids.clear()
        request.block_table_version += 1
        self._request_keys.pop(request.request_id, None)

    def free_excess_blocks(self, request: Request) -> None:
        """Release the blocks past those that hold ``request.num_computed_tokens`` (a verify step's
        rejected drafts wrote there), last block first. They were never keyed for the prefix cache."""
        keep = num_blocks_for(request.num_computed_tokens, self.block_size)
        for block_id in reversed(request.block_ids[keep:]):
            self._release(block_id)
        del request.block_ids[keep:]
        request.block_table_version += 1

    def _take_free_block(self) -> int:
        if self._free_uncached:
            return self._acquire(self._free_uncached.popleft())
        block_id, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
        key = self._block_keys[block_id]
        del self._cached[key]
        self._block_keys[block_id] = None
        return self._acquire(block_id)

    def _acquire(self, block_id: int) -> int:
        assert self._ref_counts[block_id] == 0, f"block {block_id} is already held"
        self._ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        assert self._ref_counts[block_id] > 0, f"block {block_id} freed more often than taken"
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id]:
            return
        if self._block_keys[block_id] is None:
            self._free_uncached.append(block_id)
        else:
            self._free_cached[block_id] = None

    # ---- prefix caching -----------------------------------------------------------------------

    def get_computed_prefix(self, request: Request) -> int:
        """Share the longest cached prefix of ``request``'s tokens with it; return its length.

        Called at admission, on a request that holds no blocks and has computed nothing. The cached
        blocks join ``request.block_ids`` (ref-counted) and ``request.num_computed_tokens`` becomes
        their token count. At most ``(num_tokens - 1) // block_size`` blocks are taken, so the last
        known token is always computed again: its logits give the next token.
        """
        assert not request.block_ids and request.num_computed_tokens == 0, \
            f"request {request.request_id} already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        keys: list[bytes] = []
        for index in range((request.num_tokens - 1) // self.block_size):
            key = hash_block(keys[-1] if keys else None, self._block_tokens(request, index))
            block_id = self._cached.get(key)
            if block_id is None:
                break
            self._share(block_id)
            request.block_ids.append(block_id)
            keys.append(key)
        num_cached_tokens = len(keys) * self.block_size
        self._request_keys[request.request_id] = keys
        request.num_computed_tokens = num_cached_tokens
        if request.num_preemptions == 0:
            request.num_cached_prompt_tokens = min(num_cached_tokens, request.num_prompt_tokens)
        return num_cached_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Key every full, computed block of ``request`` not keyed yet, so later requests find it.

        Call after ``request.num_computed_tokens`` advanced. A block whose key another block already
        has (two requests computed the same prefix at once) stays unkeyed; the first one is kept.
        """
        if not self.enable_prefix_caching:
            return
        keys = self._request_keys.get(request.request_id)
        num_full = request.num_computed_tokens // self.block_size
        if keys is None:
            keys = self._request_keys[request.request_id] = []
        elif len(keys) >= num_full:  # a decode within its last block: nothing new is full
            return
        for index in range(len(keys), num_full):
            key = hash_block(keys[-1] if keys else None, self._block_tokens(request, index))
            block_id = request.block_ids[index]
            if key not in self._cached and self._block_keys[block_id] is None:
                self._cached[key] = block_id
                self._block_keys[block_id] = key
            keys.append(key)

    def reset_prefix_cache(self) -> None:
        """Forget every cached key; blocks held by requests stay held, free ones become plain free."""
        self._cached.clear()
        self._block_keys = [None] * self.num_blocks
        self._free_uncached.extend(self._free_cached)
        self._free_cached.clear()
        # Running requests keep their chains of keys: a key depends only on tokens, so the blocks
        # they fill later are keyed correctly, and found again once their prefix is cached again.
    def _share(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            del self._free_cached[block_id]
        self._ref_counts[block_id] += 1

    def _block_tokens(self, request: Request, index: int) -> list[int]:
        """The token ids of block ``index`` of ``request``, without building the whole token list."""
        start, end = index * self.block_size, (index + 1) * self.block_size
        prompt, num_prompt = request.prompt_token_ids, request.num_prompt_tokens
        if end <= num_prompt:
            return prompt[start:end]
        if start >= num_prompt:
            return request.output_token_ids[start - num_prompt:end - num_prompt]
        return prompt[start:] + request.output_token_ids[:end - num_prompt]
