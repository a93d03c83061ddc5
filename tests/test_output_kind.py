"""``SamplingParams.output_kind``: what ``LLMEngine.step`` returns while a request runs (vLLM's
``RequestOutputKind``), and ``LLM`` running every request as ``FINAL_ONLY``."""

import dataclasses

import pytest

from conftest import BOS
from pagedlm import LLM, SamplingParams
from pagedlm.sampling_params import RequestOutputKind

CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY
PROMPT = [BOS, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]


def fields(output) -> dict:
    """A RequestOutput's fields but its array (RequestOutput, as vLLM's, is equal only to itself)."""
    return {k: v for k, v in vars(output).items() if k != "prompt_token_id_logprobs"}


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    # Chunks of 8 tokens: the prompt's logprobs come over two steps.
    return LLM(llama_dir, dtype="float32", max_model_len=256, max_num_batched_tokens=8, max_num_seqs=8,
               enable_chunked_prefill=True)


def run(llm: LLM, params: SamplingParams) -> list:
    """Every output the engine returns for one request, step by step."""
    engine = llm.llm_engine
    engine.add_request("r", PROMPT, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return outputs


def spanning_stop(llm: LLM, params: SamplingParams) -> str:
    """A stop string whose first half is the end of one generated token's text and whose second half
    begins the next token's, so the first half is in the text a step before the stop is seen."""
    out = run(llm, dataclasses.replace(params, max_tokens=40))[-1].outputs[0]
    tok = llm.get_tokenizer()
    texts = [tok.decode(PROMPT + out.token_ids[: i + 1], skip_special_tokens=True) for i in range(len(out.token_ids))]
    prompt_len = len(tok.decode(PROMPT, skip_special_tokens=True))
    for i in range(4, len(texts) - 1):
        end = len(texts[i]) - prompt_len
        stop = out.text[end - 2 : end + 2]
        if len(stop) == 4 and len(texts[i]) - len(texts[i - 1]) >= 2 and out.text.find(stop) == end - 2:
            return stop
    pytest.skip("no stop string spans two tokens in this completion")


@pytest.mark.parametrize("n", [1, 2])
def test_delta_outputs_add_up_to_the_final_output(llm, n):
    base = SamplingParams(n=n, temperature=0.8, seed=7, max_tokens=30, logprobs=2, prompt_logprobs=1)
    stop = spanning_stop(llm, base)
    params = dataclasses.replace(base, stop=[stop])
    cumulative = run(llm, params)
    deltas = run(llm, dataclasses.replace(params, output_kind=DELTA))
    final = run(llm, dataclasses.replace(params, output_kind=FINAL_ONLY))

    assert len(final) == 1 and final[0].finished
    assert fields(final[0]) == fields(cumulative[-1]) and cumulative[-1].finished and not any(o.finished for o in cumulative[:-1])
    assert len(deltas) == len(cumulative) and deltas[-1].finished
    assert sum((o.prompt_logprobs for o in deltas), []) == final[0].prompt_logprobs
    assert any(not o.prompt_logprobs for o in deltas)  # returned once, not again
    assert final[0].outputs[0].stop_reason == stop
    for done in final[0].outputs:
        parts = [c for o in deltas for c in o.outputs if c.index == done.index]
        assert stop not in done.text
        assert "".join(c.text for c in parts) == done.text
        assert sum((c.token_ids for c in parts), []) == done.token_ids
        assert sum((c.logprobs for c in parts), []) == done.logprobs
        assert parts[-1].cumulative_logprob == done.cumulative_logprob
        # A finish is returned once (vLLM's), not again in the steps the other completion takes.
        assert [c.finish_reason for c in parts] == [None] * (len(parts) - 1) + [done.finish_reason]
        # The stop string's first half is held back until the stop is found, so no output shows
        # text that is cut afterwards.
        assert all(done.text.startswith(c.text) for o in cumulative for c in o.outputs if c.index == done.index)


def test_final_only_returns_nothing_before_the_request_finishes(llm):
    engine = llm.llm_engine
    engine.add_request("a", PROMPT, SamplingParams(temperature=0, ignore_eos=True, max_tokens=3, output_kind=FINAL_ONLY))
    engine.add_request("b", PROMPT, SamplingParams(temperature=0, ignore_eos=True, max_tokens=6))
    steps = []
    while engine.has_unfinished_requests():
        steps.append({o.request_id: o for o in engine.step()})
    a = [step["a"] for step in steps if "a" in step]
    assert len(a) == 1 and a[0].finished and len(a[0].outputs[0].token_ids) == 3
    assert sum("b" in step for step in steps) >= 6  # a CUMULATIVE request is returned every step it runs


def test_llm_runs_requests_as_final_only_without_changing_the_callers_params(llm):
    params = SamplingParams(temperature=0, max_tokens=8, output_kind=DELTA, stop=["zz"])
    engine_params = []
    add_request = llm.llm_engine.add_request
    llm.llm_engine.add_request = lambda *args: engine_params.append(args[2]) or add_request(*args)
    try:
        outs = llm.generate([{"prompt_token_ids": PROMPT}] * 3 + ["hello"], params, use_tqdm=False)
        llm.generate(["hello"], use_tqdm=False)  # the model's defaults
    finally:
        del llm.llm_engine.add_request
    assert params.output_kind is DELTA
    assert all(p.output_kind is FINAL_ONLY for p in engine_params) and len(engine_params) == 5
    assert len({id(p) for p in engine_params[:4]}) == 1  # one copy for the prompts that share params
    expected = run(llm, dataclasses.replace(params, output_kind=CUMULATIVE))[-1]
    assert all(o.outputs == expected.outputs for o in outs[:3])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(output_kind="delta"), r"output_kind must be one of RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, "
                                    r"RequestOutputKind.FINAL_ONLY, got 'delta'"),
        (dict(output_kind=1), "output_kind must be one of"),
        (dict(output_kind=DELTA, n=2, best_of=3), "output_kind=DELTA needs best_of == n"),
        (dict(output_kind=DELTA, use_beam_search=True, best_of=2, temperature=0), "not supported with use_beam_search"),
    ],
)
def test_bad_output_kind(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_output_text_buffer_length():
    assert SamplingParams().output_text_buffer_length == 0
    assert SamplingParams(stop=["ab", "wxyz"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["wxyz"], include_stop_str_in_output=True).output_text_buffer_length == 0


def test_a_snapshot_is_the_callers_to_change(llm):
    """An output's lists are copies: a caller that edits one edits neither the engine's request nor
    the outputs after it."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=6, output_kind=CUMULATIVE)
    expected = run(llm, params)[-1].outputs[0].token_ids
    engine.add_request("r", PROMPT, params)
    last = None
    while engine.has_unfinished_requests():
        for last in engine.step():
            if not last.finished:
                last.prompt_token_ids[:] = [0] * len(PROMPT)
                last.outputs[0].token_ids[:] = [0] * len(last.outputs[0].token_ids)
    assert last.prompt_token_ids == PROMPT and last.outputs[0].token_ids == expected


@pytest.mark.parametrize("kind", [DELTA, CUMULATIVE])
def test_stream_interval_returns_the_first_output_then_one_every_k_tokens(llama_dir, kind):
    """vLLM's ``stream_interval``: a running request's output comes at its first token, then once
    ``k`` more tokens came, and at its end; ``DELTA`` outputs still add up to the completion (prompt
    logprobs and ``prompt_token_id_logprobs`` returned once). The LLM's interval is the least a
    request gets; a request's own may raise it. A completion that finishes is returned then."""
    base = SamplingParams(temperature=0, max_tokens=11, ignore_eos=True, output_kind=kind, prompt_logprobs=0,
                          prompt_logprob_token_ids=[[5, 6]] * (len(PROMPT) - 1))
    final = run(LLM(llama_dir, dtype="float32", max_model_len=256), base.clone(output_kind=CUMULATIVE))[-1]
    for llm_interval, request_interval, lengths in [(1, 3, [1, 4, 7, 10, 11]), (4, None, [1, 5, 9, 11]),
                                                    (4, 2, [1, 5, 9, 11]), (1, 1, list(range(1, 12)))]:
        llm = LLM(llama_dir, dtype="float32", max_model_len=256, stream_interval=llm_interval)
        outs = run(llm, base.clone(stream_interval=request_interval))
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        if kind is DELTA:
            assert [len(o.outputs[0].token_ids) for o in outs] == [b - a for a, b in zip([0] + lengths, lengths)]
            assert sum((o.outputs[0].token_ids for o in outs), []) == final.outputs[0].token_ids
            assert sum((o.prompt_logprobs for o in outs), []) == final.prompt_logprobs
            assert [o.prompt_token_id_logprobs is not None for o in outs] == [True] + [False] * (len(outs) - 1)
        else:
            assert [len(o.outputs[0].token_ids) for o in outs] == lengths
            assert fields(outs[-1]) == fields(final) and (outs[-1].prompt_token_id_logprobs == final.prompt_token_id_logprobs).all()
    llm = LLM(llama_dir, dtype="float32", max_model_len=256)
    sampled = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=12, output_kind=kind, stream_interval=5)
    first, second = (c.token_ids for c in run(llm, sampled.clone(output_kind=CUMULATIVE))[-1].outputs)
    stop = first[2]  # ends the first completion at its 3rd token, mid-interval; the second runs on
    assert stop not in first[:2] + second
    outs = run(llm, sampled.clone(stop_token_ids=[stop]))
    lengths = [1, 3, 8, 12]
    assert [len(c.token_ids) for o in outs for c in o.outputs if c.index == 1] == (
        [1, 2, 5, 4] if kind is DELTA else lengths)
    assert [o.outputs[0].finish_reason for o in outs][1] == "stop"
    with pytest.raises(ValueError, match="stream_interval must be None or at least 1, got 0"):
        SamplingParams(stream_interval=0)
    with pytest.raises(ValueError, match="stream_interval must be a positive int, got 0"):
        LLM(llama_dir, stream_interval=0)


def test_request_output_add_merges_delta_outputs_as_vllms_does(llm):
    """vLLM's ``RequestOutput.add``: DELTA outputs aggregated into the first give the final output's
    completions; without ``aggregate`` a completion is replaced by the later one. vLLM's output
    fields pagedlm has no use for are there, None."""
    params = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=12, logprobs=1)
    final = run(llm, params.clone(output_kind=FINAL_ONLY))[0]
    deltas = run(llm, params.clone(output_kind=DELTA))
    merged = deltas[0]
    for later in deltas[1:]:
        merged.add(later, aggregate=True)
    assert merged.finished and sorted(merged.outputs, key=lambda c: c.index) == final.outputs
    last = run(llm, params.clone(output_kind=DELTA))
    replaced = last[0]
    for later in last[1:]:
        replaced.add(later, aggregate=False)
    assert all(c.finished() for c in replaced.outputs) and len(replaced.outputs) == 2
    assert (final.kv_transfer_params, final.ec_transfer_params, final.outputs[0].routed_experts,
            final.outputs[0].sampling_mask, final.outputs[0].spec_decode_metrics, final.outputs[0].weight_versions) == (None,) * 6
