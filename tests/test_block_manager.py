"""Block allocator and block tables: reference counts, copy-on-write, admission decisions."""

import copy

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedlm.engine.block_manager import WARM_RESERVE_EXTENTS, AllocStatus, BlockAllocator, BlockSpaceManager
from pagedlm.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedlm.sampling_params import SamplingParams


def _group(num_tokens: int, block_size: int = 4) -> SequenceGroup:
    return SequenceGroup("r", None, list(range(num_tokens)), SamplingParams(), block_size, 0.0)


def test_allocate_append_free_round_trip():
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=10, watermark=0.0)
    g = _group(6)
    status, computed = bm.can_allocate(g)
    assert status == AllocStatus.OK
    bm.allocate(g, computed)
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
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=4, watermark=0.0)
    assert bm.can_allocate(_group(17))[0] == AllocStatus.NEVER
    big = _group(12)
    bm.allocate(big, bm.can_allocate(big)[1])
    assert bm.can_allocate(_group(8))[0] == AllocStatus.LATER
    assert bm.can_allocate(_group(4))[0] == AllocStatus.OK


def _admit_prompt(bm: BlockSpaceManager, tokens: list[int]) -> tuple[Sequence, list[tuple[int, int]]]:
    """Admit a prompt as the scheduler does (its blocks keyed in the step that admits it)."""
    group = SequenceGroup("r", None, tokens, SamplingParams(), 4, 0.0)
    status, plans = bm.can_allocate(group)
    assert status == AllocStatus.OK
    copies = bm.allocate(group, plans)
    seq = group.seqs[0]
    seq.status = SequenceStatus.RUNNING
    bm.cache_full_blocks(seq, seq.num_tokens)
    return seq, copies


def test_a_partial_block_hit_copies_the_shared_tokens_of_a_block_an_earlier_step_wrote():
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=16, watermark=0.0)
    a, copies = _admit_prompt(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert copies == [] and a.num_computed_tokens == 0
    # Admitted in a's step: a's blocks are keyed but not yet written, so only the full block hits.
    b, copies = _admit_prompt(bm, [1, 2, 3, 4, 5, 6, 0, 0, 0])
    assert copies == [] and b.num_computed_tokens == 4
    bm.finish_step()
    c, copies = _admit_prompt(bm, [1, 2, 3, 4, 5, 6, 0, 7, 7])
    # Block 0 shared; block 1 a copy of b's block 1, which shares 3 tokens with it (a's shares 2).
    assert c.num_computed_tokens == 7
    assert copies == [(bm.get_block_table(b)[1], bm.get_block_table(c)[1])]
    assert bm.get_block_table(c)[0] == bm.get_block_table(a)[0]
    assert bm.num_hit_tokens == 4 + 7
    bm.finish_step()
    # A prompt ending inside a's block 1 leaves its last token to compute.
    d, _ = _admit_prompt(bm, [1, 2, 3, 4, 5, 6])
    assert d.num_computed_tokens == 5
    bm.finish_step()


def test_a_free_partial_hit_source_is_held_until_the_step_has_run():
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=8, watermark=0.0)
    a, _ = _admit_prompt(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.finish_step()
    source = bm.get_block_table(a)[1]
    bm.free(a)
    b, copies = _admit_prompt(bm, [1, 2, 3, 4, 5, 0, 0])
    assert copies == [(source, bm.get_block_table(b)[1])]
    assert bm.allocator.ref_counts[source] == 1 and source not in bm.allocator.free_blocks
    bm.finish_step()
    assert bm.allocator.ref_counts[source] == 0 and bm.allocator.block_keys[source] is not None
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_fork_shares_blocks_and_copy_on_write_of_last_block():
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=10, watermark=0.0)
    g = _group(6)
    bm.allocate(g, bm.can_allocate(g)[1])
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
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=2, watermark=0.0)
    block = bm.allocator.allocate()
    bm.allocator.free(block)
    with pytest.raises(AssertionError):
        bm.allocator.free(block)


BS = 4


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate (with prefix-cache hits) / fork / append / free over a small cache, with a
    fake KV store that follows the block copies the manager asks for: reference counts match the
    tables, no block is both free and in a table, the prefix cache never points at a block whose
    content changed, every block returns, and every sequence reads back its tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockSpaceManager(block_size=BS, num_kv_blocks=24, watermark=0.0)
        # Extents of 5 (the last one of 4): placement after a sequence's last block, wholly free
        # extents and the fallback to single blocks all happen within a few steps.
        self.bm.allocator = BlockAllocator(24, extent_blocks=5)
        self.store: dict[int, list] = {b: [None] * BS for b in range(24)}
        self.seqs = []
        self.written: set[int] = set()  # extents a table has held a block of
        self.next_token = 1000

    def _write(self, seq, start: int) -> None:
        self.bm.cache_full_blocks(seq, seq.num_tokens)
        table = self.bm.get_block_table(seq)
        for pos in range(start, seq.num_tokens):
            token = seq.prompt_token_ids[pos] if pos < len(seq.prompt_token_ids) else seq.output_token_ids[pos - len(seq.prompt_token_ids)]
            self.store[table[pos // BS]][pos % BS] = token
        seq.num_computed_tokens = seq.num_tokens

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        """One step's block copies, as a kernel that copies them all at once does: no copy may
        write a block that another reads."""
        assert not {dst for _, dst in copies} & {src for src, _ in copies}
        for dst, content in [(dst, list(self.store[src])) for src, dst in copies]:
            self.store[dst] = content

    @rule(prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=20), min_size=1, max_size=3))
    def admit(self, prompts):
        """One step admitting up to three prompts, as the scheduler does: each one's blocks are
        keyed when it is admitted and written only when the step runs, after its block copies."""
        # Few distinct token values: prompts often share prefixes and hit the prefix cache.
        admitted, copies = [], []
        for tokens in prompts:
            group = SequenceGroup("r", None, tokens, SamplingParams(), BS, 0.0)
            status, plans = self.bm.can_allocate(group)
            if status != AllocStatus.OK:
                break
            copies += self.bm.allocate(group, plans)
            seq = group.seqs[0]
            seq.status = SequenceStatus.RUNNING
            admitted.append((seq, seq.num_computed_tokens))
            self.bm.cache_full_blocks(seq, seq.num_tokens)
        self._copy(copies)
        for seq, start in admitted:
            self._write(seq, start)
            self.seqs.append(seq)
        self.bm.finish_step()

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        parent = self.seqs[i % len(self.seqs)]
        child = parent.fork(parent.index + 1)
        self.bm.fork(parent, child)
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 100))
    def append(self, i):
        seq = self.seqs[i % len(self.seqs)]
        seq.append_token(self.next_token, 0.0)
        self.next_token += 1
        if not self.bm.can_append_slots({seq: 1}):
            seq.output_token_ids.pop()
            return
        copy = self.bm.append_slots(seq)
        self._copy([copy] if copy is not None else [])
        self._write(seq, seq.num_computed_tokens)
        self.bm.finish_step()

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.bm.free(self.seqs.pop(i % len(self.seqs)))

    @invariant()
    def counts_are_consistent(self):
        refs = [0] * 24
        for seq in self.seqs:
            for block in self.bm.get_block_table(seq):
                refs[block] += 1
        assert refs == self.bm.allocator.ref_counts
        free = set(self.bm.allocator.free_blocks)
        assert len(free) == len(self.bm.allocator.free_blocks)
        assert all((refs[b] == 0) == (b in free) for b in range(24))

    @invariant()
    def extents_are_counted(self):
        allocator = self.bm.allocator
        free = [sum(allocator.ref_counts[b] == 0 for b in range(e * 5, min(e * 5 + 5, 24))) for e in range(5)]
        assert allocator.free_in_extent == free
        fresh, warm = set(allocator.fresh_extents), set(allocator.warm_free_extents)
        assert not fresh & warm and fresh | warm == {e for e in range(5) if free[e] == allocator.extent_sizes[e]}
        self.written |= {b // 5 for seq in self.seqs for b in self.bm.get_block_table(seq)}
        assert fresh == set(range(5)) - self.written  # fresh: no block of it ever taken

    @invariant()
    def cached_blocks_hold_their_keys_tokens(self):
        for key, block in self.bm.allocator.cached_blocks.items():
            assert self.bm.allocator.block_keys[block] == key
            assert tuple(self.store[block]) == key[1]

    @invariant()
    def tokens_are_readable(self):
        for seq in self.seqs:
            table = self.bm.get_block_table(seq)
            tokens = seq.prompt_token_ids + seq.output_token_ids
            assert [self.store[table[p // BS]][p % BS] for p in range(seq.num_tokens)] == tokens

    def teardown(self):
        for seq in self.seqs:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == 24


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_manager_state_machine = BlockManagerMachine.TestCase


def test_readmitted_group_keeps_its_cached_blocks_and_shares_its_prompt():
    """A forked group preempted by recompute: re-admitted, each sequence gets back its own cached
    blocks (a sibling's fresh blocks may not evict them) and the prompt's blocks are shared."""
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=8, watermark=0.0)
    group = SequenceGroup("r", None, list(range(8)), SamplingParams(), 4, 0.0)
    bm.allocate(group, bm.can_allocate(group)[1])
    parent = group.seqs[0]
    parent.status = SequenceStatus.RUNNING
    bm.cache_full_blocks(parent, 8)
    parent.num_computed_tokens = 8
    child = parent.fork(1)
    bm.fork(parent, child)
    group.seqs.append(child)
    for seq, first in ((parent, 100), (child, 200)):  # each fills a block of its own, then one token more
        for token in range(first, first + 5):
            seq.append_token(token, 0.0)
            bm.append_slots(seq)
            bm.cache_full_blocks(seq, seq.num_tokens)
            seq.num_computed_tokens = seq.num_tokens
    child_full_block = bm.get_block_table(child)[2]
    for seq in (child, parent):  # preempted
        bm.free(seq)
        seq.reset_for_recompute()
    # The child's cached block is the least recently freed: the next fresh block would evict it.
    bm.allocator.free_blocks.move_to_end(child_full_block, last=False)
    status, plans = bm.can_allocate(group)
    assert status == AllocStatus.OK
    bm.allocate(group, plans)
    tables = [bm.get_block_table(seq) for seq in group.seqs]
    assert tables[0][:2] == tables[1][:2] and not set(tables[0][2:]) & set(tables[1][2:])
    for seq, table in zip(group.seqs, tables):
        for i in range(seq.num_computed_tokens // 4):  # every block counted computed holds its own tokens
            assert bm.allocator.block_keys[table[i]] == seq.block_key(i)
    assert bm.num_free_blocks == 8 - 6  # 2 shared prompt blocks + 2 × (a full block and a partial one)


def _grow(bm: BlockSpaceManager, seqs: list, tokens: int) -> None:
    """Each sequence appends ``tokens`` tokens, the sequences in turn (as a decode batch does)."""
    for _ in range(tokens):
        for seq in seqs:
            seq.append_token(7, 0.0)
            assert bm.append_slots(seq) is None
            seq.num_computed_tokens = seq.num_tokens


def test_a_growing_sequence_gets_the_block_after_its_last():
    # Four sequences decoding together: each fills its own extent in order, then moves on to a
    # wholly free one; freed and run again (every full block now cached), the same holds.
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=64, watermark=0.0)
    bm.allocator = BlockAllocator(64, extent_blocks=8)
    for _ in range(2):
        groups = [SequenceGroup("r", None, [i] * 6, SamplingParams(), 4, 0.0) for i in range(4)]  # no shared prefix
        for g in groups:
            bm.allocate(g, bm.can_allocate(g)[1])
            bm.cache_full_blocks(g.seqs[0], 6)
            g.seqs[0].num_computed_tokens = 6
        seqs = [g.seqs[0] for g in groups]
        _grow(bm, seqs, 30)  # 36 tokens: 9 blocks, one more than an extent
        for seq in seqs:
            bm.cache_full_blocks(seq, seq.num_tokens)
            table = bm.get_block_table(seq)
            assert table[:8] == list(range(table[0], table[0] + 8)) and table[0] % 8 == 0
            assert table[8] % 8 == 0
        for seq in seqs:
            bm.free(seq)
        assert bm.num_free_blocks == 64


def test_with_no_free_extent_blocks_come_one_by_one():
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=16, watermark=0.0)
    bm.allocator = BlockAllocator(16, extent_blocks=8)
    groups = [SequenceGroup("r", None, [i] * 4, SamplingParams(), 4, 0.0) for i in range(3)]
    for g in groups:  # the third takes the least recently freed block, in the first's extent
        bm.allocate(g, bm.can_allocate(g)[1])
    assert [bm.get_block_table(g.seqs[0]) for g in groups] == [[0], [8], [1]]
    seqs = [g.seqs[0] for g in groups]
    _grow(bm, seqs, 4 * 4)  # every free block but one gets used: nothing fails, nothing is shared
    blocks = [b for seq in seqs for b in bm.get_block_table(seq)]
    assert sorted(blocks) == list(range(15)) and bm.num_free_blocks == 1


def test_a_reused_extent_is_taken_from_its_first_block():
    # The warm extent's cached prefix goes with it: a sequence written after it starts where it
    # started, on memory already written, rather than past it on memory never written.
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=16, watermark=0.0)
    bm.allocator = BlockAllocator(16, extent_blocks=8, warm_reserve_extents=0)
    prompt = list(range(9))  # two full blocks (cached) and one partial
    first = SequenceGroup("p", None, prompt, SamplingParams(), 4, 0.0)
    bm.allocate(first, bm.can_allocate(first)[1])
    bm.cache_full_blocks(first.seqs[0], 9)
    assert bm.get_block_table(first.seqs[0]) == [0, 1, 2]
    bm.free(first.seqs[0])
    other = SequenceGroup("o", None, [200] * 12, SamplingParams(), 4, 0.0)
    bm.allocate(other, bm.can_allocate(other)[1])
    assert bm.get_block_table(other.seqs[0]) == [0, 1, 2]
    again = SequenceGroup("p2", None, prompt, SamplingParams(), 4, 0.0)
    status, plans = bm.can_allocate(again)
    assert plans[again.seqs[0].seq_id].cached_blocks == []


def _admit(bm: BlockSpaceManager, name: str, tokens: int) -> Sequence:
    group = SequenceGroup(name, None, [len(name)] * tokens, SamplingParams(), 4, 0.0)
    bm.allocate(group, bm.can_allocate(group)[1])
    return group.seqs[0]


def test_sequences_reuse_written_extents_before_fresh_ones():
    # One request after another: each finds the extent the previous one wrote and freed, so the job
    # writes one extent's memory, not the whole cache (a fresh extent's first writes are page faults).
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=64, watermark=0.0)
    bm.allocator = BlockAllocator(64, extent_blocks=8, warm_reserve_extents=0)
    for i in range(20):
        seq = _admit(bm, f"r{i}", 12)
        assert bm.get_block_table(seq) == [0, 1, 2]
        bm.free(seq)
    assert bm.allocator.num_warm_extents == 1


def test_a_quarter_of_the_written_extents_stay_free_before_one_is_reused():
    # Eight running sequences hold eight warm extents. A new one takes a warm extent only while more
    # than a quarter of the warm extents are wholly free, else a fresh one; the warm one freed
    # longest ago goes first, and the prefixes cached in the rest stay found.
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=128, watermark=0.0)
    bm.allocator = BlockAllocator(128, extent_blocks=8, warm_reserve_extents=0)
    seqs = [_admit(bm, "r" * (i + 1), 4) for i in range(8)]
    for seq in seqs:
        bm.cache_full_blocks(seq, 4)
    assert [bm.get_block_table(s)[0] // 8 for s in seqs] == list(range(8))
    bm.free(seqs[3])
    bm.free(seqs[5])  # 2 of 8 warm extents free: not more than a quarter
    assert bm.get_block_table(_admit(bm, "x" * 20, 4))[0] // 8 == 8  # fresh
    bm.free(seqs[1])  # 3 of 9: more than a quarter
    assert bm.get_block_table(_admit(bm, "x" * 21, 4))[0] // 8 == 3  # freed longest ago
    assert bm.allocator.num_warm_extents == 9

    def cached(name: str) -> int:
        group = SequenceGroup("q", None, [len(name)] * 4 + [0], SamplingParams(), 4, 0.0)
        return len(bm.can_allocate(group)[1][group.seqs[0].seq_id].cached_blocks)

    assert (cached("rrrr"), cached("rrrrrr"), cached("rr")) == (0, 1, 1)  # 3 reused; 5 and 1 kept


def test_prefixes_of_calls_one_after_another_stay_while_the_cache_is_mostly_free():
    """Two system prompts taking turns, one request per call, in a cache of 64 extents: each finds
    its earlier prefix (a reserve of warm extents is kept), and the job writes only those extents."""
    bm = BlockSpaceManager(block_size=16, num_kv_blocks=1024, watermark=0.0)
    prompts = {name: [i] * 50 for i, name in enumerate("AB")}
    hits = []
    for turn in range(12):
        name = "AB"[turn % 2]
        group = SequenceGroup(name, None, prompts[name] + [100 + turn], SamplingParams(), 16, 0.0)
        plans = bm.can_allocate(group)[1]
        hits.append(len(plans[group.seqs[0].seq_id].cached_blocks))
        bm.allocate(group, plans)
        seq = group.seqs[0]
        bm.cache_full_blocks(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        bm.finish_step()
        bm.free(seq)
    assert hits == [0, 0] + [3] * 10
    assert bm.allocator.num_warm_extents <= WARM_RESERVE_EXTENTS + 1


def test_a_sequence_leaving_its_extent_goes_where_a_new_one_would():
    # Requests of 9 blocks, one at a time, over extents of 8: each crosses into a second extent. It
    # takes the warm extent freed longest ago, not the fresh one after its own, so the job keeps
    # writing the same two extents' memory.
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=64, watermark=0.0)
    bm.allocator = BlockAllocator(64, extent_blocks=8, warm_reserve_extents=0)
    for i in range(20):
        seq = _admit(bm, "r" * (i + 1), 36)
        table = bm.get_block_table(seq)
        assert table[:8] == list(range(table[0], table[0] + 8)) and table[8] in (0, 8) and table[8] != table[0]
        bm.free(seq)
    assert bm.allocator.num_warm_extents == 2


def test_a_prefix_computed_again_takes_the_keys_a_reused_extent_left_behind():
    # P's extent is reused from its first block: P's head is evicted, its second block keeps a key no
    # lookup reaches. P computed again keys both of its blocks, so a third P hits both while the
    # second runs, even after the stale block is reused.
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=16, watermark=0.0)
    bm.allocator = BlockAllocator(16, extent_blocks=4, warm_reserve_extents=0)
    prompt = list(range(8)) + [99]

    def admit(tokens: list[int]) -> tuple[Sequence, int]:
        group = SequenceGroup("r", None, tokens, SamplingParams(), 4, 0.0)
        plans = bm.can_allocate(group)[1]
        bm.allocate(group, plans)
        seq = group.seqs[0]
        bm.cache_full_blocks(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        return seq, len(plans[seq.seq_id].cached_blocks)

    first, _ = admit(prompt)
    bm.free(first)
    other, _ = admit([50] * 3)
    assert bm.get_block_table(other) == [0]
    second, hit = admit(prompt)
    assert hit == 0 and bm.get_block_table(second) == [4, 5, 6]
    _grow(bm, [other], 5)  # into block 1, the stale one
    assert bm.get_block_table(other) == [0, 1]
    _, hit = admit(prompt)
    assert hit == 2


def test_a_group_that_fits_only_without_its_partial_hit_is_admitted_without_it():
    """A free partial-hit source is held for the step: when that one block is all that is missing,
    the group is admitted without the partial hit (waiting could be forever)."""
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=4, watermark=0.0)
    first, _ = _admit_prompt(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # blocks [1-4] [5-8] [9]
    bm.finish_step()
    bm.free(first)
    tokens = [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # 4 blocks: the whole cache
    group = SequenceGroup("r", None, tokens, SamplingParams(), 4, 0.0)
    status, plans = bm.can_allocate(group)
    assert status == AllocStatus.OK and plans[group.seqs[0].seq_id].partial_hit is None
    assert bm.allocate(group, plans) == [] and group.seqs[0].num_computed_tokens == 4


@settings(max_examples=300, deadline=None)
@example(others=[([0], True), ([0], True)], prompt=[0], outputs=[[0], [0, 0, 0, 0]], num_free=2)  # the bug it was for
@example(others=[([0], True), ([0], True)], prompt=[0, 0, 0, 0, 0, 0],
         outputs=[[], [0] * 7, [0, 1, 0, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0, 0]], num_free=10)
@given(
    others=st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=12), st.booleans()), max_size=4),
    prompt=st.lists(st.integers(0, 2), min_size=1, max_size=10),
    outputs=st.lists(st.lists(st.integers(0, 2), max_size=9), min_size=1, max_size=4),
    num_free=st.integers(0, 24),
)
def test_a_readmitted_group_is_admitted_exactly_when_it_fits(others, prompt, outputs, num_free):
    """A forked group preempted by recompute and admitted again (``n > 1``, beam search): its
    sequences' full hits, shared prompt blocks and partial hits on each other's freed blocks are
    counted once each, so ``OK`` means ``allocate`` finds every block it takes, and ``LATER`` means
    even the full hits alone do not fit. Few token values: prefixes and partial blocks often match."""
    bm = BlockSpaceManager(block_size=4, num_kv_blocks=24, watermark=0.0)
    for tokens, keep in others:
        seq, _ = _admit_prompt(bm, tokens)
        bm.finish_step()
        if not keep:
            bm.free(seq)
    group = SequenceGroup("r", None, prompt, SamplingParams(), 4, 0.0)
    status, plans = bm.can_allocate(group)
    assume(status == AllocStatus.OK)
    bm.allocate(group, plans)
    parent = group.seqs[0]
    parent.status = SequenceStatus.RUNNING
    bm.cache_full_blocks(parent, parent.num_tokens)
    parent.num_computed_tokens = parent.num_tokens
    bm.finish_step()
    for index in range(1, len(outputs)):
        child = parent.fork(index)
        bm.fork(parent, child)
        group.seqs.append(child)
    for seq, tokens in zip(group.seqs, outputs):
        for token in tokens:
            seq.append_token(token, 0.0)
            assume(bm.can_append_slots({seq: 1}))
            bm.append_slots(seq)
            bm.cache_full_blocks(seq, seq.num_tokens)
            seq.num_computed_tokens = seq.num_tokens
            bm.finish_step()
    for seq in reversed(group.seqs):  # preempted
        bm.free(seq)
        seq.reset_for_recompute()
    while bm.num_free_blocks > num_free:  # other work takes the rest (evicting cached blocks)
        bm.allocator.allocate()
    status, plans = bm.can_allocate(group)
    assume(status != AllocStatus.NEVER)
    if status == AllocStatus.OK:
        bm.allocate(group, plans)
        return
    bm, plans = copy.deepcopy((bm, plans))
    for plan in plans.values():
        plan.partial_hit = None
    with pytest.raises(RuntimeError, match="Out of KV cache blocks"):
        bm.allocate(group, plans)
