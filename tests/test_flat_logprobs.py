"""``SamplingParams.flat_logprobs``: logprobs as vLLM's ``FlatLogprobs``, reading as the list of dicts."""

import dataclasses

import pytest

from conftest import BOS
from pagedlm import LLM, SamplingParams
from pagedlm.logprobs import FlatLogprobs, Logprob
from pagedlm.sampling_params import RequestOutputKind

PROMPTS = [{"prompt_token_ids": [BOS, 11, 12, 13, 14, 15]}, {"prompt_token_ids": [BOS, 40, 41]}]


def test_flat_logprobs_read_as_a_list_of_dicts():
    positions = [None, {5: Logprob(-0.5, 1, "a"), 7: Logprob(-1.5, 2, "b")}, {}, {9: Logprob(-0.1, 1, None)}]
    flat = FlatLogprobs.of(positions)
    expected = [p or {} for p in positions]
    assert len(flat) == 4 and list(flat) == expected
    assert flat[1] == expected[1] and flat[-1] == expected[-1]
    for s in (slice(1, None), slice(2, 3), slice(None, -1), slice(3, 1), slice(None, None, 2), slice(None, None, -1)):
        assert isinstance(flat[s], FlatLogprobs) and list(flat[s]) == expected[s]
    assert flat[1:].start_indices == [0, 2, 2] and flat[1:].token_ids == [5, 7, 9]
    with pytest.raises(IndexError):
        flat[4]
    for change in (lambda: flat.__setitem__(0, {}), lambda: flat.__delitem__(0), lambda: flat.insert(0, {})):
        with pytest.raises(TypeError):  # vLLM's: positions are only appended
            change()


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(llama_dir, dtype="float32", max_model_len=128)


@pytest.mark.parametrize("params", [
    SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6, logprobs=3, prompt_logprobs=2),
    SamplingParams(n=2, best_of=3, temperature=0.8, seed=3, max_tokens=6, logprobs=0),
    SamplingParams(best_of=2, use_beam_search=True, temperature=0, max_tokens=6, logprobs=2),
    SamplingParams(temperature=0, max_tokens=6, logprob_token_ids=[20, 21]),
], ids=["n", "best_of", "beams", "token_ids"])
def test_flat_logprobs_hold_what_the_lists_hold(llm, params):
    lists = llm.generate(PROMPTS, params, use_tqdm=False)
    flats = llm.generate(PROMPTS, dataclasses.replace(params, flat_logprobs=True), use_tqdm=False)
    for a, b in zip(lists, flats):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        for ca, cb in zip(a.outputs, b.outputs):
            assert isinstance(cb.logprobs, FlatLogprobs) and list(cb.logprobs) == ca.logprobs
            assert len(cb.logprobs) == len(cb.token_ids)
        if params.prompt_logprobs is not None:
            assert isinstance(b.prompt_logprobs, FlatLogprobs)
            assert list(b.prompt_logprobs) == [{}] + a.prompt_logprobs[1:]  # vLLM's flat first position: {}


def test_flat_delta_outputs_add_up_to_the_final_output(llm):
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, prompt_logprobs=1, flat_logprobs=True)
    engine = llm.llm_engine
    engine.add_request("delta", PROMPTS[0]["prompt_token_ids"], dataclasses.replace(params, output_kind=RequestOutputKind.DELTA))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    final = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    assert all(isinstance(o.outputs[0].logprobs, FlatLogprobs) for o in deltas)
    assert [p for o in deltas for p in o.outputs[0].logprobs] == list(final.outputs[0].logprobs)
    assert [p for o in deltas for p in o.prompt_logprobs] == list(final.prompt_logprobs)


def test_flat_logprobs_must_be_a_bool():
    with pytest.raises(ValueError, match="flat_logprobs"):
        SamplingParams(flat_logprobs="yes")
