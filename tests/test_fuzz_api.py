"""The public API's contract under random inputs: every call either runs with sane outputs or raises
``ValueError``/``TypeError`` naming the field or the prompt index, before any model step; either way
nothing stays queued, every block is free, and the next call equals a fresh ``LLM``'s."""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import BOS, VOCAB_SIZE
from pagedlm import LLM, SamplingParams

_values = st.one_of(  # mostly plausible values, so that many calls run; the rest probe the edges
    st.integers(0, 6), st.integers(0, 6), st.floats(0, 1.5), st.floats(0, 1.5), st.booleans(), st.none(),
    st.integers(-3, 40), st.floats(-3, 3), st.sampled_from([float("nan"), float("inf")]),
    st.sampled_from([2**63, 2**64, 1e39, 1e-46, "x", [], [1], [VOCAB_SIZE], np.float64(0.5), np.int64(3), np.True_]),
)
_fields = st.sampled_from([
    "n", "best_of", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "logprobs",
    "prompt_logprobs", "skip_special_tokens", "use_beam_search", "length_penalty", "early_stopping",
    "include_stop_str_in_output", "detokenize",
])
_prompts = st.one_of(
    st.text(max_size=12),
    st.lists(st.integers(-2, VOCAB_SIZE + 2), max_size=6).map(lambda ids: {"prompt_token_ids": ids}),
    st.sampled_from([None, 5, {"prompt": 3}, {"bogus": 1}, "ab\ud800cd", {"prompt": "hi"}]),
)


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(llama_dir, dtype="float32", max_model_len=64, num_kv_blocks=12, block_size=8)


@pytest.fixture(scope="module")
def fresh_probe(llama_dir) -> list[list[int]]:
    return _probe(LLM(llama_dir, dtype="float32", max_model_len=64, num_kv_blocks=12, block_size=8))


def _probe(llm: LLM) -> list[list[int]]:
    prompts = [{"prompt_token_ids": [BOS, 5, 6, 7]}, {"prompt_token_ids": [BOS] + list(range(20, 40))}]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kwargs=st.dictionaries(_fields, _values, max_size=3), prompts=st.lists(_prompts, min_size=1, max_size=3))
def test_random_inputs_run_or_fail_up_front_and_leave_the_engine_clean(llm, fresh_probe, kwargs, prompts):
    steps = []
    engine = llm.llm_engine
    real_step = engine.step
    engine.step = lambda: steps.append(1) or real_step()
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        assert any(name in str(exc) for name in kwargs), str(exc)
        event("SamplingParams refused")
        params = None
    if params is not None:
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        except (ValueError, TypeError) as exc:
            assert not steps, "failed after a model step"
            assert "prompt" in str(exc), str(exc)
            event("generate refused up front")
        else:
            event("ran")
            one_token_prompt = all(isinstance(p, int) and not isinstance(p, bool) for p in prompts)  # vLLM's rule
            assert len(outs) == (1 if one_token_prompt else len(prompts))
            for out in outs:
                assert 1 <= len(out.outputs) <= params.n
                for comp in out.outputs:
                    assert all(0 <= t < VOCAB_SIZE for t in comp.token_ids)
                    assert comp.finish_reason in ("stop", "length")
    engine.step = real_step
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_kv_blocks
    assert _probe(llm) == fresh_probe


_llm_args = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["auto", "float32", "bfloat16", "int8", 3, None]),
    "device": st.sampled_from(["auto", "cpu", "cuda:x", "tpu", 0]),
    "max_model_len": st.one_of(st.integers(-1, 2000), st.sampled_from([True, 1.5, None])),
    "block_size": st.sampled_from([8, 16, 32, 12, True, "16"]),
    "num_kv_blocks": st.one_of(st.integers(-1, 64), st.sampled_from([True, 2.0, None])),
    "max_num_seqs": st.one_of(st.integers(-1, 300), st.sampled_from([True, 1.5])),
    "max_num_batched_tokens": st.one_of(st.integers(-1, 4096), st.sampled_from([False, 2.5])),
    "enable_chunked_prefill": st.sampled_from([True, False, 1, "no"]),
    "enable_prefix_caching": st.sampled_from([True, False, 0, None]),
    "generation_config": st.sampled_from(["auto", "vllm", "/nonexistent", 5]),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kwargs=_llm_args)
def test_random_llm_arguments_are_accepted_or_named(llama_dir, kwargs):
    try:
        llm = LLM(llama_dir, **kwargs)
    except ValueError as exc:
        assert any(name in str(exc) for name in kwargs), str(exc)
        event("LLM refused")
        return
    with llm:
        try:
            outs = llm.generate({"prompt_token_ids": [BOS, 5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        except ValueError as exc:
            assert "prompt 0" in str(exc), str(exc)
            event("probe refused")
        else:
            event("ran")
            assert 1 <= len(outs[0].outputs[0].token_ids) <= 4
        assert llm.get_stats()["num_free_kv_blocks"] == llm.get_stats()["num_kv_blocks"]
