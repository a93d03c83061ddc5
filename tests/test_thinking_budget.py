"""``SamplingParams.thinking_token_budget`` (vLLM's): once a thinking section holds that many tokens,
the reasoning end string is forced, token by token."""

import dataclasses
import json

import pytest

from conftest import BOS
from pagedlm import LLM, SamplingParams
from pagedlm.config import ReasoningConfig
from pagedlm.engine.thinking_budget import ReasoningTokens, ThinkingBudget

TOKENS = ReasoningTokens(start=(5, 6), end=(7, 8, 9))
FOX = {"reasoning_start_str": " fox", "reasoning_end_str": " lazy dog."}  # 2 and 5 tokens here


def forced_run(budget: int, prompt: list[int], free: list[int]) -> list[int]:
    """The tokens a sequence takes when it would take ``free`` tokens wherever nothing is forced."""
    state, out, free = ThinkingBudget.for_prompt(budget, TOKENS, prompt), [], iter(free)
    while (token := state.forced_token()) is not None or (token := next(free, None)) is not None:
        state.append(token)
        out.append(token)
    return out


def test_a_section_the_prompt_opens_ends_after_its_budget():
    assert forced_run(2, [1, 5, 6], [20, 21, 22, 23]) == [20, 21, 7, 8, 9, 22, 23]
    assert forced_run(0, [1, 5, 6], [20]) == [7, 8, 9, 20]
    assert forced_run(2, [1, 5, 6, 30, 31, 32], [20]) == [7, 8, 9, 20]  # the prompt spent it already
    assert forced_run(2, [1, 5, 6, 7, 8, 9], [20, 21, 22]) == [20, 21, 22]  # closed in the prompt
    assert forced_run(2, [1, 5], [6, 20, 21, 22]) == [6, 20, 21, 7, 8, 9, 22]  # the start spans prompt and output


def test_sections_the_output_opens_and_closes():
    # Closed naturally within budget (the end sequence's tokens count until it is complete), then a
    # second section gets the budget afresh.
    assert forced_run(4, [1], [5, 6, 20, 7, 8, 9, 21, 5, 6, 22, 23, 24, 25, 26]) == \
        [5, 6, 20, 7, 8, 9, 21, 5, 6, 22, 23, 24, 25, 7, 8, 9, 26]
    assert forced_run(3, [1], [5, 6, 20, 7, 8, 9]) == [5, 6, 20, 7, 8, 7, 8, 9, 9]  # as vLLM counts
    # A start inside an open section does not restart its count (found by a hunt against vLLM's V1).
    assert forced_run(3, [1, 5, 6], [20, 5, 6, 21, 22]) == [20, 5, 6, 7, 8, 9, 21, 22]
    assert forced_run(3, [1], [20, 21, 22, 23, 24]) == [20, 21, 22, 23, 24]  # never opened


def test_a_transition_phrase_is_forced_but_the_parsers_marker_closes_a_section():
    """Found by a hunt: with an end string that leads with a transition phrase, a section the
    model (or the prompt: Qwen3's enable_thinking=False) closed with the parser's own marker stayed
    open, so the phrase was forced into the answer (and a JSON constraint then aborted it); the
    parser's marker closes it, as vLLM's natural_reasoning_end_token_ids do."""
    phrase = ReasoningTokens(start=(5,), end=(10, 11, 9), natural_end=(9,))

    def run(budget, prompt, free):
        state, out, free = ThinkingBudget.for_prompt(budget, phrase, prompt), [], iter(free)
        while (token := state.forced_token()) is not None or (token := next(free, None)) is not None:
            state.append(token)
            out.append(token)
        return out

    assert run(1, [1, 5, 9], [20, 21, 22]) == [20, 21, 22]  # closed in the prompt by the marker
    assert run(2, [1, 5], [20, 9, 21, 22, 23]) == [20, 9, 21, 22, 23]  # closed by the model within budget
    assert run(2, [1, 5], [20, 21, 22]) == [20, 21, 10, 11, 9, 22]  # the phrase is forced when it runs out
    assert ReasoningTokens.of(ReasoningConfig(reasoning_parser="qwen3", reasoning_end_str="\n\nDone.\n</think>"),
                              _QwenLike()).natural_end == (9,)
    # An end string of one's own beside a parser is its own natural end (found by a review).
    own = ReasoningTokens.of(ReasoningConfig(reasoning_parser="qwen3", reasoning_start_str="<r>", reasoning_end_str="</r>"),
                             _QwenLike())
    assert own.natural_end == own.end


class _QwenLike:
    """Encodes "</think>" as 9, anything else as one token per character."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [9] if text == "</think>" else [100 + ord(c) % 50 for c in text]


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(llama_dir, dtype="float32", max_model_len=128, reasoning_config=FOX)


def _greedy(llm: LLM, prompt: list[int], max_tokens: int, **fields) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **fields)
    return llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("budget", [0, 3])
def test_the_end_string_is_forced_and_generation_goes_on_after_it(llm, budget):
    start, end = (list(ids) for ids in (llm.llm_engine.reasoning_tokens.start, llm.llm_engine.reasoning_tokens.end))
    assert len(start) == 2 and len(end) == 5
    prompt = [BOS, 40, 41] + start
    out = _greedy(llm, prompt, 14, thinking_token_budget=budget)
    assert out[:budget] == _greedy(llm, prompt, budget or 1)[:budget]
    assert out[budget:budget + len(end)] == end
    # After the end string the section is closed: what follows is the model's own greedy choice.
    prefix = out[:budget + len(end)]
    assert out[len(prefix):] == _greedy(llm, prompt + prefix, 14 - len(prefix))


def test_forced_tokens_report_the_models_logprobs_and_win_over_processing(llm):
    """Found by a hunt: forcing ran through a bitmask, before the log-probabilities, so a forced
    token reported 0.0 (vLLM reports the model's own, computed before it forces); and a processor or
    ban that removed the forced token ended the completion (vLLM forces after its processors)."""
    start, end = list(llm.llm_engine.reasoning_tokens.start), list(llm.llm_engine.reasoning_tokens.end)
    prompt = [BOS, 40, 41, *start]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, thinking_token_budget=1, logprobs=1)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[1:6] == end
    for i in range(1, 6):
        free = SamplingParams(temperature=0, max_tokens=1, logprob_token_ids=[out.token_ids[i]])
        alone = llm.generate({"prompt_token_ids": prompt + out.token_ids[:i]}, free, use_tqdm=False)[0].outputs[0]
        model = alone.logprobs[0][out.token_ids[i]]
        assert out.logprobs[i][out.token_ids[i]].logprob == pytest.approx(model.logprob, abs=1e-5)
        assert model.logprob < 0
        assert out.logprobs[i][out.token_ids[i]].rank == model.rank
    assert out.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(out.token_ids, out.logprobs)))

    def ban_the_end(token_ids, logits):
        logits[end] = float("-inf")
        return logits

    processed = dataclasses.replace(params, logits_processors=[ban_the_end], bad_words=[" lazy"],
                                    allowed_token_ids=[40, 41, 42])
    got = llm.generate({"prompt_token_ids": prompt}, processed, use_tqdm=False)[0].outputs[0]
    assert got.token_ids[1:6] == end and got.finish_reason == "length"


def test_each_completion_of_a_request_counts_its_own_section(llm):
    start, end = llm.llm_engine.reasoning_tokens.start, list(llm.llm_engine.reasoning_tokens.end)
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=12, ignore_eos=True, thinking_token_budget=2)
    out = llm.generate({"prompt_token_ids": [BOS, 40, *start]}, params, use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(c.token_ids[2:7] == end for c in out.outputs)


def test_a_closed_or_unopened_section_forces_nothing(llm):
    start, end = llm.llm_engine.reasoning_tokens.start, llm.llm_engine.reasoning_tokens.end
    prompt = [BOS, 40, *start, 41, *end]
    out = _greedy(llm, prompt, 10, thinking_token_budget=0)
    assert out == _greedy(llm, prompt, 10)
    assert not any(out[i:i + len(start)] == list(start) for i in range(len(out)))  # else a section opened


def test_preemption_forces_the_same_tokens(llama_dir):
    start = None
    outs = []
    for num_kv_blocks in (None, 6):
        llm = LLM(llama_dir, dtype="float32", max_model_len=128, reasoning_config=FOX, num_kv_blocks=num_kv_blocks,
                  block_size=8)
        start = llm.llm_engine.reasoning_tokens.start
        prompts = [{"prompt_token_ids": [BOS, 40 + i, *start]} for i in range(4)]
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, thinking_token_budget=3)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        if num_kv_blocks:
            assert llm.llm_engine.scheduler.num_preemptions > 0
    assert outs[0] == outs[1]


def test_what_thinking_token_budget_refuses(llama_dir, llm):
    with pytest.raises(ValueError, match="thinking_token_budget must be None, -1"):
        SamplingParams(thinking_token_budget=-2)
    assert SamplingParams(thinking_token_budget=-1).thinking_token_budget is None  # vLLM's "no limit"
    with pytest.raises(ValueError, match="thinking_token_budget is not supported with use_beam_search"):
        SamplingParams(thinking_token_budget=2, use_beam_search=True, best_of=2, temperature=0)
    # With structured outputs only where the grammar waits for the reasoning's end (test_reasoning_gate.py).
    with pytest.raises(ValueError, match="thinking_token_budget with structured_outputs needs the grammar to wait"):
        llm.generate("Hi", SamplingParams(thinking_token_budget=2, structured_outputs={"regex": "a+"}), use_tqdm=False)
    plain = LLM(llama_dir, dtype="float32", max_model_len=128)
    with pytest.raises(ValueError, match=r"thinking_token_budget needs .*LLM\(reasoning_parser=\.\.\.\)"):
        plain.generate("Hi", SamplingParams(thinking_token_budget=2), use_tqdm=False)
    with pytest.raises(ValueError, match="reasoning_parser must be one of qwen3, deepseek_r1"):
        LLM(llama_dir, reasoning_parser="nope")
    with pytest.raises(ValueError, match="reasoning_config: unknown field"):
        LLM(llama_dir, reasoning_config={"reasoning_start": "<think>"})
    with pytest.raises(ValueError, match="needs reasoning_parser, or both"):
        ReasoningConfig(reasoning_end_str="</think>")
    with pytest.raises(ValueError, match="must differ"):
        ReasoningConfig(reasoning_start_str="<think>", reasoning_end_str="<think>")
    assert ReasoningConfig(reasoning_parser="qwen3").reasoning_end_str == "</think>"


def test_a_job_row_sets_the_budget_under_the_jobs_reasoning_parser(llama_dir, tmp_path, capsys):
    from pagedlm.entrypoints.cli import run_main

    tok = LLM(llama_dir, dtype="float32", max_model_len=128).get_tokenizer()
    think, end = (tok.encode(text, add_special_tokens=False) for text in ("<think>", "</think>"))
    rows = [{"id": 1, "prompt_token_ids": [BOS, 40, *think], "sampling_params": {"thinking_token_budget": 2}},
            {"id": 2, "prompt_token_ids": [BOS, 40, *think]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--model", llama_dir,
            "--dtype", "float32", "--max-model-len", "128", "--reasoning-parser", "qwen3", "--temperature", "0",
            "--max-tokens", "12", "--ignore-eos"]
    assert run_main(args) == 0
    out = {r["id"]: r["outputs"][0]["token_ids"] for r in map(json.loads, open(tmp_path / "out.jsonl"))}
    assert out[1][2:2 + len(end)] == end and out[1][:2] == out[2][:2]
    # The budget as a job default without the parser: refused before any row runs (every row failed).
    no_parser = [a for a in args if a not in ("--reasoning-parser", "qwen3")]
    no_parser[no_parser.index(str(tmp_path / "out.jsonl"))] = str(tmp_path / "out2.jsonl")
    with pytest.raises(SystemExit):
        run_main([*no_parser, "--thinking-token-budget", "2"])
    assert not (tmp_path / "out2.jsonl").exists()
    assert "--thinking-token-budget needs the model's reasoning strings: --reasoning-parser" in capsys.readouterr().err
    # -1 is no limit (vLLM's), which needs no parser; the Ray processor checks as the job does.
    assert run_main([*no_parser, "--thinking-token-budget", "-1"]) == 0
    from pagedlm.integrations.ray import PagedLMProcessorConfig

    with pytest.raises(ValueError, match="thinking_token_budget needs the model's reasoning strings"):
        PagedLMProcessorConfig(model_source=llama_dir, sampling_params={"thinking_token_budget": 2})
    PagedLMProcessorConfig(model_source=llama_dir, sampling_params={"thinking_token_budget": 2},
                           engine_kwargs={"reasoning_parser": "qwen3"})
