"""Block allocator and block tables: reference counts, copy-on-write, admission decisions."""

import pytest

from pagedlm.engine.block_manager import AllocStatus, BlockSpaceManager
from pagedlm.engine.sequence import SequenceGroup, SequenceStatus
from pagedlm.sampling_params import SamplingParams


def _group(num_tokens: int, block_size: int = 4) -> SequenceGroup:
    return SequenceGroup("r", None, list(range(num_tokens)), SamplingParams(), block_size, 0.0)


def test_allocate_append_free_round_trip():
    bm = BlockSpaceManager(block_size=4, num_blocks=10, watermark=0.0)
    g = _group(6)
    assert bm.can_allocate(g) == AllocStatus.OK
    bm.allocate(g)
    seq = g.seqs[0]
    seq.status = SequenceStatus.RUNNING
    assert len(bm.get_block_table(seq)) == 2 and bm.num_free_blocks == 8
    seq.num_computed_tokens = 6
    for token in range(3):  # tokens 7, 8 fit in block 2; token 9 needs block 3
        seq.append_token(token, 0.0)
        assert bm.append_slots(seq) is None
        seq.num_computed_tokens += 1
    assert len(bm.get_block_table(seq)) == 3
    bm.free(seq)
    assert bm.num_free_blocks == 10 and bm.allocator.ref_counts == [0] * 10


def test_admission_statuses():
    bm = BlockSpaceManager(block_size=4, num_blocks=4, watermark=0.0)
    assert bm.can_allocate(_group(17)) == AllocStatus.NEVER
    big = _group(12)
    bm.allocate(big)
    assert bm.can_allocate(_group(8)) == AllocStatus.LATER
    assert bm.can_allocate(_group(4)) == AllocStatus.OK


def test_fork_shares_blocks_and_copy_on_write_of_last_block():
    bm = BlockSpaceManager(block_size=4, num_blocks=10, watermark=0.0)
    g = _group(6)
    bm.allocate(g)
    parent = g.seqs[0]
    parent.num_computed_tokens = 6
    child = parent.fork(1)
    bm.fork(parent, child)
    table = bm.get_block_table(parent)
    assert bm.get_block_table(child) == table and all(bm.allocator.ref_counts[b] == 2 for b in table)
    child.append_token(7, 0.0)
    copy = bm.append_slots(child)
    # The full first block stays shared; the partly filled last block is copied for the writer.
    assert copy is not None and copy[0] == table[1]
    assert bm.get_block_table(child) == [table[0], copy[1]]
    assert bm.allocator.ref_counts[table[0]] == 2 and bm.allocator.ref_counts[table[1]] == 1
    parent.append_token(8, 0.0)
    assert bm.append_slots(parent) is None  # now the sole owner: writes in place
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 10


def test_double_free_is_caught():
    bm = BlockSpaceManager(block_size=4, num_blocks=2, watermark=0.0)
    block = bm.allocator.allocate()
    bm.allocator.free(block)
    with pytest.raises(AssertionError):
        bm.allocator.free(block)
