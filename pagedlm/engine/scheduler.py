"""Iteration-level scheduling (vLLM's ``Scheduler``).

Every step the scheduler decides which sequences run and how many of their tokens each computes:
running groups first in arrival order (decodes and unfinished prefill chunks), then waiting groups
as long as the token budget, the sequence budget and the free KV blocks allow. When a running group
cannot get a slot, the most recently arrived running group is preempted by recompute: its blocks
are freed and it goes back to the front of the waiting queue, to be prefilled again later.
"""

from collections import deque
from dataclasses import dataclass, field

from pagedlm.config import SchedulerConfig
from pagedlm.engine.block_manager import AllocStatus, BlockSpaceManager
from pagedlm.engine.sequence import SequenceGroup, SequenceStatus


@dataclass
class ScheduledSequenceGroup:
    seq_group: SequenceGroup
    token_chunk_size: int  # tokens each running sequence of the group computes this step


@dataclass
class SchedulerOutputs:
    scheduled_seq_groups: list[ScheduledSequenceGroup] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_preempted: int = 0

    def is_empty(self) -> bool:
        return not self.scheduled_seq_groups


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockSpaceManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: deque[SequenceGroup] = deque()
        self.num_preemptions = 0

    def add_seq_group(self, seq_group: SequenceGroup) -> None:
        self.waiting.append(seq_group)

    def has_unfinished_seqs(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_seq_groups(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutputs:
        out = SchedulerOutputs()
        num_seqs = 0
        running, self.running = self.running, deque()
        while running:
            seq_group = running.popleft()
            seqs = seq_group.get_seqs(SequenceStatus.RUNNING)
            budget = self.config.max_num_batched_tokens - out.num_batched_tokens
            chunk = min(seqs[0].num_uncomputed_tokens, budget // len(seqs))
            if chunk == 0:
                self.running.append(seq_group)
                continue
            while not self.block_manager.can_append_slots(seq_group, chunk):
                if not running:
                    self._preempt(seq_group)
                    out.num_preempted += 1
                    break
                self._preempt(running.pop())
                out.num_preempted += 1
            else:
                for seq in seqs:
                    copy = self.block_manager.append_slots(seq)
                    if copy is not None:
                        out.blocks_to_copy.append(copy)
                self._add(out, seq_group, chunk)
                num_seqs += len(seqs)
                self.running.append(seq_group)

        while self.waiting and not out.num_preempted:
            seq_group = self.waiting[0]
            seqs = seq_group.get_seqs(SequenceStatus.WAITING)
            budget = self.config.max_num_batched_tokens - out.num_batched_tokens
            if num_seqs + len(seqs) > self.config.max_num_seqs or budget <= 0:
                break
            chunk = seqs[0].num_uncomputed_tokens
            if chunk > budget:
                if not self.config.enable_chunked_prefill:
                    break
                chunk = budget
            status = self.block_manager.can_allocate(seq_group)
            if status != AllocStatus.OK:
                assert status == AllocStatus.LATER, "add_request admits only requests that fit"
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq_group)
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            self._add(out, seq_group, chunk)
            num_seqs += len(seqs)
            self.running.append(seq_group)
        return out

    def free_finished_seq_groups(self) -> list[SequenceGroup]:
        finished = [g for g in self.running if g.is_finished()]
        if finished:
            self.running = deque(g for g in self.running if not g.is_finished())
        return finished

    def abort_all(self) -> list[SequenceGroup]:
        """Drop every unfinished group, freeing its blocks; return the dropped groups."""
        dropped = [*self.running, *self.waiting]
        for seq_group in dropped:
            for seq in seq_group.seqs:
                self.block_manager.free(seq)
        self.running.clear()
        self.waiting.clear()
        return dropped

    def _add(self, out: SchedulerOutputs, seq_group: SequenceGroup, chunk: int) -> None:
        out.scheduled_seq_groups.append(ScheduledSequenceGroup(seq_group, chunk))
        out.num_batched_tokens += chunk * len(seq_group.get_seqs(SequenceStatus.RUNNING))

    def _preempt(self, seq_group: SequenceGroup) -> None:
        for seq in seq_group.get_seqs(SequenceStatus.RUNNING):
            self.block_manager.free(seq)
            seq.reset_for_recompute()
        self.waiting.appendleft(seq_group)
        self.num_preemptions += 1
