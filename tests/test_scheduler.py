"""Continuous batching seen through the scheduler's state, step by step (no timing)."""

from pagedlm import LLM, SamplingParams


def test_short_request_leaves_and_waiting_one_joins_while_long_one_runs(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_num_seqs=2, max_num_batched_tokens=64)
    engine = llm.llm_engine
    engine.add_request("long", None, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), [1, 5, 6, 7])
    engine.add_request("short", None, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), [1, 8, 9])
    engine.add_request("late", None, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), [1, 10, 11, 12])

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
    engine.add_request("a", None, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), [1, 5, 6])
    engine.step()
    engine.add_request("b", None, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), list(range(3, 200)))
    out = engine.scheduler.schedule()
    chunks = {s.seq_group.request_id: sum(s.token_chunks.values()) for s in out.scheduled_seq_groups}
    # "a" decodes one token while "b" prefills a chunk that fills the rest of the 64-token budget.
    assert chunks == {"a": 1, "b": 63}
