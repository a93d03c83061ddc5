"""Iteration-level scheduling (vLLM's ``Scheduler``).

Every step the scheduler decides which sequences run and how many of their tokens each computes:
running groups first in arrival order (decodes and unfinished prefill chunks), then waiting groups
as long as the token budget, the sequence budget and the free KV blocks allow. When a running group
cannot get its slots, the most recently arrived running group is preempted by recompute: its blocks
are freed and it goes back to the front of the waiting queue, to be prefilled again later. (Every
group is preempted by recompute, multi-sequence ones included: on CPU a swap space would be the
same memory, and the recomputed sequences produce the tokens they would have.)
"""

from collections import deque
from dataclasses import dataclass, field

from pagedlm.config import SchedulerConfig
from pagedlm.engine.block_manager import AllocStatus, BlockSpaceManager
from pagedlm.engine.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass
class ScheduledSequenceGroup:
    seq_group: SequenceGroup
    token_chunks: dict[Sequence, int]  # tokens each of its sequences computes this step


@dataclass
class SchedulerOutputs:
    scheduled_seq_groups: list[ScheduledSequenceGroup] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_seqs: int = 0
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

    def schedule(self) -> SchedulerOutputs:
        out = SchedulerOutputs()
        running, self.running = self.running, deque()
        while running:
            seq_group = running.popleft()
            seqs = seq_group.get_seqs(SequenceStatus.RUNNING)
            ready = {seq: seq.num_uncomputed_tokens for seq in seqs if seq.prefix_ready()}
            chunks = self._chunks(seq_group, ready, len(seqs), out)
            if not chunks:
                self.running.append(seq_group)
                continue
            while not self.block_manager.can_append_slots(chunks):
                victim = running.pop() if running else seq_group
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq_group:
                    break
            else:
                for seq, chunk in chunks.items():
                    copy = self.block_manager.append_slots(seq)
                    if copy is not None:
                        out.blocks_to_copy.append(copy)
                    self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens + chunk)
                self._add(out, seq_group, chunks)
                self.running.append(seq_group)

        block_size = self.block_manager.block_size
        while self.waiting and not out.num_preempted:
            seq_group = self.waiting[0]
            # Prompt logprobs need the logits of every prompt position: no prefix-cache hits.
            status, plans = self.block_manager.can_allocate(
                seq_group, use_prefix_cache=seq_group.sampling_params.reads_prefix_cache)
            if status != AllocStatus.OK:
                assert status == AllocStatus.LATER, "add_request admits only requests that fit"
                break
            seqs = seq_group.get_seqs(SequenceStatus.WAITING)
            ready = {
                seq: seq.num_tokens - plans[seq.seq_id].num_computed_tokens(block_size)
                for seq in seqs if not plans[seq.seq_id].waits
            }
            chunks = self._chunks(seq_group, ready, len(seqs), out)
            if not chunks:
                break
            self.waiting.popleft()
            out.blocks_to_copy += self.block_manager.allocate(seq_group, plans)
            if seq_group.num_cached_tokens is None:
                seq_group.num_cached_tokens = seqs[0].num_computed_tokens
                seq_group.num_cache_creation_tokens = self.block_manager.num_cache_creation_tokens(seqs[0])
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            for seq, chunk in chunks.items():
                self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens + chunk)
            self._add(out, seq_group, chunks)
            self.running.append(seq_group)
        return out

    def _chunks(
        self, seq_group: SequenceGroup, ready: dict[Sequence, int], num_seqs: int, out: SchedulerOutputs
    ) -> dict[Sequence, int]:
        """Tokens each sequence computes this step, out of the uncomputed ones of those ``ready``
        to run (of the group's ``num_seqs`` candidates), within the remaining budgets; empty when
        none fits. Beams advance in lockstep: beams being recomputed fill in all but their last
        token, and then every beam computes its last token in the same step, where the group
        samples."""
        lockstep = seq_group.sampling_params.use_beam_search and num_seqs > 1
        catching_up = lockstep and (len(ready) < num_seqs or any(n > 1 for n in ready.values()))
        wanted = {seq: n - 1 for seq, n in ready.items() if n > 1} if catching_up else ready
        budget = self.config.max_num_batched_tokens - out.num_batched_tokens
        chunks = {}
        for seq, num_tokens in wanted.items():
            chunk = min(num_tokens, budget)
            if chunk <= 0 or (chunk < num_tokens and not self.config.enable_chunked_prefill):
                break
            chunks[seq] = chunk
            budget -= chunk
        if lockstep and not catching_up and len(chunks) < num_seqs:
            return {}
        if out.num_seqs + len(chunks) > self.config.max_num_seqs:
            return {}
        return chunks

    def free_finished_seq_groups(self) -> list[SequenceGroup]:
        finished, running = [], deque()
        for seq_group in self.running:
            (finished if seq_group.is_finished() else running).append(seq_group)
        self.running = running
        return finished

    def abort_seq_groups(self, request_ids: set[str]) -> list[SequenceGroup]:
        """Drop the unfinished groups of ``request_ids``, freeing their blocks; return them."""
        aborted = [g for g in (*self.running, *self.waiting) if g.request_id in request_ids]
        if not aborted:
            return []
        self.running = deque(g for g in self.running if g.request_id not in request_ids)
        self.waiting = deque(g for g in self.waiting if g.request_id not in request_ids)
        for seq_group in aborted:
            for seq in seq_group.seqs:
                self.block_manager.free(seq)
                if not seq.status.finished:
                    seq.status = SequenceStatus.FINISHED_ABORTED
        return aborted

    def _add(self, out: SchedulerOutputs, seq_group: SequenceGroup, chunks: dict[Sequence, int]) -> None:
        out.scheduled_seq_groups.append(ScheduledSequenceGroup(seq_group, chunks))
        out.num_batched_tokens += sum(chunks.values())
        out.num_seqs += len(chunks)

    def requeue(self, seq_groups: list[SequenceGroup]) -> None:
        """After an interrupted step (an interrupt can land anywhere in ``schedule``, between taking
        a group off one queue and putting it on the other): ``seq_groups``, every request the engine
        holds in arrival order, are queued again from scratch, as preemption by recompute leaves
        them, and every block is free again."""
        self.running, self.waiting = deque(), deque()
        for seq_group in seq_groups:
            if seq_group.is_finished():
                continue
            for seq in seq_group.seqs:
                if not seq.status.finished:
                    seq.reset_for_recompute()
            self.waiting.append(seq_group)
        self.block_manager.free_all()

    def recompute(self, seq_group: SequenceGroup) -> None:
        """Drop a running group's KV and queue it to be computed again, first: its cache no longer
        holds what the model would compute (a LongRoPE sequence that outgrew the short factors)."""
        self.running.remove(seq_group)
        self._reset(seq_group)

    def _preempt(self, seq_group: SequenceGroup) -> None:
        self._reset(seq_group)
        self.num_preemptions += 1

    def _reset(self, seq_group: SequenceGroup) -> None:
        for seq in seq_group.get_seqs(SequenceStatus.RUNNING):
            self.block_manager.free(seq)
            seq.reset_for_recompute()
        self.waiting.appendleft(seq_group)
