"""Physical KV blocks and per-sequence block tables (vLLM's ``BlockSpaceManager``).

Blocks carry reference counts so sequences can share them:

* Copy-on-write: a forked sequence points at its parent's blocks, and appending into a shared,
  partly filled block copies it first. The engine turns the returned (src, dst) pairs into one
  ``copy_blocks`` call per step.
* Automatic prefix caching: a full block is keyed by its token ids and its parent block's key
  (so the key names the whole prefix). A new sequence reuses the longest run of cached full blocks
  of its tokens. A block whose count drops to zero stays cached in the free list, which is kept
  least-recently-freed first, and loses its key only when it is taken for new content.
* Partial-block hits: a shared prefix rarely ends on a block boundary (a chat template's system
  prompt and the start of its user turn, a few-shot preamble). After its run of full hits, a new
  sequence's next block gets a copy of a cached block with the same parent whose leading tokens it
  shares (one of the ``PARTIAL_CANDIDATES`` most recently keyed), and those tokens count as
  computed: the positions a block-granular cache would compute again (8 of SmolLM2's 24-token
  template prefix at block size 16). The copy runs with the step's other block copies, before
  the model writes anything, so its source must have been written by an earlier step (blocks keyed
  in the step being scheduled are not candidates) and is held until the step has run, so that
  the step allocates it to no one (``finish_step``).

Placement: the cache's blocks are grouped in extents of ``EXTENT_BLOCKS`` consecutive blocks. A
sequence's new block is the one after its last block when that one is free and in the same extent;
else the first block of a wholly free extent, a warm one (written before) in preference to a fresh
one while enough warm ones are free (``BlockAllocator._free_extent``); else, when no extent is
wholly free, the least recently freed block. A sequence's keys and values then lie in runs of
consecutive blocks even after a long job has recycled the cache, and decode attention reads runs
faster than scattered blocks (docs/performance.md, "Where decode attention's bandwidth goes").
Cached blocks are evicted about an extent at a time, from the extent's first block: a prefix whose
head is taken is lost, and its later blocks keep keys that no lookup reaches until they are taken
or the prefix is computed again (``cache_block``). docs/architecture.md gives the hit rates.
"""

import enum
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice

from pagedlm.engine.sequence import BlockKey, Sequence, SequenceGroup, SequenceStatus
from pagedlm.utils import cdiv


class AllocStatus(enum.Enum):
    OK = enum.auto()
    LATER = enum.auto()
    NEVER = enum.auto()


@dataclass
class PrefixPlan:
    """Where a waiting sequence's leading blocks come from when it is admitted: cached blocks
    (already computed), or the first ``num_shared_blocks`` blocks of an earlier sequence of its
    group, which it ``waits`` for when that sequence has still to compute them."""

    cached_blocks: list[int]
    shares_with: Sequence | None = None
    num_shared_blocks: int = 0
    waits: bool = False
    # (cached block, tokens): the next block starts as a copy of that block's first tokens.
    partial_hit: tuple[int, int] | None = None

    @property
    def num_computed_blocks(self) -> int:
        return self.num_shared_blocks if self.shares_with is not None else len(self.cached_blocks)

    def num_computed_tokens(self, block_size: int) -> int:
        return self.num_computed_blocks * block_size + (self.partial_hit[1] if self.partial_hit else 0)


# Blocks per extent (module docstring): 256 tokens at the default block size, a typical sequence.
EXTENT_BLOCKS = 16
# Wholly free warm extents kept (their cached prefixes with them) before the oldest is reused: 128
# blocks, 2,048 tokens at the default block size. Without it a small job reused the one extent the
# call before had freed, and every prefix of that call was lost with a cache nearly all free.
WARM_RESERVE_EXTENTS = 8
# Cached blocks a partial-block hit compares against, the most recently keyed first: children of
# one parent usually share the same leading tokens (the rest of a common prefix), so a few suffice.
PARTIAL_CANDIDATES = 8


class BlockAllocator:
    """Physical block numbers with reference counts, an LRU free list, the wholly free extents
    (fresh ones in block order, warm ones least recently freed first) and the prefix-cache map."""

    def __init__(self, num_kv_blocks: int, extent_blocks: int = EXTENT_BLOCKS,
                 warm_reserve_extents: int = WARM_RESERVE_EXTENTS) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.extent_blocks = extent_blocks
        self.warm_reserve_extents = warm_reserve_extents
        self.ref_counts = [0] * num_kv_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_kv_blocks))
        num_extents = cdiv(num_kv_blocks, extent_blocks)
        self.extent_sizes = [min(extent_blocks, num_kv_blocks - e * extent_blocks) for e in range(num_extents)]
        self.free_in_extent = list(self.extent_sizes)
        # Wholly free extents: never written (fresh, in block order) and written before (warm, least
        # recently freed first); see _free_extent.
        self.fresh_extents: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_extents))
        self.warm_free_extents: OrderedDict[int, None] = OrderedDict()
        self.block_keys: list[BlockKey | None] = [None] * num_kv_blocks
        self.cached_blocks: dict[BlockKey, int] = {}  # the prefix cache
        # The cached blocks under each parent key, in the order they were keyed (partial-block hits).
        self.cached_children: dict[int | str | None, OrderedDict[int, None]] = {}

    def allocate(self, after: int | None = None) -> int:
        """A free block for new content, placed after ``after`` (the sequence's last block, if any)
        where it can be (module docstring); a cached block taken loses its key."""
        if not self.free_blocks:
            raise RuntimeError("Out of KV cache blocks; the scheduler should have prevented this.")
        block = self._place(after)
        self._take(block)
        if self.block_keys[block] is not None:
            del self.cached_blocks[self.block_keys[block]]
            self._drop_key(block)
        self.ref_counts[block] = 1
        return block

    def _place(self, after: int | None) -> int:
        if after is not None:
            block = after + 1
            # Within its extent only: at an extent's end the sequence goes where _free_extent says,
            # which is the next extent when that is the fresh one due (a long job's first pass).
            if block % self.extent_blocks and block in self.free_blocks:
                return block
        extent = self._free_extent()
        if extent is not None:
            return extent * self.extent_blocks
        return next(iter(self.free_blocks))

    def _free_extent(self) -> int | None:
        """The wholly free extent a sequence goes on in, from its first block: the warm one freed
        longest ago while more than a quarter of the warm extents, and more than
        ``warm_reserve_extents``, are wholly free, else a fresh one, else the oldest warm one. The cache is ``torch.empty``, so a block's first write maps its
        pages, and on a VM whose host backs guest memory on first use that costs more than the
        step's work (AlpacaEval: 6-13 s of a 42-49 s run in ``reshape_and_cache`` when fresh extents
        came first). A job so writes about a third more memory than it holds at its peak, not the
        whole cache. The price is the prefix cache's memory: while fresh extents remain, a freed
        prefix stays only until its extent is the oldest of the warm ones kept free (a quarter of
        them, and at least ``warm_reserve_extents``: a few requests per call, call after call, keep
        their prefixes, e.g. alternating system prompts)."""
        reserve = max(self.warm_reserve_extents, self.num_warm_extents / 4)
        if self.warm_free_extents and (not self.fresh_extents or len(self.warm_free_extents) > reserve):
            return next(iter(self.warm_free_extents))
        return next(iter(self.fresh_extents), None)

    @property
    def num_warm_extents(self) -> int:
        """Extents that have held a block (a fresh extent becomes warm when its first block is taken)."""
        return len(self.extent_sizes) - len(self.fresh_extents)

    def _is_free_extent(self, extent: int) -> bool:
        return self.free_in_extent[extent] == self.extent_sizes[extent]

    def _take(self, block: int) -> None:
        del self.free_blocks[block]
        extent = block // self.extent_blocks
        if extent in self.fresh_extents:
            del self.fresh_extents[extent]
        elif self._is_free_extent(extent):
            del self.warm_free_extents[extent]
        self.free_in_extent[extent] -= 1

    def incref(self, block: int) -> None:
        """Take one more reference to a block, reviving it from the free list if cached there."""
        if self.ref_counts[block] == 0:
            self._take(block)
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None
            extent = block // self.extent_blocks
            self.free_in_extent[extent] += 1
            if self._is_free_extent(extent):
                self.warm_free_extents[extent] = None

    def cache_block(self, block: int, key: BlockKey) -> None:
        """Key ``block``, unless it has a key or a block in use holds ``key``: a free block that
        holds it gives it up. (A reused extent evicts the head of a prefix cached in it, and its
        later blocks keep keys that no lookup reaches; the same prefix computed again takes them.)"""
        if self.block_keys[block] is not None:
            return
        old = self.cached_blocks.get(key)
        if old is not None:
            if self.ref_counts[old] > 0:
                return
            self._drop_key(old)
        self.cached_blocks[key] = block
        self.block_keys[block] = key
        self.cached_children.setdefault(key[0], OrderedDict())[block] = None

    def _drop_key(self, block: int) -> None:
        """Forget ``block``'s key in ``block_keys`` and ``cached_children`` (not ``cached_blocks``)."""
        parent = self.block_keys[block][0]
        children = self.cached_children[parent]
        del children[block]
        if not children:
            del self.cached_children[parent]
        self.block_keys[block] = None

    def reset_prefix_cache(self) -> None:
        self.cached_blocks.clear()
        self.cached_children.clear()
        self.block_keys = [None] * self.num_kv_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)


class BlockSpaceManager:
    """Maps each sequence to its block table and decides whether work fits in the cache."""

    def __init__(self, block_size: int, num_kv_blocks: int, watermark: float = 0.01, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.watermark_blocks = int(watermark * num_kv_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.allocator = BlockAllocator(num_kv_blocks)
        self.block_tables: dict[int, list[int]] = {}
        # Shared blocks that one sequence of a re-admitted group computes for the others, which wait
        # for them: that sequence writes into them without a copy-on-write.
        self.blocks_computed_for_sharers: set[int] = set()
        # Blocks keyed by the step being scheduled: their content is written only when it runs.
        self.blocks_keyed_this_step: set[int] = set()
        # Sources of the step's partial-hit copies, held until it has run, so that no block the
        # step allocates is one whose content a copy of the same step reads.
        self.held_copy_sources: list[int] = []
        self.peak_blocks_in_use = 0
        self.num_queried_tokens = 0  # tokens of admitted sequences
        self.num_hit_tokens = 0  # of which served from the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def free_all(self) -> None:
        """Every block free and no prefix cached, whatever state an interrupted operation left (an
        interrupt can land between a table's change and its blocks' reference counts); for when no
        sequence holds blocks any more (``Scheduler.requeue``)."""
        self.allocator = BlockAllocator(self.num_kv_blocks, self.allocator.extent_blocks,
                                        self.allocator.warm_reserve_extents)
        self.block_tables.clear()
        self.blocks_computed_for_sharers.clear()
        self.blocks_keyed_this_step.clear()
        self.held_copy_sources.clear()

    def num_cache_creation_tokens(self, seq: Sequence) -> int:
        """Prompt tokens that ``seq``'s prefill writes into the prefix cache beyond those it found
        there (its full prompt blocks' tokens less its hits; vLLM's ``num_cache_creation_tokens``),
        0 without prefix caching."""
        if not self.enable_prefix_caching:
            return 0
        return max(len(seq.prompt_token_ids) // self.block_size * self.block_size - seq.num_computed_tokens, 0)

    def computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest run of ``seq``'s full leading blocks, leaving at least
        its last token to compute (its logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self.allocator.cached_blocks.get(seq.block_key(i))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def partial_hit(self, seq: Sequence, num_cached_blocks: int) -> tuple[int, int] | None:
        """A cached block written by an earlier step whose leading tokens equal those of ``seq``'s
        block ``num_cached_blocks`` (the first one its full hits leave), and how many, leaving its
        last token to compute; None when no candidate shares a token."""
        start = num_cached_blocks * self.block_size
        tokens = seq.token_ids(start, min(start + self.block_size, seq.num_tokens - 1))
        parent = hash(seq.block_key(num_cached_blocks - 1)) if num_cached_blocks else seq.cache_salt
        children = self.allocator.cached_children.get(parent)
        if not tokens or not children:
            return None
        best, best_count = None, 0
        candidates = (b for b in reversed(children) if b not in self.blocks_keyed_this_step)
        for block in islice(candidates, PARTIAL_CANDIDATES):
            cached = self.allocator.block_keys[block][1]
            count = next((i for i, (a, b) in enumerate(zip(tokens, cached)) if a != b), len(tokens))
            if count > best_count:
                best, best_count = block, count
        return (best, best_count) if best is not None else None

    def can_allocate(
        self, seq_group: SequenceGroup, use_prefix_cache: bool = True
    ) -> tuple[AllocStatus, dict[int, PrefixPlan]]:
        """Whether the group's waiting sequences fit now, later or never, and where each one's
        leading blocks come from (by ``seq_id``), for ``allocate``: one prefix-cache lookup per
        admission. A block two sequences of the group share is counted once: a group preempted
        after forking takes its shared prompt (and any shared output) back into shared blocks."""
        plans: dict[int, PrefixPlan] = {}
        earlier: list[Sequence] = []
        # Free cached blocks the group's full hits take off the free list (each once, however many
        # sequences hit it), and the free sources of its partial hits, held until the step has run.
        # Kept apart: dropping the partial hits must leave the full hits' count whole.
        taken: set[int] = set()
        held: set[int] = set()
        num_required = 0
        for seq in seq_group.get_seqs(SequenceStatus.WAITING):
            cached = self.computed_blocks(seq) if use_prefix_cache else []
            owner, num_shared = self._longest_shared_prefix(seq, earlier)
            if num_shared > len(cached):
                owner_plan = plans[owner.seq_id]
                waits = owner_plan.waits or num_shared > owner_plan.num_computed_blocks
                plans[seq.seq_id] = PrefixPlan([], owner, num_shared, waits)
                num_required += seq.num_logical_blocks - num_shared
            else:
                partial = self.partial_hit(seq, len(cached)) if use_prefix_cache and self.enable_prefix_caching else None
                plans[seq.seq_id] = PrefixPlan(cached, partial_hit=partial)
                num_required += seq.num_logical_blocks - len(cached)
                taken.update(b for b in cached if not self.allocator.ref_counts[b])
                if partial and not self.allocator.ref_counts[partial[0]]:
                    held.add(partial[0])
            earlier.append(seq)
        num_required += len(taken)
        num_held = len(held - taken)
        if self.num_kv_blocks - num_required < self.watermark_blocks:
            return AllocStatus.NEVER, plans
        if self.num_free_blocks - num_required - num_held >= self.watermark_blocks:
            return AllocStatus.OK, plans
        if self.num_free_blocks - num_required >= self.watermark_blocks:
            # Only the held sources do not fit: without its partial hits the group fits now (and
            # waiting could be forever: nothing may be running to free a block).
            for plan in plans.values():
                plan.partial_hit = None
            return AllocStatus.OK, plans
        return AllocStatus.LATER, plans

    def allocate(self, seq_group: SequenceGroup, plans: dict[int, PrefixPlan]) -> list[tuple[int, int]]:
        """Give each waiting sequence a block table covering all its tokens, starting with the
        blocks its plan (from ``can_allocate``) names, and mark those tokens computed; a sequence
        that shares blocks its group has yet to compute waits for them (``Sequence.waits_for``).
        Returns the (src, dst) block copies that partial-block hits need before the step runs."""
        waiting = seq_group.get_seqs(SequenceStatus.WAITING)
        for seq in waiting:  # every planned cached block first, so no fresh block below evicts one
            plan = plans[seq.seq_id]
            for block in plan.cached_blocks:
                self.allocator.incref(block)
            if plan.partial_hit is not None:
                self.allocator.incref(plan.partial_hit[0])
                self.held_copy_sources.append(plan.partial_hit[0])
        copies = []
        for seq in waiting:
            plan = plans[seq.seq_id]
            if plan.shares_with is not None:
                table = self.block_tables[plan.shares_with.seq_id][: plan.num_shared_blocks]
                for block in table:
                    self.allocator.incref(block)
                if plan.waits:
                    seq.waits_for = (plan.shares_with, plan.num_shared_blocks * self.block_size)
                    num_written = plan.shares_with.num_computed_tokens // self.block_size
                    self.blocks_computed_for_sharers.update(table[num_written:])
            else:
                table = list(plan.cached_blocks)
            seq.num_computed_tokens = plan.num_computed_tokens(self.block_size)
            if plan.shares_with is None:
                self.num_hit_tokens += seq.num_computed_tokens
            if self.enable_prefix_caching:  # none looked up without it (vLLM records no stats then; a hunt)
                self.num_queried_tokens += seq.num_tokens
            self._grow(table, seq)
            if plan.partial_hit is not None:
                copies.append((plan.partial_hit[0], table[len(plan.cached_blocks)]))
            self.block_tables[seq.seq_id] = table
        self._track_peak()
        return copies

    def _longest_shared_prefix(self, seq: Sequence, others: list[Sequence]) -> tuple[Sequence | None, int]:
        """The sequence among ``others`` with which ``seq`` shares the most full leading blocks
        (leaving ``seq``'s last token to compute), and how many."""
        best, best_count = None, 0
        limit = (seq.num_tokens - 1) // self.block_size
        for other in others:
            count = 0
            while count < min(limit, other.num_tokens // self.block_size) and seq.block_key(count) == other.block_key(count):
                count += 1
            if count > best_count:
                best, best_count = other, count
        return best, best_count

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Key the blocks that ``num_computed_tokens`` fills, so other sequences can reuse them.
        Called when the tokens are scheduled: every block written in a step is written before any
        attention of that step reads it, so a sequence admitted later in the same step may share it."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables[seq.seq_id]
        for i in range(seq.num_computed_tokens // self.block_size, num_computed_tokens // self.block_size):
            self.allocator.cache_block(table[i], seq.block_key(i))
            self.blocks_keyed_this_step.add(table[i])

    def finish_step(self) -> None:
        """The scheduled step has run (or failed): the blocks it keyed are written, so they may be
        partial-hit sources now, and the sources its copies read are released."""
        self.blocks_keyed_this_step.clear()
        for block in self.held_copy_sources:
            self.allocator.free(block)
        self.held_copy_sources.clear()

    def can_append_slots(self, chunks: dict[Sequence, int]) -> bool:
        """Whether each sequence can write its next ``chunks[seq]`` tokens."""
        return self.num_free_blocks >= sum(self._num_new_blocks(seq, n) for seq, n in chunks.items())

    def append_slots(self, seq: Sequence) -> tuple[int, int] | None:
        """Make room for every token of ``seq`` not yet in its table; return a (src, dst)
        block copy when a shared block had to be copied before being written."""
        table = self.block_tables[seq.seq_id]
        self._grow(table, seq)
        first_write_block = seq.num_computed_tokens // self.block_size
        copy = None
        if self._copy_before_write(table, first_write_block):
            src = table[first_write_block]
            table[first_write_block] = self.allocator.allocate(after=table[first_write_block - 1] if first_write_block else None)
            self.allocator.free(src)
            copy = (src, table[first_write_block])
        self._track_peak()
        return copy

    def _grow(self, table: list[int], seq: Sequence) -> None:
        """Fresh blocks at the end of ``table`` until it covers every token of ``seq``."""
        while len(table) < seq.num_logical_blocks:
            table.append(self.allocator.allocate(after=table[-1] if table else None))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        table = self.block_tables[parent.seq_id]
        for block in table:
            self.allocator.incref(block)
        self.block_tables[child.seq_id] = list(table)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so the LRU free list (when no extent is wholly free) evicts a prefix's
        # tail before its head.
        for block in reversed(self.block_tables.pop(seq.seq_id, ())):
            self.allocator.free(block)
            if not self.allocator.ref_counts[block]:
                self.blocks_computed_for_sharers.discard(block)

    def get_block_table(self, seq: Sequence) -> list[int]:
        return self.block_tables[seq.seq_id]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay where they are)."""
        self.allocator.reset_prefix_cache()

    def reset_peak_blocks_in_use(self) -> None:
        self.peak_blocks_in_use = self.num_kv_blocks - self.num_free_blocks

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks needed to write ``num_new_tokens`` more tokens, counting a copy-on-write."""
        table = self.block_tables[seq.seq_id]
        num_tokens = max(seq.num_tokens, seq.num_computed_tokens + num_new_tokens)
        needed = max(0, cdiv(num_tokens, self.block_size) - len(table))
        if self._copy_before_write(table, seq.num_computed_tokens // self.block_size):
            needed += 1
        return needed

    def _copy_before_write(self, table: list[int], first_write_block: int) -> bool:
        """Whether writing from block ``first_write_block`` on needs a copy-on-write: the block is
        shared (a fork's partly filled last block) and not one being computed for its sharers."""
        if first_write_block >= len(table):
            return False
        block = table[first_write_block]
        return self.allocator.ref_counts[block] > 1 and block not in self.blocks_computed_for_sharers

    def _track_peak(self) -> None:
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.num_kv_blocks - self.num_free_blocks)
