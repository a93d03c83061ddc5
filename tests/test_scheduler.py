"""The scheduler on its own (no model, as vLLM's tests/core/test_scheduler.py), then continuous
batching seen through a real engine's scheduler state, step by step (no timing)."""

from pagedlm import LLM, SamplingParams
from pagedlm.config import SchedulerConfig
from pagedlm.engine.block_manager import BlockSpaceManager
from pagedlm.engine.scheduler import Scheduler, SchedulerOutputs
from pagedlm.engine.sequence import SequenceGroup, SequenceStatus

BLOCK_SIZE = 4


def create_dummy_group(request_id: str, prompt_len: int, params: SamplingParams | None = None, arrival: float = 0.0) -> SequenceGroup:
    params = params or SamplingParams(temperature=0, ignore_eos=True)
    return SequenceGroup(request_id, None, list(range(1, prompt_len + 1)), params, BLOCK_SIZE, arrival)


def create_scheduler(num_kv_blocks: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 32,
                     enable_chunked_prefill: bool = True, enable_prefix_caching: bool = False) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
    bm = BlockSpaceManager(BLOCK_SIZE, num_kv_blocks, watermark=0.0, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(config, bm)


def chunks_of(out: SchedulerOutputs) -> dict[str, list[int]]:
    return {s.seq_group.request_id: list(s.token_chunks.values()) for s in out.scheduled_seq_groups}


def finish_step(out: SchedulerOutputs, token: int = 7) -> None:
    """What the engine does after the model ran: advance the computed counters and append a token
    to every sequence whose chunk reached its end."""
    for scheduled in out.scheduled_seq_groups:
        for seq, chunk in scheduled.token_chunks.items():
            seq.num_computed_tokens += chunk
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(token, 0.0)


def test_chunked_prefill_splits_a_long_prompt_over_the_token_budget():
    scheduler = create_scheduler(max_num_batched_tokens=16)
    scheduler.add_seq_group(create_dummy_group("a", 40))
    seen = []
    while not scheduler.running or scheduler.running[0].seqs[0].num_computed_tokens < 40:
        out = scheduler.schedule()
        seen.append(chunks_of(out)["a"])
        finish_step(out)
    assert seen == [[16], [16], [8]]


def test_without_chunked_prefill_a_prompt_waits_until_the_whole_prompt_fits_the_budget():
    scheduler = create_scheduler(max_num_batched_tokens=16, enable_chunked_prefill=False)
    scheduler.add_seq_group(create_dummy_group("a", 16))  # exactly the budget
    scheduler.add_seq_group(create_dummy_group("b", 15))
    scheduler.add_seq_group(create_dummy_group("c", 2))
    out = scheduler.schedule()
    assert chunks_of(out) == {"a": [16]}  # "b" does not fit what is left, and "c" does not pass it
    finish_step(out)
    out = scheduler.schedule()
    # "a" decodes one token; "b" takes exactly the 15 left; "c" would need one more.
    assert chunks_of(out) == {"a": [1], "b": [15]}
    finish_step(out)
    assert chunks_of(scheduler.schedule()) == {"a": [1], "b": [1], "c": [2]}


def test_max_num_seqs_caps_a_step():
    scheduler = create_scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add_seq_group(create_dummy_group(name, 3))
    assert list(chunks_of(scheduler.schedule())) == ["a", "b"]


def test_running_groups_come_first_then_waiting_ones_in_arrival_order():
    scheduler = create_scheduler(max_num_batched_tokens=16)
    scheduler.add_seq_group(create_dummy_group("a", 6))
    finish_step(scheduler.schedule())
    scheduler.add_seq_group(create_dummy_group("b", 5))
    scheduler.add_seq_group(create_dummy_group("c", 5))
    assert chunks_of(scheduler.schedule()) == {"a": [1], "b": [5], "c": [5]}


def test_the_latest_arrival_is_preempted_by_recompute_and_resumes_first():
    # 3 groups of 8-token prompts take 2 blocks each of 7; the first to need a third block
    # preempts the most recently arrived running group.
    scheduler = create_scheduler(num_kv_blocks=7)
    groups = [create_dummy_group(name, 8, arrival=i) for i, name in enumerate("abc")]
    for group in groups:
        scheduler.add_seq_group(group)
    finish_step(scheduler.schedule())
    out = scheduler.schedule()
    assert out.num_preempted == 1 and chunks_of(out) == {"a": [1], "b": [1]}
    victim = groups[2].seqs[0]
    assert victim.status == SequenceStatus.WAITING and victim.num_computed_tokens == 0
    assert list(scheduler.waiting) == [groups[2]] and scheduler.num_preemptions == 1
    assert scheduler.block_manager.num_free_blocks == 7 - 6  # the victim's two blocks came back
    # Its generated token is kept: it recomputes prompt + output when there is room again.
    scheduler.abort_seq_groups({"a"})
    out = scheduler.schedule()
    assert chunks_of(out) == {"b": [1], "c": [9]}


def test_the_group_that_cannot_grow_preempts_itself_when_it_is_the_latest():
    scheduler = create_scheduler(num_kv_blocks=4)
    a, b = create_dummy_group("a", 8, arrival=0), create_dummy_group("b", 8, arrival=1)
    scheduler.add_seq_group(a)
    scheduler.add_seq_group(b)
    finish_step(scheduler.schedule())
    out = scheduler.schedule()  # "a" needs a block: "b", the latest, goes
    assert chunks_of(out) == {"a": [1]} and b.seqs[0].status == SequenceStatus.WAITING


def _beam_group(prompt_len: int, width: int) -> SequenceGroup:
    params = SamplingParams(n=width, best_of=width, use_beam_search=True, temperature=0, max_tokens=20)
    return create_dummy_group("beam", prompt_len, params)


def _fork_beams(group: SequenceGroup, bm: BlockSpaceManager, outputs: list[list[int]]) -> None:
    """Turn the group's one sequence into beams with the given output tokens (all computed)."""
    parent = group.seqs[0]
    for i in range(1, len(outputs)):
        child = parent.fork(0)
        bm.fork(parent, child)
        group.seqs.append(child)
    for seq, tokens in zip(group.seqs, outputs):
        for t in tokens:
            seq.append_token(t, 0.0)
            assert bm.can_append_slots({seq: 1})
            bm.append_slots(seq)
            seq.num_computed_tokens += 1
        seq.num_computed_tokens = seq.num_tokens - 1  # the newest token is still to compute


def test_beams_advance_in_lockstep_and_none_runs_when_not_all_fit():
    scheduler = create_scheduler(max_num_batched_tokens=16, max_num_seqs=2)
    group = _beam_group(6, width=3)
    scheduler.add_seq_group(group)
    finish_step(scheduler.schedule())
    _fork_beams(group, scheduler.block_manager, [[], [5], [6]])
    # Three beams each want their last token, but max_num_seqs allows two: no beam runs.
    assert chunks_of(scheduler.schedule()) == {}
    scheduler.config.max_num_seqs = 3
    assert chunks_of(scheduler.schedule()) == {"beam": [1, 1, 1]}


def test_recomputed_beams_catch_up_then_sample_together():
    scheduler = create_scheduler(max_num_batched_tokens=64)
    group = _beam_group(6, width=2)
    scheduler.add_seq_group(group)
    finish_step(scheduler.schedule())
    _fork_beams(group, scheduler.block_manager, [[5, 9, 4], [8]])  # 10 and 8 tokens; one full block in common
    scheduler._preempt(scheduler.running.popleft())

    def run(out):
        for scheduled in out.scheduled_seq_groups:
            for seq, chunk in scheduled.token_chunks.items():
                seq.num_computed_tokens += chunk

    # Re-admitted, the second beam shares the first's first block and waits until it is written;
    # each beam computes all but its last token (9, then 8 - 4 - 1)...
    out = scheduler.schedule()
    first, second = group.seqs
    bm = scheduler.block_manager
    assert bm.get_block_table(first)[0] == bm.get_block_table(second)[0]
    assert chunks_of(out) == {"beam": [9]}
    run(out)
    out = scheduler.schedule()
    assert chunks_of(out) == {"beam": [3]}
    run(out)
    # ...then both compute their last token in one step, where the group samples.
    assert chunks_of(scheduler.schedule()) == {"beam": [1, 1]}


def test_admission_takes_the_cached_prefix_once_and_counts_it_computed():
    scheduler = create_scheduler(enable_prefix_caching=True)
    first = create_dummy_group("a", 12)
    scheduler.add_seq_group(first)
    finish_step(scheduler.schedule())
    second = create_dummy_group("b", 14)  # shares the first 12 tokens (3 full blocks)
    scheduler.add_seq_group(second)
    out = scheduler.schedule()
    assert chunks_of(out) == {"a": [1], "b": [14 - 12]}
    seq = second.seqs[0]
    assert seq.num_computed_tokens == 12
    assert scheduler.block_manager.get_block_table(seq)[:3] == scheduler.block_manager.get_block_table(first.seqs[0])[:3]


def test_abort_frees_blocks_of_running_and_waiting_groups():
    scheduler = create_scheduler(max_num_seqs=1)
    scheduler.add_seq_group(create_dummy_group("a", 5))
    scheduler.add_seq_group(create_dummy_group("b", 5))
    finish_step(scheduler.schedule())
    aborted = scheduler.abort_seq_groups({"a", "b", "unknown"})
    assert {g.request_id for g in aborted} == {"a", "b"}
    assert all(s.status == SequenceStatus.FINISHED_ABORTED for g in aborted for s in g.seqs)
    assert not scheduler.running and not scheduler.waiting and scheduler.block_manager.num_free_blocks == 64


def test_prompt_logprob_spans_are_not_produced_twice_after_preemption():
    group = create_dummy_group("a", 10, SamplingParams(prompt_logprobs=1, max_tokens=5))
    assert group.prompt_logprob_span(0, 4) == (0, 4)  # logprobs of prompt tokens 1..4
    group.prompt_logprobs += [{}] * 4
    assert group.prompt_logprob_span(4, 10) == (4, 9)  # the last prompt position predicts an output
    group.prompt_logprobs += [{}] * 5
    # Preempted and recomputed from position 0: every prompt logprob exists already.
    assert group.prompt_logprob_span(0, 8) is None and group.prompt_logprob_span(0, 11) is None
    # Preempted after the first chunk only: the recompute resumes where they stopped.
    partial = create_dummy_group("b", 10, SamplingParams(prompt_logprobs=1, max_tokens=5))
    partial.prompt_logprobs += [{}] * 4
    assert partial.prompt_logprob_span(0, 10) == (4, 9)
    assert create_dummy_group("c", 10).prompt_logprob_span(0, 10) is None


def test_short_request_leaves_and_waiting_one_joins_while_long_one_runs(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_num_seqs=2, max_num_batched_tokens=64)
    engine = llm.llm_engine
    engine.add_request("long", [1, 5, 6, 7], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.add_request("short", [1, 8, 9], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.add_request("late", [1, 10, 11, 12], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))

    def running():
        return [g.request_id for g in engine.scheduler.running]

    engine.step()
    assert running() == ["long", "short"] and [g.request_id for g in engine.scheduler.waiting] == ["late"]
    finished = []
    history = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
        history.append((tuple(running()), tuple(finished)))
    # "short" finished and freed its slot; "late" joined while "long" was still running.
    joined = next(i for i, (r, _) in enumerate(history) if "late" in r)
    assert "short" in history[joined][1] and "long" in history[joined][0]
    assert finished.index("late") < finished.index("long")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_kv_blocks


def test_prefill_and_decode_share_a_step(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64)
    engine = llm.llm_engine
    engine.add_request("a", [1, 5, 6], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    engine.add_request("b", list(range(3, 200)), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    out = engine.scheduler.schedule()
    chunks = {s.seq_group.request_id: sum(s.token_chunks.values()) for s in out.scheduled_seq_groups}
    # "a" decodes one token while "b" prefills a chunk that fills the rest of the 64-token budget.
    assert chunks == {"a": 1, "b": 63}
