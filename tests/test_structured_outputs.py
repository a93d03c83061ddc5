"""Structured outputs (xgrammar): the mask, choice/regex/JSON always hold, n > 1, preemption, errors."""

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from conftest import BOS, EOS, VOCAB_SIZE
from pagedlm import LLM, SamplingParams, default_model_path
from pagedlm.engine import xgrammar_regex
from pagedlm.model_executor.layers.sampler import Sampler, SamplingMetadata
from pagedlm.sampling_params import StructuredOutputsParams as SO

PROMPTS = ["Hello, my name is", "The answer is", "12 + 30 =", "Once upon a time", "Colors:", "fox"]


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(llama_dir, dtype="float32", max_model_len=256)


def texts(outs) -> list[str]:
    return [c.text for o in outs for c in o.outputs]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (1.5, 5, 0.9), (0.7, 0, 0.5)])
def test_sampled_tokens_are_always_in_the_mask(temperature, top_k, top_p):
    torch.manual_seed(0)
    rows, vocab = 64, 1000
    logits = torch.randn(rows, vocab) * 5
    allowed = torch.rand(rows, vocab) < 0.05
    allowed[:, 0] = True  # never empty
    bits = torch.zeros(rows, (vocab + 31) // 32 * 32, dtype=torch.int64)
    bits[:, :vocab] = allowed.long()
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    words = (bits.view(rows, -1, 32) * weights).sum(-1)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as int32 bit patterns
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * rows
    meta = SamplingMetadata.build(params, [[1]] * rows, [[]] * rows, [()] * rows, {}, [], vocab, torch.device("cpu"),
                                  token_bitmasks=list(bitmask))
    tokens = Sampler()(logits.clone(), meta).token_ids
    assert bool(allowed[torch.arange(rows), tokens].all())
    if temperature == 0.0:  # greedy: the best allowed token
        assert torch.equal(tokens, logits.masked_fill(~allowed, float("-inf")).argmax(-1))


def test_choice_regex_and_grammar_always_hold_with_n_gt_1(llm):
    choice = ["red", "green", "blue shades"]
    outs = llm.generate(PROMPTS, SamplingParams(n=3, temperature=1.2, seed=5, max_tokens=20,
                                                structured_outputs=SO(choice=choice)), use_tqdm=False)
    assert all(c.text in choice and c.finish_reason == "stop" for o in outs for c in o.outputs)
    regex = r"[a-c]{2,4}x(yz)?"
    outs = llm.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, seed=6, max_tokens=20,
                                                structured_outputs=SO(regex=regex)), use_tqdm=False)
    for o in outs:
        for c in o.outputs:
            assert re.fullmatch(regex, c.text) and c.finish_reason == "stop", c.text
    grammar = 'root ::= "(" digits ")"\ndigits ::= [0-9] | [0-9] digits'
    # The same as Lark, which a grammar without "::=" is read as (vLLM's rule).
    lark = 'start: "(" DIGITS ")"  // a comment\nDIGITS: /[0-9]+/'
    for g in (grammar, lark):
        outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=7, max_tokens=12,
                                                    structured_outputs=SO(grammar=g)), use_tqdm=False)
        for c in (o.outputs[0] for o in outs):
            assert re.fullmatch(r"\(\d+\)", c.text) if c.finish_reason == "stop" else re.fullmatch(r"\(\d*", c.text)
    with pytest.raises(ValueError, match=r"grammar does not compile \(read as Lark: no line defines a rule with"):
        llm.generate("x", SamplingParams(structured_outputs=SO(grammar='start: "a" undefined_rule')), use_tqdm=False)
    with pytest.raises(ValueError, match=r"grammar does not compile \(read as EBNF: a line defines a rule with"):
        llm.generate("x", SamplingParams(structured_outputs=SO(grammar='root ::= "a" undefined_rule')), use_tqdm=False)


def test_an_empty_regex_or_choice_gives_the_empty_completion(llm):
    """vLLM takes them on purpose (an empty pattern matches the empty string); they were refused."""
    for constraint in (SO(regex=""), SO(choice=[""])):
        out = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, max_tokens=8, structured_outputs=constraint),
                           use_tqdm=False)
        assert [(c.text, c.token_ids, c.finish_reason) for c in (o.outputs[0] for o in out)] == [("", [EOS], "stop")] \
            * len(PROMPTS)


def test_constrained_greedy_is_unconstrained_greedy_wherever_allowed(llm):
    regex = r"[a-z ]{1,30}\."
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=24, structured_outputs=SO(regex=regex))
    for prompt in PROMPTS[:3]:
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        prompt_ids, constrained = out.prompt_token_ids, out.outputs[0].token_ids
        free = llm.generate([{"prompt_token_ids": prompt_ids + constrained[:i]} for i in range(len(constrained))],
                            SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=llm.llm_engine.vocab_size)
        matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_regex(regex))
        mask = xgr.allocate_token_bitmask(1, info.vocab_size)
        for i, token in enumerate(constrained):
            unconstrained = free[i].outputs[0].token_ids[0]
            matcher.fill_next_token_bitmask(mask)
            allowed = bool((int(mask[0, unconstrained // 32]) >> (unconstrained % 32)) & 1)
            assert token == unconstrained or not allowed, (prompt, i)
            assert matcher.accept_token(token)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_the_model_s_under_the_grammar_mask_as_vllm_reports_them(llm, temperature):
    """Found by a differential run against vLLM 0.32: logprobs and cumulative_logprob ignored the
    grammar (a forbidden token first, the chosen one at rank 323). vLLM masks the logits before its
    sampler, so the allowed tokens share all the probability."""
    regex = r"[a-z ]{1,30}\."
    tokenizer = llm.get_tokenizer()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=llm.llm_engine.vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_regex(regex)
    for prompt in PROMPTS[:2]:
        params = dict(temperature=temperature, seed=3, max_tokens=12, structured_outputs=SO(regex=regex))
        out = llm.generate(prompt, SamplingParams(logprobs=4, **params), use_tqdm=False)[0]
        c = out.outputs[0]
        bare = llm.generate(prompt, SamplingParams(logprobs=0, **params), use_tqdm=False)[0].outputs[0]
        assert bare.token_ids == c.token_ids and bare.cumulative_logprob == pytest.approx(c.cumulative_logprob, abs=1e-5)
        free = llm.generate([{"prompt_token_ids": out.prompt_token_ids + c.token_ids[:i]} for i in range(len(c.token_ids))],
                            SamplingParams(temperature=0, max_tokens=1, logprobs=-1), use_tqdm=False)
        matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, info.vocab_size)
        total = 0.0
        for i, token in enumerate(c.token_ids):
            raw = free[i].outputs[0].logprobs[0]  # every token's raw log-probability
            matcher.fill_next_token_bitmask(mask)
            allowed = [t for t in raw if (int(mask[0, t // 32]) >> (t % 32)) & 1]
            norm = torch.logsumexp(torch.tensor([raw[t].logprob for t in allowed], dtype=torch.float64), 0).item()
            got = c.logprobs[i]
            assert got[token].logprob == pytest.approx(raw[token].logprob - norm, abs=1e-4)
            ranked = sorted(allowed, key=lambda t: -raw[t].logprob)
            assert got[token].rank == ranked.index(token) + 1
            finite = {t for t, lp in got.items() if lp.logprob > float("-inf")}
            assert finite == set(ranked[:4]) | {token}  # a token the grammar leaves out only as -inf, as in vLLM
            total += got[token].logprob
            assert matcher.accept_token(token)
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_preemption_under_a_tight_cache_keeps_the_constraint(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=24, block_size=8, max_num_seqs=8)
    regex = r"([a-d]{3} ){6,12}end"
    outs = llm.generate([{"prompt_token_ids": [BOS] + [10 + i] * 20} for i in range(8)],
                        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=60,
                                       structured_outputs=SO(regex=regex)), use_tqdm=False)
    assert llm.get_stats()["num_preemptions"] > 0
    for c in (c for o in outs for c in o.outputs):
        assert (re.fullmatch(regex, c.text) if c.finish_reason == "stop" else re.fullmatch(r"([a-d]{0,3} ?)*", c.text)), c.text


def test_constraints_over_a_wordpiece_tokenizer_are_refused(wordpiece_llama_dir):
    """Found by a hunt: WordPiece's decoder puts a space before each word, which xgrammar does not
    see, so a choice ended "stop" outside its list and a regex aborted; refused naming the field."""
    llm = LLM(wordpiece_llama_dir, dtype="float32", max_model_len=128)
    params = SamplingParams(max_tokens=4, structured_outputs=SO(choice=["cat", "dog"]))
    [(index, error)] = list(llm.generate_as_completed(["a b"], params, return_errors=True))
    assert error.field == "structured_outputs" and "WordPiece decoder puts spaces" in str(error)
    assert llm.generate(["a b"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_bad_constraints_are_refused_before_any_work(llm):
    with pytest.raises(ValueError, match="exactly one of"):
        SO(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one of"):
        SO()
    # Found by a hunt: False or 0 beside another kind passed the check and was compiled as its kind
    # (a choice ran as the "regex" False); set is not None, as vLLM counts constraints.
    for unset in ({"regex": False}, {"json": False}, {"json_object": False}, {"json_object": 0}, {"grammar": ""}):
        kinds = sorted([next(iter(unset)), "choice"], key=["json", "regex", "choice", "grammar", "json_object"].index)
        with pytest.raises(ValueError, match=f"exactly one of .*; got {', '.join(kinds)}"):
            SO(**unset, choice=["yes", "no"])
    with pytest.raises(ValueError, match="structured_outputs.json_object must be True, got False"):
        SO(json_object=False)
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams(structured_outputs={"regexp": "a"})
    bad = [SamplingParams(structured_outputs=SO(regex="(")), SamplingParams(max_tokens=2),
           SamplingParams(structured_outputs=SO(grammar="root ::= undefined_rule")),
           SamplingParams(structured_outputs=SO(json='{"type": "object", "properties": 5}'))]
    with pytest.raises(ValueError) as err:
        llm.generate(["a", "b", "c", "d"], bad, use_tqdm=False)
    msg = str(err.value)
    assert "3 of 4 prompts are invalid" in msg and "prompt 0: structured_outputs.regex does not compile" in msg
    assert "prompt 2: structured_outputs.grammar" in msg and "prompt 3: structured_outputs.json" in msg
    assert not llm.llm_engine.has_unfinished_requests()



@pytest.mark.parametrize("constraint, message", [
    ({"regex": r"\Acat\z"}, r"escape \\A is not supported"),
    ({"regex": r"\Qa.b\E"}, r"escape \\Q is not supported"),
    ({"json": {"type": "string", "pattern": r"^\Aab"}}, r"pattern '\^\\\\Aab': escape \\A is not supported"),
    # xgrammar ignores anchors inside the pattern ("ab$c" gave "abc") and drops a pattern's lookahead.
    ({"regex": "ab$c"}, r"the anchor \$ inside the pattern is not supported"),
    ({"regex": "x(^a)"}, r"the anchor \^ inside"),
    ({"regex": "(^a)*b"}, r"the anchor \^ inside"),
    ({"json": {"type": "string", "pattern": "^a^b$"}}, r"the anchor \^ inside"),
    ({"json": {"type": "string", "pattern": "^(?!a)\\w+$"}}, "lookaround"),
    ({"regex": r"(a)\1"}, r"backreference \\1"),
    # a surrogate pair became CESU-8 bytes, which no text decodes to the character
    ({"regex": r"\ud83d\ude00"}, r"escape \\ud83d is not supported \(a surrogate"),
    # found by a second hunt: xgrammar matched the letter of an escape in a class ([\B] matched "B")
    ({"regex": r"[\B]"}, r"escape \\B is not supported in a character class"),
    ({"regex": r"\xZZ"}, r"malformed escape \\x"),
    ({"regex": r"(^a)+?b"}, r"the anchor \^ inside"),
    ({"regex": r"[^]a]"}, r"a character class cannot begin with \]"),
    ({"grammar": "root ::= root"}, "structured_outputs.grammar admits no output at all"),
    # found by a session-43 check: xgrammar wrote a property of an empty anyOf as '"a":' with no value
    ({"json": {"anyOf": []}}, r"structured_outputs.json does not compile: anyOf \[\] \(no value meets it"),
    ({"json": {"type": "object", "properties": {"a": {"oneOf": []}}}}, r"oneOf \[\] \(no value meets it"),
])
def test_constraints_that_would_not_hold_as_written_are_refused(llm, constraint, message):
    """Found by a hunt: xgrammar matched \\A, \\z, \\Q, \\E as the letters themselves (warning only on
    stderr: "\\Acat\\z" gave "Acatz"), and a grammar or schema that admits nothing ended every
    completion at once with no text, as if it had run."""
    with pytest.raises(ValueError, match=message):
        llm.generate("a", SamplingParams(structured_outputs=constraint), use_tqdm=False)
    for fine in (r"\d+\s\w[\b]\x41\u0042\.", r"\\A", r"^(a|^b)c$|d$"):  # known escapes, an escaped backslash
        # then A, anchors at the edges
        llm.generate("a", SamplingParams(max_tokens=1, structured_outputs={"regex": fine}), use_tqdm=False)


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "hobbies": {"type": "array",
                   "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}


def test_smollm2_json_outputs_parse_and_validate():
    llm = LLM(default_model_path(), max_model_len=1024)
    conversations = [[{"role": "user", "content": f"Describe person number {i} as a JSON object with a name, an "
                                                  "age and up to three hobbies."}] for i in range(40)]
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=120,
                             structured_outputs=SO(json=SCHEMA)) for i in range(40)]
    outs = llm.chat(conversations, params, use_tqdm=False)
    stopped = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(stopped) >= 30
    for c in stopped:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        # In the schema's order (not sorted: "age" would come first).
        assert c.text.index('"name"') < c.text.index('"age"') < c.text.index('"hobbies"'), c.text
    choice = llm.chat(conversations[:8], SamplingParams(temperature=1.0, seed=1, max_tokens=10,
                                                        structured_outputs=SO(choice=["yes", "no"])), use_tqdm=False)
    assert all(o.outputs[0].text in ("yes", "no") for o in choice)
    llm.close()


def test_streamed_prompts_wait_for_their_grammar_and_bad_ones_are_returned(llm):
    params = [SamplingParams(temperature=0, max_tokens=4),
              SamplingParams(temperature=1.0, seed=1, max_tokens=8, structured_outputs=SO(regex=r"z{2,5}q")),
              SamplingParams(structured_outputs=SO(regex="[unclosed"))]
    results = dict(llm.generate_as_completed(iter(PROMPTS[:3]), iter(params), return_errors=True))
    assert sorted(results) == [0, 1, 2]
    assert re.fullmatch(r"z{2,5}q", results[1].outputs[0].text)
    assert isinstance(results[2], ValueError) and "does not compile" in str(results[2])
    with pytest.raises(ValueError, match="prompt 2 cannot run: structured_outputs.regex"):
        list(llm.generate_as_completed(PROMPTS[:3], params))
    assert not llm.llm_engine.has_unfinished_requests()


def test_min_tokens_yields_where_the_grammar_can_only_end(llm):
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=1.0, seed=2, min_tokens=10, max_tokens=20,
                                                    structured_outputs=SO(choice=["ok"])), use_tqdm=False)
    assert all(o.outputs[0].text == "ok" and o.outputs[0].finish_reason == "stop" for o in outs)
    # Found by a hunt: the token ending the grammar there was not taken for a stop token (min_tokens
    # had not been reached): its text joined the output ("yes</s>", a stop id's digit past the
    # regex) and stop_reason was lost. ignore_eos too: the grammar's EOS ends it all the same.
    tok = llm.get_tokenizer()
    for extra in ({"min_tokens": 6}, {"ignore_eos": True}):
        c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, skip_special_tokens=False,
                                                    structured_outputs=SO(choice=["yes"]), **extra),
                         use_tqdm=False)[0].outputs[0]
        assert (c.text, c.finish_reason, c.token_ids[-1]) == ("yes", "stop", tok.eos_token_id)
        assert c.stop_reason == (tok.eos_token_id if "ignore_eos" in extra else None)  # as vLLM names them
    two = tok.convert_tokens_to_ids("2")
    for min_tokens in (0, 10):
        c = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[two],
                                                    logit_bias={two: 30.0}, min_tokens=min_tokens,
                                                    structured_outputs=SO(regex="[0-9]{1,3}")), use_tqdm=False)[0].outputs[0]
        assert re.fullmatch("[0-9]{1,3}", c.text) and (c.finish_reason, c.stop_reason) == ("stop", two)


def test_a_requests_stop_ids_end_a_grammar_only_where_it_can_end(llm, caplog):
    """Found by a hunt: a request's stop_token_ids cut a constrained output anywhere (JSON without its
    closing brace); vLLM makes them the grammar's stop tokens: masked where it cannot end, ending it
    where it can. Here the stop id is biased to win wherever it is allowed."""
    tok = llm.get_tokenizer()
    stop = tok.convert_tokens_to_ids("x")
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop], logit_bias={stop: 100.0},
                            structured_outputs=SO(regex="[a-z]{3,8}"))
    for c in (o.outputs[0] for o in llm.generate(PROMPTS[:3], params, use_tqdm=False)):
        assert re.fullmatch("[a-wyz]{3,8}", c.text) and c.finish_reason == "stop" and c.stop_reason == stop
        assert re.fullmatch("[a-z]{3,8}", tok.decode(c.token_ids[:-2])) is None  # it ended at the first chance
    # where the grammar is done, only its stop tokens are left: the request's own one ends it too
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[stop],
                                                structured_outputs=SO(choice=["ab"])), use_tqdm=False)[0].outputs[0]
    assert c.text == "ab" and c.finish_reason == "stop"
    # Found by a review: a logits processor that forces the stop id where the grammar cannot end
    # ended the completion "stop", its text no JSON: it aborts there, as any forced token does.

    def force(token_ids, logits):
        if len(token_ids) == 2:
            logits[stop] = 1e4
        return logits

    c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop],
                                                logits_processors=[force], structured_outputs=SO(json={
                                                    "type": "object", "properties": {"a": {"type": "integer"}}})),
                     use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "abort" and len(c.token_ids) == 2
    # The warning names the stop id (a hunt: it blamed a logits processor or ban for leaving no token).
    assert f"token {stop} is one of its stop_token_ids, which ends the completion" in caplog.text
    # stop ids that are every token the grammar can begin with: refused before any work
    first = [tok.convert_tokens_to_ids(t) for t in "ab"]
    with pytest.raises(ValueError, match="stop_token_ids are every token structured_outputs lets the output start"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, stop_token_ids=first,
                                                structured_outputs=SO(choice=["a", "b"])), use_tqdm=False)


def test_bad_words_hold_where_the_grammar_allows_only_them(llm):
    """Found by a hunt: where a grammar allowed only banned tokens, every ban was lifted (the lift
    is for min_tokens' stop-token bans, so that a grammar that can only end ends): a bad word was
    generated. The completion now aborts there, as a ban that leaves nothing does."""
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, bad_words=["x"],
                                                structured_outputs=SO(regex="yx")), use_tqdm=False)[0].outputs[0]
    assert c.text == "y" and c.finish_reason == "abort"
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, bad_words=["x"], min_tokens=4,
                                                structured_outputs=SO(regex="yz?")), use_tqdm=False)[0].outputs[0]
    assert c.text in ("y", "yz") and c.finish_reason == "stop"  # min_tokens still yields to the end


def test_json_object_is_an_object_and_choices_keep_any_unicode(llm):
    outs = llm.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=40,
                                                structured_outputs=SO(json_object=True)), use_tqdm=False)
    for c in (c for o in outs for c in o.outputs):
        assert c.text.lstrip()[:1] in ("{", ""), c.text  # never an array or a scalar
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
    choice = ["😀 smile", "𝔘nicode", "日本", 'quote " and \\ backslash']
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=5, max_tokens=30,
                                                structured_outputs=SO(choice=choice)), use_tqdm=False)
    assert all(o.outputs[0].text in choice for o in outs)


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7}}}, "multipleOf"),
    ({"type": "array", "contains": {"const": 42}}, "contains"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf"),
    ({"$defs": {"x": {"not": {"type": "string"}}}, "$ref": "#/$defs/x"}, "not"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependencies": {"a": ["b"]}}, "dependencies"),
])
def test_schema_keywords_xgrammar_cannot_enforce_are_refused(llm, schema, keyword):
    with pytest.raises(ValueError, match=f"prompt 0: structured_outputs.json does not compile: keyword {keyword}"):
        llm.generate("x", SamplingParams(structured_outputs=SO(json=schema)), use_tqdm=False)
    # A property merely named like a keyword is fine.
    llm.generate("x", SamplingParams(max_tokens=2, structured_outputs=SO(
        json={"type": "object", "properties": {keyword: {"type": "integer"}}})), use_tqdm=False)


def test_a_processor_that_removes_every_allowed_token_ends_only_its_completion(llm):
    def ban_all(ids, logits):
        return torch.full_like(logits, float("-inf")).index_fill_(0, torch.tensor([7]), 0.0)

    outs = llm.generate(PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=6, logits_processors=[ban_all],
                                                     structured_outputs=SO(regex="zz")),
                                      SamplingParams(temperature=0, max_tokens=6)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "abort" and outs[0].outputs[0].token_ids == []
    assert len(outs[1].outputs[0].token_ids) == 6


def test_without_return_errors_no_prompt_after_a_bad_constraint_runs(llm):
    slow = {"type": "object", "properties": {f"f{i}": {"type": "string", "format": "date"} for i in range(40)}}
    params = [SamplingParams(temperature=0, max_tokens=3, structured_outputs=SO(json=slow)),
              SamplingParams(structured_outputs=SO(regex="(bad")),
              SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=0, max_tokens=3)]
    seen = []
    with pytest.raises(ValueError, match="prompt 1 cannot run"):
        for index, _ in llm.generate_as_completed(iter(PROMPTS[:4]), iter(params)):
            seen.append(index)
    assert seen == [0] and not llm.llm_engine.has_unfinished_requests()


def test_disable_any_whitespace_gives_compact_json(llm, llama_dir):
    """vLLM's ``disable_any_whitespace``: no whitespace at all outside strings (it gave ", " and ": ",
    xgrammar's any_whitespace=False alone), per request or for every request from the engine's
    ``structured_outputs_config`` (vLLM 0.32's place for it, refused before). The same schema with
    whitespace allowed is compiled apart (the key)."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3},
                                               "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                                               "c": {"type": "object"}},
              "required": ["a", "b", "c"]}

    def skeletons(engine, disable, constraint=None):
        params = SamplingParams(n=4, temperature=1.5, seed=3, max_tokens=60,
                                structured_outputs=constraint or SO(json=schema, disable_any_whitespace=disable))
        outs = engine.generate(PROMPTS, params, use_tqdm=False)
        return [re.sub(r'"(?:[^"\\]|\\.)*("|$)', '""', c.text) for o in outs for c in o.outputs]

    loose, compact = skeletons(llm, False), skeletons(llm, True)
    assert any(re.search(r"\s", s.replace(": ", ":").replace(", ", ",")) for s in loose)
    assert any(re.search(r"[:,] ", s) for s in loose)
    assert not any(re.search(r"\s", s) for s in compact)
    assert any("," in s for s in compact)
    engine_wide = LLM(llama_dir, dtype="float32", max_model_len=256,
                      structured_outputs_config={"disable_any_whitespace": True})
    assert skeletons(engine_wide, False) == compact
    assert not any(re.search(r"\s", s) for s in skeletons(engine_wide, False, SO(json_object=True)))
    with pytest.raises(ValueError, match="disable_any_whitespace applies to json and json_object only"):
        SO(regex="a+", disable_any_whitespace=True)
    # Found by a hunt: accepted with a regex and ignored.
    with pytest.raises(ValueError, match="disable_additional_properties applies to json and json_object only, not choice"):
        SO(choice=["a"], disable_additional_properties=True)
    assert SO(json={"type": "object"}, disable_additional_properties=True).disable_additional_properties


_CAT_OR_DOG = {
    "$defs": {"Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                      "required": ["kind", "lives"]},
              "Dog": {"type": "object", "properties": {"kind": {"enum": ["dog", "puppy"]}, "name": {"type": "string"}},
                      "required": ["kind", "name"]}},
    "type": "object", "required": ["pet"],
    "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                           "discriminator": {"propertyName": "kind"}}},
}


@pytest.mark.parametrize("schema, message", [
    # xgrammar enforces oneOf as anyOf: {} and {"a": 1} match both branches.
    ({"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                {"type": "object", "properties": {"b": {"type": "integer"}}}]}, "oneOf whose branches may overlap"),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "oneOf whose branches may overlap"),
    # 1 and 1.0 are one JSON value; "cat" in both.
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}, "required": ["k"]},
                {"type": "object", "properties": {"k": {"const": 1.0}}, "required": ["k"]}]}, "oneOf whose"),
    ({"oneOf": [{"type": "object", "properties": {"k": {"enum": ["dog", "cat"]}}, "required": ["k"]},
                {"type": "object", "properties": {"k": {"const": "cat"}}, "required": ["k"]}]}, "oneOf whose"),
    # Strict mode generates only listed properties: "zzz" could never appear.
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "zzz"]}, r"required \['zzz'\]"),
    ({"type": "object", "required": ["a"]}, r"required \['a'\]"),
    ({"$ref": "http://example.com/schema.json"}, r"\$ref 'http://example.com/schema.json'"),
    # Found by a hunt: xgrammar enforces enum, const, anyOf, oneOf and $ref alone, dropping what is beside them.
    ({"type": "integer", "enum": [1, 2.5, "x"]}, r"enum value\(s\) 2.5, 'x' beside type, which they do not satisfy"),
    ({"enum": [1, 5], "minimum": 4}, r"enum value\(s\) 1 beside minimum"),
    ({"$defs": {"E": {"enum": ["a", "bbbb"]}}, "$ref": "#/$defs/E", "maxLength": 3}, r"\$ref value\(s\) 'bbbb'"),
    ({"enum": ["a"], "items": {"type": "string"}}, r"enum beside items"),
    ({"type": "string", "anyOf": [{"maxLength": 2}, {"type": "integer"}]}, r"anyOf beside type .*move them into each"),
    ({"$defs": {"P": {"type": "integer"}}, "$ref": "#/$defs/P", "maximum": 3}, r"\$ref beside maximum"),
    ({"type": "string", "pattern": "^a", "format": "email"}, "pattern beside format"),
    ({"minimum": 5}, "minimum without a type"),
    ({"type": "string", "format": "regex"}, "format 'regex'"),
    ({"$defs": {"P": {"$anchor": "foo", "type": "integer"}}, "$ref": "#foo"}, r"\$ref '#foo'"),
    ({"type": []}, r"type \[\]"),
    ({"allOf": [{"type": "integer"}], "maximum": 3}, r"allOf beside maximum"),
    ({"type": "string", "maxLength": -1}, "maxLength -1"),
    ({"const": 12345678901234567890}, r"integer 12345678901234567890 in enum/const \(past 2\*\*53"),
    # xgrammar drops the length where a pattern or format is given.
    ({"type": "string", "pattern": "^a", "maxLength": 3}, "maxLength beside pattern"),
    ({"type": "string", "format": "email", "minLength": 30}, "minLength beside format"),
])
def test_schemas_xgrammar_would_accept_without_enforcing_are_refused(llm, schema, message):
    with pytest.raises(ValueError, match=f"prompt 0: structured_outputs.json does not compile: {message}"):
        llm.generate("x", SamplingParams(structured_outputs=SO(json=schema)), use_tqdm=False)


def test_a_oneof_of_exclusive_branches_is_kept_and_holds(llm):
    """Branches of distinct types, or a discriminated union (pydantic's, through $refs): anyOf means
    the same, so xgrammar enforces them."""
    by_type = {"oneOf": [{"type": "string", "maxLength": 5}, {"type": "boolean"}]}
    by_value = {"oneOf": [{"const": "a", "description": "the first"}, {"type": "string", "enum": ["b", "c"]}]}
    schemas = [by_type, _CAT_OR_DOG, by_value]
    outs = llm.generate(PROMPTS, [SamplingParams(n=2, temperature=1.0, seed=i, max_tokens=60,
                                                 structured_outputs=SO(json=schemas[i % 3])) for i in range(6)],
                        use_tqdm=False)
    for i, o in enumerate(outs):
        for c in o.outputs:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), schemas[i % 3])


def test_length_bounded_strings_are_json_strings_of_those_lengths(llm):
    """xgrammar's own length-bounded strings let raw control characters through (invalid JSON); as
    patterns of the same lengths they do not. Random weights pick such characters often."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4},
                                               "b": {"type": "string", "minLength": 2, "maxLength": 6}},
              "required": ["a", "b"]}
    # Also where other types are allowed: those stay, strings are bounded.
    for s in (schema, schema["properties"]["a"], {"type": ["string", "null"], "maxLength": 3}, {"maxLength": 2}):
        outs = llm.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=60, structured_outputs=SO(
            json=s, disable_any_whitespace=True)), use_tqdm=False)
        stopped = [c.text for o in outs for c in o.outputs if c.finish_reason == "stop"]
        assert len(stopped) >= 8
        # Not those whose bytes are no UTF-8 (decoded with U+FFFD): xgrammar takes overlong encodings
        # byte by byte, which random weights pick and a trained model's text does not hold.
        for text in (t for t in stopped if "\ufffd" not in t):
            jsonschema.validate(json.loads(text), s)


def test_schemas_in_another_property_order_are_compiled_apart(llm):
    """Properties are generated in the schema's order, so a schema is cached by its text in that order."""
    first = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
    second = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}, "required": ["a", "b"]}
    params = [SamplingParams(temperature=0, max_tokens=3, structured_outputs=SO(json=s, disable_any_whitespace=True))
              for s in (first, second)]
    assert [t[:3] for t in texts(llm.generate(PROMPTS[:2], params, use_tqdm=False))] == ['{"a', '{"b']


@pytest.mark.parametrize("schema, message", [
    ({"enum": {1, 2}}, r"structured_outputs.json\['enum'\] must be JSON .*got a set"),
    ({1: "x", "type": "integer"}, "key 1 is not a str"),
    ({"type": "number", "maximum": float("inf")}, r"\['maximum'\] must be JSON: inf is not a finite number"),
])
def test_a_schema_json_cannot_hold_is_refused_by_name(schema, message):
    with pytest.raises(ValueError, match=message):
        SO(json=schema)


def _nested(levels: int) -> dict:
    """A schema whose JSON nests objects and arrays ``levels`` deep."""
    schema: dict = {"enum": [1]} if levels % 2 == 0 else {"type": "integer"}  # 2 levels or 1
    for _ in range((levels - 1) // 2):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _levels(value) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(_levels, children), default=0)


def test_a_schema_nested_deeper_than_the_limit_is_refused_by_name():
    """Found by a hunt: a 2,000-level schema raised RecursionError from the checks (no ValueError,
    no field), and xgrammar's compile time grows faster than the depth (a 700-level schema took 40
    s, 1,500 levels over 300 s). Up to MAX_JSON_DEPTH levels, dict or JSON text, are taken."""
    from pagedlm.utils import MAX_JSON_DEPTH

    deepest, over = _nested(MAX_JSON_DEPTH), _nested(MAX_JSON_DEPTH + 1)
    assert (_levels(deepest), _levels(over)) == (MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1)
    for value in (deepest, json.dumps(deepest)):
        SO(json=value)
    message = rf"structured_outputs.json nests objects and arrays more than {MAX_JSON_DEPTH} levels deep"
    for value in (over, json.dumps(over), '{"a": ' * 5000 + "1" + "}" * 5000):
        with pytest.raises(ValueError, match=message):
            SO(json=value)


def test_allowed_token_ids_that_cannot_start_the_constraint_are_refused_before_any_work(llm):
    tok = llm.get_tokenizer()
    q, z = (tok.encode(c, add_special_tokens=False)[0] for c in ("q", "z"))
    with pytest.raises(ValueError, match="prompt 1: allowed_token_ids hold none of the tokens structured_outputs lets"):
        llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=2),
                                   SamplingParams(allowed_token_ids=[q], structured_outputs=SO(choice=["zz"]))],
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, allowed_token_ids=[z, tok.eos_token_id],
                                                  structured_outputs=SO(choice=["zz"])), use_tqdm=False)
    assert out[0].outputs[0].text == "zz"
    # Streamed (the job runner's path): that prompt alone is an error, once its grammar compiled.
    params = [SamplingParams(max_tokens=2), SamplingParams(allowed_token_ids=[q], structured_outputs=SO(choice=["yy"]))]
    results = dict(llm.generate_as_completed(PROMPTS[:2], params, return_errors=True))
    assert len(results[0].outputs[0].token_ids) == 2 and "allowed_token_ids hold none" in str(results[1])
    with pytest.raises(ValueError, match="prompt 1 cannot run: allowed_token_ids hold none"):
        list(llm.generate_as_completed(PROMPTS[:2], params))
    assert not llm.llm_engine.has_unfinished_requests()


def test_special_tokens_are_never_text_under_a_constraint(llm):
    """Found by a hunt: xgrammar found no special tokens in a byte-level vocabulary, so EOS's text
    ("</s>" here, "<|im_end|>" in SmolLM2's) counted as characters: under the regex "...." EOS
    could come first and the completion ended empty with "stop". BOS and EOS are pushed up here."""
    tok = llm.get_tokenizer()
    special = {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    bias = {i: 100 for i in special}
    for constraint in ({"regex": "." * len(tok.eos_token)}, {"json": {"type": "string"}}, {"choice": [tok.bos_token, "x"]}):
        out = llm.generate("a", SamplingParams(temperature=0, max_tokens=12, logit_bias=bias,
                                               structured_outputs=constraint), use_tqdm=False)[0].outputs[0]
        text_ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        assert out.text and not special & set(text_ids), (constraint, out)
        assert "json" in constraint or out.finish_reason == "stop", (constraint, out)


def _accepts(llm, constraint: dict, text: str | bytes) -> bool:
    """Whether the compiled constraint takes ``text`` and then may end."""
    manager = llm.llm_engine.structured_outputs
    matcher = xgr.GrammarMatcher(manager.compile(SO(**constraint)))
    return matcher.accept_string(text) and matcher.accept_token(llm.get_tokenizer().eos_token_id) and matcher.is_terminated()


def test_negated_ebnf_classes_keep_their_meaning_without_surrogates(llm):
    """A review: the surrogates written after a class's trailing literal "-" made it a range
    ([^a-] refused "b"), and a class without its "]" was mended into another one."""
    assert _accepts(llm, {"grammar": "root ::= [^a-]"}, "b") and _accepts(llm, {"grammar": "root ::= [^a-]"}, "中")
    assert not _accepts(llm, {"grammar": "root ::= [^a-]"}, "-") and not _accepts(llm, {"grammar": "root ::= [^a-]"}, "a")
    with pytest.raises(ValueError, match="structured_outputs.grammar does not compile"):
        _accepts(llm, {"grammar": "root ::= [^ab"}, "c")
    with pytest.raises(ValueError, match="holds only surrogates"):
        _accepts(llm, {"grammar": "root ::= [\\ud800-\\udfff]"}, "c")


def _quoted(text: bytes) -> bytes:
    return b'"' + text + b'"'


def _key(text: bytes) -> bytes:
    return b'{"' + text + b'":1}'


@pytest.mark.parametrize("constraint, wrap", [
    ({"regex": "."}, bytes), ({"regex": "[^a]"}, bytes), ({"regex": r"\S"}, bytes), ({"regex": r"[\s\S]"}, bytes),
    ({"regex": "[\u0000-\uffff]"}, bytes), ({"regex": "[é-中]"}, bytes),
    ({"json": {"type": "string"}}, _quoted), ({"json": {"type": "string", "maxLength": 3}}, _quoted),
    ({"json": {"type": "string", "pattern": "^.$"}}, _quoted), ({"json": {"type": "string", "pattern": "^[^a]$"}}, _quoted),
    ({"json": {"type": "string", "pattern": r"^\W$"}}, _quoted), ({"json": {"type": "string", "pattern": "^[é-中]$"}}, _quoted),
    ({"json_object": True}, _key), ({"json": {"type": "object", "additionalProperties": {"type": "integer"}}}, _key),
    ({"grammar": "root ::= [^a]"}, bytes), ({"grammar": 'root ::= Regex("[^a]")'}, bytes),
    ({"grammar": 'root ::= Regex("[é-中]")'}, bytes), ({"grammar": "start: /./"}, bytes),
    ({"grammar": "root ::= [\\u0000-\\uffff]"}, bytes), ({"grammar": "root ::= [\\u0080-\\U0010ffff]"}, bytes),
])
def test_no_constraint_takes_bytes_that_are_not_utf8(llm, constraint, wrap):
    """Found by a hunt: xgrammar's open classes took an encoded surrogate (ED A0 80), and its state
    machine (JSON patterns, EBNF Regex()) overlong sequences where a class spans UTF-8 lengths, so
    a constrained output could be "\ufffd\ufffd\ufffd", outside its own regex; vLLM 0.32 passes the
    same specs to xgrammar as they are. Valid characters of each length still pass."""
    for valid in ("é", "中"):
        assert _accepts(llm, constraint, wrap(valid.encode())), valid
    for invalid in (b"\xed\xa0\x80", b"\xe0\x9c\xac", b"\xf0\x8f\xbf\xbf"):
        assert not _accepts(llm, constraint, wrap(invalid)), invalid


@pytest.mark.parametrize("pattern, value", [('^"[a-c]{1,3}"$', '"ab"'), (r"^C:\\[a-z]+$", "C:\\dir"),
                                            (r"^a\tb$", "a\tb"), (r"^[\x00-\x1f]$", "\x1b"), ("^a\u0001$", "a\u0001")])
def test_a_pattern_that_names_what_json_escapes_gives_json(llm, pattern, value):
    """Found by a hunt: xgrammar wrote the characters a pattern names raw into the JSON string, so a
    pattern with a quote, backslash or control character gave no JSON; they are matched as their
    escapes now, and the value still matches the pattern."""
    llm.generate("a", SamplingParams(max_tokens=1, structured_outputs={"json": {"type": "string", "pattern": pattern}}),
                 use_tqdm=False)  # compiles the grammar
    constraint = {"json": {"type": "string", "pattern": pattern}}
    assert re.fullmatch(pattern, value) and _accepts(llm, constraint, json.dumps(value))
    raw = '"' + value + '"'
    assert not _accepts(llm, constraint, raw), "the raw text, which is no JSON"


@pytest.mark.parametrize("schema, good, bad", [
    ({"const": "année"}, ['"année"'], ['"ann\u0e9e"', '"ann\\u00e9e"']),
    ({"enum": ["décembre", "ÿ1"]}, ['"décembre"', '"ÿ1"'], ['"d\u0ecembre"']),
    ({"type": "object", "properties": {"année": {"type": "integer"}}, "required": ["année"]}, ['{"année":1}'], []),
    ({"type": "object", "properties": {"année": {"type": "string", "maxLength": 3}, "ü": {"const": "\x7fa\\xe9"}},
      "required": ["année", "ü"]}, ['{"année":"àb","ü":"\\u007fa\\\\xe9"}'], ['{"ann\u0e9e":"a","ü":"\\u007fa\\\\xe9"}']),
])
def test_a_schemas_latin_1_characters_hold_before_a_hex_digit(llm, schema, good, bad):
    """Found by a hunt: xgrammar compiles a schema's grammar from its printed text, which writes
    U+0080-U+00FF as \\xHH and reads on into a next hex digit: "année" became "ann\u0e9e" (the
    key required, so a French schema's output failed it), "décembre" "d\u0ecembre"."""
    constraint = {"json": schema}
    llm.generate("a", SamplingParams(max_tokens=1, structured_outputs=constraint), use_tqdm=False)
    assert all(_accepts(llm, constraint, text) for text in good)
    assert not any(_accepts(llm, constraint, text) for text in bad)


@pytest.mark.parametrize("grammar, good, bad", [
    (r"start: /[\^a]/", ["^", "a"], ["b"]),  # xgrammar read [\^a] as [^a]
    (r"start: /\x41b/", ["Ab"], ["\u041b"]),  # and \x41b as U+041B
    (r"start: /[\x00-\x1fA]/", ["A", "\x05"], ["\u01f0"]),
    # A Lark terminal is a Python regex: \s is Python's whitespace (xgrammar's took U+FEFF, left U+0085 out).
    (r"start: /a\s/ | /[\s,]b/", ["a ", "a\x85", ",b", "\x1cb"], ["a\ufeff", "\ufeffb"]),
    (r'start: "q" /x\/y/i // a /comment/ "', ["qx/y", "qX/Y"], ["qxy"]),
    ('root ::= [^"\\\\] Regex("\\\\x41b")', ["!Ab"], ["!\u041b"]),  # an EBNF class with a quote before it
    # An EBNF comment's quote (found by a review: it hid the next line's Regex from the check).
    ('root ::= "a" rest # a "quote\nrest ::= Regex("[\\\\^b]") # Regex("\\\\Z")', ["a^", "ab"], ["ac"]),
])
def test_regexes_in_grammars_hold_as_written(llm, grammar, good, bad):
    """Found by a hunt: a Lark grammar's /regex/ terminals and EBNF's Regex("...") reached xgrammar
    unchecked, which misread what regex= refuses or rewrites; they are checked as regex= is, and a
    Lark terminal with Python's meaning (where xgrammar's shorthands take more than Python's, refused)."""
    constraint = {"grammar": grammar}
    llm.generate("a", SamplingParams(max_tokens=1, structured_outputs=constraint), use_tqdm=False)
    assert all(_accepts(llm, constraint, text) for text in good)
    assert not any(_accepts(llm, constraint, text) for text in bad)


@pytest.mark.parametrize("grammar, message", [
    (r"start: /[0-9]\Z/", r"terminal /\[0-9\]\\Z/: escape \\Z is not supported"),
    (r"start: /\W+/", r"terminal /\\W\+/: \\W is not supported in a Lark terminal \(a Python regex\)"),
    (r"start: /[\Sa]/", r"\\S is not supported in a Lark terminal"),
    (r"start: /[^\d]/", r"\\d or \\w in a negated class is not supported in a Lark terminal"),  # xgrammar's are ASCII
    ('root ::= Regex("[0-9]$x")', r'Regex\("\[0-9\]\$x"\): the anchor \$ inside the pattern is not supported'),
    # Regex( and its string apart by more than 40 characters (found by a review: left unchecked).
    ('root ::= Regex(' + " " * 50 + '"[0-9]$x")', r'Regex\("\[0-9\]\$x"\): the anchor \$ inside the pattern'),
    ("start: /ab", "has no closing /"),
])
def test_regexes_in_grammars_that_xgrammar_would_not_enforce_are_refused(llm, grammar, message):
    with pytest.raises(ValueError, match=message):
        llm.generate("a", SamplingParams(max_tokens=1, structured_outputs={"grammar": grammar}), use_tqdm=False)


def test_an_escaped_caret_first_in_a_class_is_a_caret(llm):
    """xgrammar read [\\^a] as the negated [^a]."""
    constraint = {"regex": r"[\^a]"}
    assert _accepts(llm, constraint, "^") and _accepts(llm, constraint, "a") and not _accepts(llm, constraint, "b")


@pytest.mark.parametrize("regex, good, bad", [
    (r"[\x00-\x1fA]", ["A", "\x05"], ["B", "\u01f0"]),  # xgrammar read [\x00-\x1fA] as U+0000-U+01FA
    (r"[^\x00-\x1fa]", ["b", "B"], ["a", "\x05"]),
    (r"[\x01a]", ["a", "\x01"], ["\x1a"]), (r"[\x7fb]", ["b", "\x7f"], ["\u07fb"]),
    (".c", ["xc", "\u00e9c", "\U0001F600c"], ["\nc", "\rc", "\u2028c"]),  # ECMAScript's dot: no line terminator
    (r"[\w-a]", ["-", "a", "_"], ["!"]), (r"[\s-z]", ["-", " ", "z"], ["a"]),  # a "-" after \w: xgrammar dropped it
])
def test_a_regex_class_with_control_characters_and_the_dot_hold_as_written(llm, regex, good, bad):
    """Found by a hunt against a JavaScript engine: xgrammar writes a class's control character as
    \\xHH and reads on into a next member's hex digit, and its dot took newlines."""
    llm.generate("a", SamplingParams(max_tokens=1, structured_outputs={"regex": regex}), use_tqdm=False)
    assert all(_accepts(llm, {"regex": regex}, text) for text in good)
    assert not any(_accepts(llm, {"regex": regex}, text) for text in bad)


@pytest.mark.parametrize("schema", [{"type": "array", "maxItems": 3}, {"type": "array", "uniqueItems": False},
                                    {"type": ["array", "null"], "minItems": 1},
                                    {"type": "array", "prefixItems": [{"type": "integer"}]}])
def test_an_array_without_items_takes_any_items(llm, schema):
    """Found by a hunt: xgrammar reads a missing items beside minItems, maxItems, uniqueItems or
    prefixItems as false: only [] came out (and minItems 1 was refused); JSON Schema's default is
    any items."""
    llm.generate("a", SamplingParams(max_tokens=1, structured_outputs={"json": schema}), use_tqdm=False)
    assert _accepts(llm, {"json": schema}, "[1, \"a\"]")
    jsonschema.validate([1, "a"], schema)


def test_pydantic_style_annotations_beside_enum_anyof_and_ref_are_kept(llm):
    """Annotations (title, description, default) beside enum, anyOf and $ref, and a type every enum
    value has, are not what xgrammar drops: such schemas (pydantic's) still compile."""
    schema = {
        "$defs": {"Color": {"enum": ["red", "green"], "title": "Color", "type": "string"},
                  "Size": {"type": "object", "properties": {"cm": {"type": "integer"}}, "required": ["cm"]}},
        "type": "object", "title": "Item",
        "properties": {"color": {"$ref": "#/$defs/Color", "description": "its colour"},
                       "shade": {"allOf": [{"$ref": "#/$defs/Color"}], "default": "red"},
                       "size": {"anyOf": [{"$ref": "#/$defs/Size"}, {"type": "null"}], "default": None, "title": "Size"},
                       "count": {"enum": [1, 2.0], "type": "integer"},
                       "code": {"enum": ["ab", "cd"], "minLength": 1, "type": "string"},  # Literal with min_length
                       "short": {"$ref": "#/$defs/Color", "maxLength": 5},
                       "blob": {"type": "string", "format": "binary"}, "secret": {"type": "string", "format": "password"},
                       "word": {"type": "string", "pattern": "(?i)^[a-z]+$"}},
        "required": ["color", "size", "count"],
    }
    out = llm.generate("a", SamplingParams(max_tokens=1, structured_outputs={"json": schema}), use_tqdm=False)
    assert out[0].outputs[0].finish_reason is not None


@pytest.mark.parametrize("regex", [r"[a-c]{2,4}x(yz)?", r"\d+\s\w[\b]\u0042\.", r"^abc$", r"a|^b", r"(?:a)b",
                                   r"a{2,}", r"[a-]", r"(^a|^b)c$", r"^(a|b$)", r"(?P<x>a)", r"a*?b",
                                   r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", r"\(\d{3}\) \d{3}-\d{4}"])
def test_regexes_xgrammar_enforces_as_written_pass_unchanged(regex):
    assert xgrammar_regex.check(regex) == regex


@pytest.mark.parametrize("kind", ["integer", ["integer", "null"], ["null", "integer", "string"]])
def test_openapi_integer_formats_are_their_bounds(llm, kind):
    """Also for OpenAPI 3.1's nullable integers (refused before), where the bounds bind the integers alone."""
    constraint = {"json": {"type": kind, "format": "int32"}}
    llm.generate("a", SamplingParams(max_tokens=1, structured_outputs=constraint), use_tqdm=False)
    assert _accepts(llm, constraint, str(2**31 - 1)) and not _accepts(llm, constraint, str(2**31))
    assert _accepts(llm, constraint, "null") == (kind != "integer")


def test_an_integer_format_beside_other_numbers_is_refused(llm):
    params = SamplingParams(max_tokens=1, structured_outputs={"json": {"type": ["integer", "number"], "format": "int64"}})
    with pytest.raises(ValueError, match="format 'int64'"):
        llm.generate("a", params, use_tqdm=False)


@pytest.mark.parametrize("regex, written", [
    (r"\x41b", r"\u0041b"),  # xgrammar read \x greedily: \x41b was U+41B
    (r"[\^-a]", r"(?:[\u005f-\u0061]|\^)"),  # a class that begins with a caret is negated to xgrammar, escaped or not
    (r"[\x41b]", r"[\u0041b]"),
    (r"[\^!-]", r"[!\^\-]"),
    (r"\u{1F600}", "\U0001F600"),
])
def test_regexes_are_written_as_xgrammar_reads_them(regex, written):
    assert xgrammar_regex.check(regex) == written


def test_a_backward_range_is_refused_in_a_regex_and_in_a_json_pattern(llm):
    """Found by a job-runner hunt: xgrammar refuses [z-a] as a regex, but a JSON pattern's rewrite
    made it an empty class, and "xy" completed the schema with "stop" against its pattern."""
    for constraint in ({"regex": "x[z-a]y"}, {"json": {"type": "string", "pattern": "x[z-a]y"}}):
        with pytest.raises(ValueError, match="range z-a goes backwards"):
            llm.generate("a", SamplingParams(max_tokens=1, structured_outputs=constraint), use_tqdm=False)
    assert xgrammar_regex.check("[a-a]", json_string=True) == "[\\u0061]"


@pytest.mark.parametrize("pattern", [".\n", '[^a]"', "\\S\\\\"])
def test_a_json_pattern_s_open_classes_write_nothing_json_escapes(llm, pattern):
    """Found by a second hunt: beside a rewritten character (which makes xgrammar compile the pattern
    to grammar rules), "." or [^a] wrote a raw newline or quote into the string."""
    constraint = {"json": {"type": "string", "pattern": pattern}}
    llm.generate("a", SamplingParams(max_tokens=1, structured_outputs=constraint), use_tqdm=False)
    assert not any(_accepts(llm, constraint, '"' + c + tail + '"') for c in '\n"\\' for tail in ('\\n', '\\"', '\\\\'))


@pytest.mark.parametrize("schema, good, raw", [
    ({"type": "array", "items": {"type": "string", "maxLength": 1}}, '["a"]', '["\t"]'),  # inline in xgrammar's grammar
    ({"type": "string", "maxLength": 400}, '"ab"', '"a\tb"'),
    ({"type": ["string", "null"], "minLength": 2}, '"ab"', '"a\tb"'),
])
def test_bounded_strings_take_no_raw_control_character(llm, schema, good, raw):
    """xgrammar's own bounded strings let raw control characters through (no JSON); their class is
    corrected in its grammar (a pattern of the same lengths took 15 ms a mask fill at 400)."""
    constraint = {"json": schema}
    llm.generate("a", SamplingParams(max_tokens=1, structured_outputs=constraint), use_tqdm=False)
    assert not _accepts(llm, constraint, raw)
    assert _accepts(llm, constraint, good)


def test_a_grammar_that_compiles_between_two_looks_loses_no_request(llm, monkeypatch):
    """Found by a soak hunt: the iteration read each grammar's done() twice, to keep the compiled
    ones and to drop them from the waiting ones; one that finished in between was in neither list
    and its prompt never ran (no output, no error)."""
    manager = llm.llm_engine.structured_outputs
    compile_async = manager.compile_async

    class LateFuture(Future):
        """Compiled, but says so only from its third done() on."""

        def __init__(self, compiled: Future) -> None:
            super().__init__()
            self.looks = 0
            self.set_result(compiled.result())

        def done(self) -> bool:
            self.looks += 1
            return self.looks > 2

    monkeypatch.setattr(manager, "compile_async", lambda params: LateFuture(compile_async(params)))
    params = SamplingParams(temperature=0, max_tokens=2, structured_outputs={"regex": "[a-c]{1,3}"})
    got = sorted(i for i, _ in llm.generate_as_completed([f"p{i}" for i in range(6)], params, use_tqdm=False))
    assert got == list(range(6))


def test_the_compiled_grammar_cache_keeps_to_its_bounds(llama_dir, monkeypatch):
    """Found by a soak hunt: every distinct constraint stayed compiled for good (a job whose rows
    each had a schema grew ~250 KB a row with SmolLM2's vocabulary)."""
    from pagedlm.engine import structured_outputs

    monkeypatch.setattr(structured_outputs, "CACHE_ENTRIES", 5)
    manager = structured_outputs.StructuredOutputManager(AutoTokenizer.from_pretrained(llama_dir), VOCAB_SIZE, [EOS])

    def constraint(i):
        return SO(regex=f"a{{{i}}}")

    first = manager.compile(constraint(1))
    for i in range(2, 20):
        manager.compile(constraint(i))
        manager.compile(constraint(1))  # used again: the least recently used go first
    assert len(manager._compiled) == 5 and manager.compile(constraint(1)) is first
    assert manager.compile(constraint(2)) is not None  # dropped, compiled again
    monkeypatch.setattr(structured_outputs, "CACHE_BYTES", 0)
    manager.compile(constraint(30))
    assert list(manager._compiled) == [constraint(30).key]  # past 0 bytes, all but the newest
    held = manager.compile_async(constraint(31))  # as a request waiting to join holds its grammar
    held.result()
    manager.compile(constraint(32))
    assert constraint(31).key not in manager._compiled and manager.compile_async(constraint(31)) is held
    manager.close()


def test_generate_compiles_each_grammar_once_within_the_cache_bound(llama_dir, monkeypatch):
    """generate compiles every prompt's grammar while checking them, then adds them through a
    window: within the cache's bound none compiles again as its request joins."""
    from pagedlm.engine import structured_outputs

    monkeypatch.setattr(structured_outputs, "CACHE_ENTRIES", 10)
    compiled = []
    compile_ = structured_outputs.StructuredOutputManager._compile
    monkeypatch.setattr(structured_outputs.StructuredOutputManager, "_compile",
                        lambda self, params: compiled.append(params.regex) or compile_(self, params))
    llm = LLM(llama_dir, dtype="float32", max_model_len=64, max_num_seqs=2)
    params = [SamplingParams(max_tokens=3, temperature=0, structured_outputs={"regex": f"a{{{i}}}"}) for i in range(1, 9)]
    outs = llm.generate(["hi"] * 8, params, use_tqdm=False)
    assert [o.outputs[0].text for o in outs] == ["a" * min(i, 3) for i in range(1, 9)]
    assert sorted(compiled) == sorted(f"a{{{i}}}" for i in range(1, 9))


def test_generate_holds_the_windows_grammars_not_every_prompts(llama_dir, monkeypatch):
    """Each request waiting to join held its compiled grammar from the check on, so a generate of
    100k distinct schemas held 100k grammars (80 KB each with SmolLM2's vocabulary: ~8 GB) whatever
    the cache's bound. Past the bound, a grammar is compiled again as its request joins."""
    from pagedlm.engine import structured_outputs

    monkeypatch.setattr(structured_outputs, "CACHE_ENTRIES", 3)
    llm = LLM(llama_dir, dtype="float32", max_model_len=64, max_num_seqs=2)  # a window of 4 requests
    manager, step = llm.llm_engine.structured_outputs, llm.llm_engine.step
    alive = []  # compiled grammars held anywhere (the cache, a request), at each step
    monkeypatch.setattr(llm.llm_engine, "step", lambda: alive.append(len(manager._alive)) or step())
    params = [SamplingParams(max_tokens=3, temperature=0, structured_outputs={"regex": f"a{{{i}}}"}) for i in range(1, 21)]
    outs = llm.generate(["hi"] * 20, params, use_tqdm=False)
    assert [o.outputs[0].text for o in outs] == ["a" * min(i, 3) for i in range(1, 21)]
    assert alive and max(alive) <= 4 + 3, alive
