"""Structured outputs after the reasoning (``engine/reasoning_gate.py``): with a reasoning parser,
a request's grammar holds from the token after the reasoning ends, as vLLM 0.32 gates it. The
rules were checked against vLLM itself (a differential run over 172 cases, docs/architecture.md)."""

import dataclasses
import json

import jsonschema
import pytest
from transformers import AutoTokenizer

from conftest import BOS, CHAT_TEMPLATE, make_checkpoint
from pagedlm import LLM, SamplingParams
from pagedlm.config import StructuredOutputsConfig
from pagedlm.engine.reasoning_gate import END, END_FED, FREE, ReasoningParser

S, E, TOOL, IM_START, IM_END, CHATBOT = 90, 91, 92, 93, 94, 95
QWEN3 = ReasoningParser("qwen3", S, E, TOOL, frozenset({IM_START, IM_END}))
R1 = ReasoningParser("deepseek_r1", S, E)
COHERE = ReasoningParser("cohere_command3", S, E, boundaries=frozenset({CHATBOT}))
MINIMAX = ReasoningParser("minimax_m3", S, E)


@pytest.mark.parametrize("parser, prompt, ended", [
    (R1, [5, S, 6, E, 7], True), (R1, [5, S, 6], False), (R1, [5, 6], False), (R1, [E, 5, S], False),
    (R1, [5, E], True), (R1, [S, E, IM_START, 5], True),
    (QWEN3, [S, E, IM_START, 5], False),  # an earlier turn's end does not count
    (QWEN3, [IM_START, S, 6, E, 7], True), (QWEN3, [IM_START, S, 6, TOOL], True), (QWEN3, [IM_START, 5], False),
    (COHERE, [S, 6, E], True), (COHERE, [S, E, CHATBOT], False), (COHERE, [CHATBOT, E], False), (COHERE, [E], True),
    (COHERE, [5], False), (COHERE, [E, S], False),
    (MINIMAX, [S, 6, E], True), (MINIMAX, [S, 6], False), (MINIMAX, [5, E], True), (MINIMAX, [E, S], False),
])
def test_whether_the_prompt_ended_the_reasoning(parser, prompt, ended):
    assert (parser.gate(prompt) is None) == ended


def takes(parser: ReasoningParser, prompt: list[int], output: list[int]) -> list[int]:
    gate = parser.gate(prompt)
    return [gate.take(t) for t in output]


def test_where_the_output_ends_the_reasoning():
    assert takes(R1, [5, S], [6, S, E]) == [FREE, FREE, END]
    assert takes(R1, [5], [6, E]) == [FREE, END]  # no start needed
    assert takes(QWEN3, [IM_START, S], [6, TOOL]) == [FREE, END_FED]  # qwen3's implicit end is fed to the grammar
    assert takes(R1, [5, S], [TOOL, E]) == [FREE, END]
    assert takes(MINIMAX, [S], [6, 7, E]) == [FREE, FREE, END]
    # cohere_command3 judges the whole sequence at every token: after a chatbot token an end alone
    # does not end it, a new start and end do.
    assert takes(COHERE, [S, 6, E, CHATBOT], [E, 7, S, 8, E]) == [FREE, FREE, FREE, FREE, END]


QWEN3_TEXTS = dataclasses.replace(QWEN3, texts=("<think>", "</think>", "<tool_call>"))
# Each token's text, as the detokenizer gives it (5-8: "a", "r", "c", "d"; 9: a stop string's cut).
TEXTS = {S: "<think>", E: "</think>", TOOL: "<tool_call>", 5: "a", 6: "r", 7: "c", 8: "d"}


def split(prompt: list[int], output: list[int], text: str | None = None, texts: dict[int, str] = TEXTS):
    """QWEN3_TEXTS' split of ``output``, its text ``text`` (all its tokens' by default)."""
    def text_before(k: int) -> str:
        return "".join(texts[t] for t in output[:k])

    return QWEN3_TEXTS.split(prompt, output, text_before(len(output)) if text is None else text, text_before)


@pytest.mark.parametrize("prompt, output, text, split_", [
    ([IM_START, S], [6, E, 7], None, ("r", "c")),
    ([IM_START], [S, 6, E, 7], None, ("r", "c")),
    ([IM_START], [5, S, 6, E], None, ("ar", None)),  # vLLM's deepseek_r1 drops the "a"
    ([IM_START, S], [6, 7], None, ("rc", None)),
    ([IM_START, S, 6, E], [7], None, (None, "c")),  # the prompt ended it (vLLM's split reads no prompt)
    ([IM_START, S], [6, TOOL, 7], None, ("r", "<tool_call>c")),
    ([IM_START, S], [E, 7], None, (None, "c")),
    ([IM_START, S], [6, E, 7, E, 8], None, ("r", "c</think>d")),
    ([IM_START, S], [6, E], "r", ("r", None)),  # a stop ("</think>", or its id) cut the marker off
    ([IM_START, S], [6, E, 7], "r</th", ("r</th", None)),  # a stop string cut the text before the end
    ([IM_START], [S, S, 6, E, 7], None, ("r", "c")),  # as the count leaves them out
])
def test_reasoning_and_content_split_where_the_gate_ends_the_reasoning(prompt, output, text, split_):
    assert split(prompt, output, text)[:2] == split_


def test_the_split_is_where_the_end_token_is_not_where_its_text_is():
    """Found by a hunt: the text was searched for the marker, so a marker left out of the text (a
    special token, skip_special_tokens) split nothing (a tool call's arguments held the reasoning),
    and one spelled by other tokens before the end token split there."""
    unshown = {**TEXTS, S: "", E: ""}
    assert split([IM_START], [S, 6, E, 7], texts=unshown)[:2] == ("r", "c")
    spelled = {**TEXTS, 5: "</think>"}
    assert split([IM_START, S], [6, 5, 7, E, 8], texts=spelled)[:2] == ("r</think>c", "d")
    assert split([IM_START, S], [6, 5, 7], texts=spelled)[:2] == ("r</think>c", None)  # spelled: ends nothing


def test_reasoning_tokens_are_those_before_the_end_less_start_markers():
    assert split([IM_START], [S, 6, 7, E, 8]).num_tokens == 2
    assert split([IM_START, S], [6, TOOL, 8]).num_tokens == 1
    assert split([IM_START, S], [6, 7]).num_tokens == 2  # never ended
    assert split([IM_START, S, E], [6, 7]).num_tokens == 0  # ended in the prompt


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory, tokenizer_dir) -> str:
    """The test llama with qwen3's markers added to its tokenizer as tokens of their own."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<think>", "</think>", "<tool_call>", "<|im_start|>", "<|im_end|>"], special_tokens=True)
    path = tmp_path_factory.mktemp("think")
    tokenizer.save_pretrained(path / "tok")
    return make_checkpoint(str(path / "m"), "llama", str(path / "tok"), vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def llm(think_dir) -> LLM:
    return LLM(think_dir, dtype="float32", max_model_len=128, reasoning_parser="qwen3")


CHOICE = {"choice": ["yes", "no"]}


def greedy(llm: LLM, prompt: list[int], max_tokens: int, **fields) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **fields)
    return llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids


def test_the_grammar_holds_from_the_token_after_the_reasoning_ends(llm, think_dir):
    tok = llm.get_tokenizer()
    think, end, im_start = (tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<|im_start|>"))
    prompt = [BOS, im_start, 40, 41, think]
    free = greedy(llm, prompt, 6)
    assert end not in free  # the model alone does not end its reasoning here
    # Never ended: the whole completion is free.
    assert greedy(llm, prompt, 6, structured_outputs=CHOICE) == free
    # Ended by the forced end string (thinking_token_budget): free before it, then the grammar.
    out = greedy(llm, prompt, 12, structured_outputs=CHOICE, thinking_token_budget=3)
    assert out[:3] == free[:3] and out[3] == end
    answer = tok.decode(out[4:], skip_special_tokens=True)
    assert answer in ("yes", "no")
    # Ended in the prompt: the grammar from the first token, as without a reasoning parser.
    closed = prompt + out[:4]
    assert greedy(llm, closed, 8, structured_outputs=CHOICE) == out[4:]
    plain = LLM(think_dir, dtype="float32", max_model_len=128)
    held = greedy(plain, prompt, 8, structured_outputs=CHOICE)
    assert tok.decode(held, skip_special_tokens=True) in ("yes", "no")
    # enable_in_reasoning: from the first token whatever the prompt.
    eager = LLM(think_dir, dtype="float32", max_model_len=128, reasoning_parser="qwen3",
                structured_outputs_config={"enable_in_reasoning": True})
    assert greedy(eager, prompt, 8, structured_outputs=CHOICE) == held
    with pytest.raises(ValueError, match="thinking_token_budget with structured_outputs needs the grammar to wait"):
        greedy(eager, prompt, 8, structured_outputs=CHOICE, thinking_token_budget=2)


def test_each_completion_keeps_its_own_gate(llm):
    """n completions fork from one sequence: each ends its reasoning on its own tokens."""
    tok = llm.get_tokenizer()
    think = tok.convert_tokens_to_ids("<think>")
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True, thinking_token_budget=2,
                            structured_outputs=CHOICE)
    out = llm.generate({"prompt_token_ids": [BOS, 40, think]}, params, use_tqdm=False)[0]
    for completion in out.outputs:
        assert completion.token_ids[2] == tok.convert_tokens_to_ids("</think>")
        assert tok.decode(completion.token_ids[3:], skip_special_tokens=True) in ("yes", "no")


def test_only_the_reasoning_parser_argument_makes_the_grammar_wait(think_dir, llm):
    """Found by a review: a reasoning_config's parser armed the gate; in vLLM only LLM's
    reasoning_parser (or structured_outputs_config's) does, the config naming the budget's strings."""
    tok = llm.get_tokenizer()
    prompt = [BOS, tok.convert_tokens_to_ids("<|im_start|>"), 40, 41, tok.convert_tokens_to_ids("<think>")]
    config_only = LLM(think_dir, dtype="float32", max_model_len=128, reasoning_config={"reasoning_parser": "qwen3"})
    plain = LLM(think_dir, dtype="float32", max_model_len=128)
    assert greedy(config_only, prompt, 8, structured_outputs=CHOICE) == greedy(plain, prompt, 8, structured_outputs=CHOICE)
    gated = LLM(think_dir, dtype="float32", max_model_len=128, structured_outputs_config={"reasoning_parser": "qwen3"})
    assert greedy(gated, prompt, 6, structured_outputs=CHOICE) == greedy(plain, prompt, 6)


def test_beam_search_under_a_grammar_that_waits_for_the_reasoning_is_refused(llm):
    params = SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=4, structured_outputs=CHOICE)
    with pytest.raises(ValueError, match="structured_outputs with beam search cannot wait for the end of the reason"):
        llm.generate("Hi", params, use_tqdm=False)


def test_what_the_gate_refuses(llama_dir):
    with pytest.raises(ValueError, match="structured_outputs_config.reasoning_parser must be one of qwen3"):
        StructuredOutputsConfig(reasoning_parser="nope")
    with pytest.raises(ValueError, match="structured_outputs_config.backend must be 'auto' or 'xgrammar'"):
        LLM(llama_dir, structured_outputs_config={"backend": "outlines"})
    with pytest.raises(ValueError, match="structured_outputs_config: unknown or unsupported field"):
        LLM(llama_dir, structured_outputs_config={"disable_additional_properties": True})
    # The test tokenizer has no <think> token: qwen3's rules cannot run on it.
    llm = LLM(llama_dir, dtype="float32", max_model_len=64, reasoning_parser="qwen3")
    with pytest.raises(ValueError, match="needs '<think>' and '</think>' as single tokens"):
        llm.generate("Hi", SamplingParams(structured_outputs=CHOICE), use_tqdm=False)
    minimax = LLM(llama_dir, dtype="float32", max_model_len=64, reasoning_parser="minimax_m3")
    with pytest.raises(ValueError, match="needs '<mm:think>' and '</mm:think>' as single tokens"):
        minimax.generate("Hi", SamplingParams(structured_outputs=CHOICE), use_tqdm=False)
    assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_an_implicit_end_the_grammar_rejects_ends_the_completion_before_it(llm, caplog):
    """qwen3's <tool_call>, sampled freely in the reasoning, ends it and is fed to the grammar (as in
    vLLM); a choice grammar rejects it, so the completion ends before it with "abort" (vLLM keeps it
    and ends with "error"), saying so."""
    tok = llm.get_tokenizer()
    tool = tok.convert_tokens_to_ids("<tool_call>")
    prompt = [BOS, tok.convert_tokens_to_ids("<|im_start|>"), 40, tok.convert_tokens_to_ids("<think>")]
    with caplog.at_level("WARNING", logger="pagedlm"):
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, logit_bias={tool: 100},
                                                                       structured_outputs=CHOICE), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "abort"
    assert f"token {tool}, sampled freely in the reasoning, ended it but is not one its structured output allows" in caplog.text


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_openai_rows_write_the_reasoning_apart_and_call_after_it(think_dir, tmp_path, skip_special_tokens):
    """With a reasoning parser, a chat row's message has vLLM's reasoning field and the content
    after it, which is what a response_format or a tool choice constrained; with the markers
    special tokens left out of the text too (found by a hunt: the text was searched for them, so a
    tool call's arguments held the reasoning)."""
    from pagedlm.entrypoints.jobs.runner import JobConfig, run_job
    from test_jobs import read_output
    from test_tool_choice import UNIT, _no_whitespace, _row, write_jsonl

    # The prompt opens the reasoning, and the thinking budget ends it after two tokens.
    fields = {"skip_special_tokens": skip_special_tokens, "thinking_token_budget": 2,
              "logit_bias": _no_whitespace(think_dir), "chat_template": CHAT_TEMPLATE + "<think>"}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    rows = [_row("call", tools=[UNIT], tool_choice={"type": "function", "function": {"name": "set_unit"}}, **fields),
            _row("json", response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}, **fields),
            _row("plain", max_tokens=6, skip_special_tokens=skip_special_tokens, thinking_token_budget=2,
                 chat_template=CHAT_TEMPLATE + "<think>")]
    config = JobConfig(input=write_jsonl(tmp_path / "in.jsonl", rows), output=str(tmp_path / "out.jsonl"),
                       model=think_dir, engine={"dtype": "float32", "max_model_len": 128, "reasoning_parser": "qwen3"},
                       trust_request_chat_template=True)
    stats, _ = run_job(config, tty=False)
    assert (stats.completed, stats.errors) == (3, 0)
    got = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"] for r in read_output(tmp_path / "out.jsonl")}
    [call] = got["call"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), UNIT["function"]["parameters"])
    jsonschema.validate(json.loads(got["json"]["content"]), schema)
    for message in got.values():
        assert "</think>" not in (message["content"] or "") and "reasoning" in message
    usage = {r["custom_id"]: r["response"]["body"]["usage"] for r in read_output(tmp_path / "out.jsonl")}
    assert usage["call"]["completion_tokens_details"] == {"reasoning_tokens": 2}  # the thinking budget's two
    assert got["plain"]["reasoning"] is not None


def test_a_job_says_once_that_its_reasoning_parser_cannot_run(llama_dir, caplog):
    """Found by a docs walk: with a tokenizer without the markers the messages were silently not split."""
    from pagedlm.entrypoints.jobs.runner import _reasoning_parser

    llm = LLM(llama_dir, dtype="float32", max_model_len=64, reasoning_parser="qwen3")
    with caplog.at_level("WARNING", logger="pagedlm"):
        assert _reasoning_parser(llm) is None
    assert "needs '<think>' and '</think>' as single tokens" in caplog.text and "without a reasoning apart" in caplog.text
    assert "are refused" in caplog.text
    caplog.clear()
    llm = LLM(llama_dir, dtype="float32", max_model_len=64, reasoning_parser="qwen3",
              structured_outputs_config={"enable_in_reasoning": True})
    with caplog.at_level("WARNING", logger="pagedlm"):
        assert _reasoning_parser(llm) is None
    assert "without a reasoning apart" in caplog.text and "are refused" not in caplog.text  # nothing waits for it


def test_openai_rows_write_the_reasoning_apart_with_grammars_in_the_reasoning_too(think_dir, tmp_path):
    """Found by a hunt: with enable_in_reasoning (grammars from the first token) a job's chat
    messages were not split, though --reasoning-parser was given; vLLM's server splits by its
    parser alone."""
    from pagedlm.entrypoints.jobs.runner import JobConfig, run_job
    from test_jobs import read_output
    from test_tool_choice import _row, write_jsonl

    rows = [_row("plain", max_tokens=6, thinking_token_budget=2, chat_template=CHAT_TEMPLATE + "<think>")]
    config = JobConfig(input=write_jsonl(tmp_path / "in.jsonl", rows), output=str(tmp_path / "out.jsonl"),
                       model=think_dir, engine={"dtype": "float32", "max_model_len": 128, "reasoning_parser": "qwen3",
                                                "structured_outputs_config": {"enable_in_reasoning": True}},
                       trust_request_chat_template=True)
    assert run_job(config, tty=False)[0].completed == 1
    [row] = read_output(tmp_path / "out.jsonl")
    assert row["response"]["body"]["choices"][0]["message"]["reasoning"] is not None
    assert row["response"]["body"]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
