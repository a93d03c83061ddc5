"""Requests of every shape under KV caches far too small for them: each either runs to the outputs
a roomy cache gives, preempted and recomputed as often as needed, or is refused up front with a
``ValueError``; never a failure mid-run, never a leaked block."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BOS
from pagedlm import LLM, SamplingParams

MAX_MODEL_LEN = 128
_llms: dict[tuple, LLM] = {}


def _llm(model_dir: str, **kwargs) -> LLM:
    key = tuple(sorted(kwargs.items()))
    if key not in _llms:
        _llms[key] = LLM(model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, **kwargs)
    return _llms[key]


def _params(kind: str, n: int, extra: int, max_tokens: int, seed: int) -> SamplingParams:
    if kind == "greedy":
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    if kind == "beam":
        return SamplingParams(n=n, best_of=n + extra, use_beam_search=True, temperature=0, max_tokens=max_tokens,
                              ignore_eos=True)
    return SamplingParams(n=n, best_of=n + extra, temperature=0.9, seed=seed, max_tokens=max_tokens, ignore_eos=True)


_request = st.tuples(
    st.sampled_from(["greedy", "sample", "beam"]),
    st.integers(1, 3),  # n
    st.integers(0, 1),  # best_of - n
    st.integers(1, 40),  # prompt length
    st.integers(1, 24),  # max_tokens
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(_request, min_size=1, max_size=4),
    block_size=st.sampled_from([8, 16, 32]),
    num_kv_blocks=st.integers(1, 16),
    enable_prefix_caching=st.booleans(),
    max_num_batched_tokens=st.sampled_from([16, 48, 2048]),
    pattern=st.sampled_from(["distinct", "shared prefix", "one token repeated"]),
)
def test_tight_cache_gives_the_roomy_outputs_or_refuses_up_front(
    llama_dir, requests, block_size, num_kv_blocks, enable_prefix_caching, max_num_batched_tokens, pattern
):
    def token(i: int, j: int) -> int:
        if pattern == "one token repeated":
            return i + 3
        return (3 * j + (0 if pattern == "shared prefix" else 7 * i)) % 300 + 3

    prompts, params = [], []
    for i, (kind, n, extra, prompt_len, max_tokens) in enumerate(requests):
        if kind == "beam":
            n = max(n, 2) - extra  # a beam width of at least 2
        prompts.append({"prompt_token_ids": [BOS] + [token(i, j) for j in range(prompt_len - 1)]})
        params.append(_params(kind, n, extra, max_tokens, seed=i))
    tight = _llm(llama_dir, block_size=block_size, num_kv_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching,
                 max_num_seqs=16, max_num_batched_tokens=max_num_batched_tokens)
    engine = tight.llm_engine
    fits = [engine.check_request(p["prompt_token_ids"], sp) is None for p, sp in zip(prompts, params)]
    if not all(fits):
        with pytest.raises(ValueError, match="prompts are invalid; nothing was run"):
            tight.generate(prompts, params, use_tqdm=False)
    prompts = [p for p, ok in zip(prompts, fits) if ok]
    params = [sp for sp, ok in zip(params, fits) if ok]
    got = tight.generate(prompts, params, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_kv_blocks
    roomy = _llm(llama_dir, block_size=block_size)
    expected = roomy.generate(prompts, params, use_tqdm=False)
    for ours, ref in zip(got, expected):
        assert [(c.token_ids, c.finish_reason) for c in ours.outputs] == [(c.token_ids, c.finish_reason) for c in ref.outputs]


def test_a_forked_request_is_preempted_and_recomputed_with_its_prompt_shared(llama_dir):
    """Two prompts of 40 ids, two completions each: one request fits the 12 blocks of 8 (5 shared
    prompt blocks + 2 × 3 own), two at once do not, so one is preempted after forking."""
    prompts = [{"prompt_token_ids": [BOS] + list(range(5, 44))}, {"prompt_token_ids": [BOS] + list(range(50, 89))}]
    params = SamplingParams(n=2, temperature=0.9, seed=1, max_tokens=20, ignore_eos=True)
    tight = LLM(llama_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=12, block_size=8)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert tight.get_stats()["num_preemptions"] > 0
    roomy = _llm(llama_dir, block_size=8)
    expected = roomy.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in expected]
    assert all(len(c.token_ids) == 20 for o in got for c in o.outputs)


def test_what_can_never_fit_is_refused_and_an_open_length_stops_at_the_cache(llama_dir):
    forked = LLM(llama_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=14, block_size=8)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        forked.generate({"prompt_token_ids": [BOS] + list(range(5, 45))},
                        SamplingParams(n=2, temperature=0.9, max_tokens=40), use_tqdm=False)
    one_block = LLM(llama_dir, dtype="float32", max_model_len=64, block_size=8, num_kv_blocks=1)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        one_block.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                           use_tqdm=False)
    # Without max_tokens the completion runs to what the one block holds and ends with "length".
    out = one_block.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 - 3 and out.finish_reason == "length"


def test_forked_completions_recompute_their_shared_prompt_with_chunked_prefill(llama_dir):
    """Found by review: a re-admitted group's first sequence filled the prompt block it shares with
    its waiting siblings through a copy-on-write, so the siblings attended over a block never
    written (their logprobs disagreed with transformers from the second token on)."""
    prompts = [{"prompt_token_ids": [BOS] + [7] * 8}, {"prompt_token_ids": [BOS] + [8] * 32}]
    params = [SamplingParams(n=2, temperature=0.9, seed=1, max_tokens=20, ignore_eos=True),
              SamplingParams(n=2, temperature=0.9, seed=2, max_tokens=20, ignore_eos=True)]
    kwargs = dict(block_size=32, max_num_seqs=16, enable_prefix_caching=False)
    tight = LLM(llama_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=4, max_num_batched_tokens=16, **kwargs)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert tight.get_stats()["num_preemptions"] > 0
    expected = _llm(llama_dir, **kwargs).generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in expected]
