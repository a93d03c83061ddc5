"""Physical KV blocks and per-sequence block tables (vLLM v0's ``BlockSpaceManager``).

Blocks carry reference counts so sequences can share them: a forked sequence points at its
parent's blocks, and appending into a shared, partly filled last block copies it first
(copy-on-write). The engine turns the returned (src, dst) pairs into one ``copy_blocks`` call.
"""

import enum
from collections import deque

from pagedlm.engine.sequence import Sequence, SequenceGroup, SequenceStatus


class AllocStatus(enum.Enum):
    OK = enum.auto()
    LATER = enum.auto()
    NEVER = enum.auto()


class BlockAllocator:
    """A free list of physical block numbers with reference counts."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    def allocate(self) -> int:
        if not self.free_blocks:
            raise RuntimeError("Out of KV cache blocks; the scheduler should have prevented this.")
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} is free"
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)


class BlockSpaceManager:
    """Maps each sequence to its block table and decides whether work fits in the cache."""

    def __init__(self, block_size: int, num_blocks: int, watermark: float = 0.01) -> None:
        self.block_size = block_size
        self.num_total_blocks = num_blocks
        self.watermark_blocks = int(watermark * num_blocks)
        self.allocator = BlockAllocator(num_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.peak_blocks_in_use = 0

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def can_allocate(self, seq_group: SequenceGroup) -> AllocStatus:
        num_required = sum(seq.num_blocks for seq in seq_group.get_seqs(SequenceStatus.WAITING))
        if self.num_total_blocks - num_required < self.watermark_blocks:
            return AllocStatus.NEVER
        if self.num_free_blocks - num_required >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def allocate(self, seq_group: SequenceGroup) -> None:
        """Give each waiting sequence of the group a block table covering all its tokens. (A new
        group has one sequence; a preempted group's sequences have diverged and are recomputed
        separately.)"""
        for seq in seq_group.get_seqs(SequenceStatus.WAITING):
            self.block_tables[seq.seq_id] = [self.allocator.allocate() for _ in range(seq.num_blocks)]
        self._track_peak()

    def can_append_slots(self, chunks: dict[Sequence, int]) -> bool:
        """Whether each sequence can write its next ``chunks[seq]`` tokens."""
        return self.num_free_blocks >= sum(self._num_new_blocks(seq, n) for seq, n in chunks.items())

    def append_slots(self, seq: Sequence) -> tuple[int, int] | None:
        """Make room for every token of ``seq`` not yet in its table; return a (src, dst)
        block copy when a shared last block had to be copied before being written."""
        table = self.block_tables[seq.seq_id]
        while len(table) < seq.num_blocks:
            table.append(self.allocator.allocate())
        self._track_peak()
        first_write_block = seq.num_computed_tokens // self.block_size
        last = table[first_write_block] if first_write_block < len(table) else None
        if last is None or self.allocator.ref_counts[last] == 1:
            return None
        fresh = self.allocator.allocate()
        self.allocator.free(last)
        table[first_write_block] = fresh
        self._track_peak()
        return last, fresh

    def fork(self, parent: Sequence, child: Sequence) -> None:
        table = self.block_tables[parent.seq_id]
        for block in table:
            self.allocator.incref(block)
        self.block_tables[child.seq_id] = list(table)

    def free(self, seq: Sequence) -> None:
        table = self.block_tables.pop(seq.seq_id, None)
        for block in table or ():
            self.allocator.free(block)

    def get_block_table(self, seq: Sequence) -> list[int]:
        return self.block_tables[seq.seq_id]

    def reset_peak(self) -> None:
        self.peak_blocks_in_use = self.num_total_blocks - self.num_free_blocks

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks needed to write ``num_new_tokens`` more tokens, counting a copy-on-write."""
        table = self.block_tables[seq.seq_id]
        num_tokens = max(seq.num_tokens, seq.num_computed_tokens + num_new_tokens)
        needed = max(0, (num_tokens + self.block_size - 1) // self.block_size - len(table))
        first_write_block = seq.num_computed_tokens // self.block_size
        if first_write_block < len(table) and self.allocator.ref_counts[table[first_write_block]] > 1:
            needed += 1
        return needed

    def _track_peak(self) -> None:
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.num_total_blocks - self.num_free_blocks)
