"""Automatic prefix caching and chunked prefill: same tokens with them on or off, the hit rate the
prompts imply, eviction under a small cache, prompts longer than the step budget."""

import dataclasses
import random

import pytest

from conftest import BOS, VOCAB_SIZE, hf_greedy
from pagedlm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]


def _shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    # Shared prefixes shorter than a block, exactly k blocks, k blocks plus a few, and whole prompts.
    for prefix_len in (5, 16, 48, 50, 77):
        prefix = [BOS] + _random_tokens(rng, prefix_len - 1)
        prompts += [prefix + _random_tokens(rng, rng.randrange(1, 40)) for _ in range(3)]
        prompts.append(list(prefix))
    return prompts


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("prefix_caching,chunked", [(True, True), (True, False), (False, True)])
def test_outputs_identical_with_caching_and_chunking(llama_dir, prefix_caching, chunked):
    prompts = _shared_prefix_prompts()
    baseline = _run(LLM(llama_dir, dtype="float32", enable_prefix_caching=False, enable_chunked_prefill=False), prompts)
    llm = LLM(llama_dir, dtype="float32", enable_prefix_caching=prefix_caching, enable_chunked_prefill=chunked,
              max_num_seqs=8, max_num_batched_tokens=256 if not chunked else 40, max_model_len=256)
    assert _run(llm, prompts) == baseline
    # A second call hits blocks cached by the first.
    assert _run(llm, prompts[::-1]) == baseline[::-1]
    stats = llm.get_stats()
    assert (stats["prefix_cache_hit_tokens"] > 0) == prefix_caching
    assert (stats["prefix_cache_queried_tokens"] > 0) == prefix_caching  # a hunt: counted with caching off
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


def test_outputs_match_hf_with_prefix_hits(llama_dir):
    prompts = _shared_prefix_prompts(1)[:8]
    llm = LLM(llama_dir, dtype="float32")
    _run(llm, prompts)  # warm the cache
    expected = hf_greedy(llama_dir, prompts, 12)
    got = _run(llm, prompts, SamplingParams(temperature=0, max_tokens=12))
    assert got == expected


@pytest.mark.parametrize("arch", ["gemma3", "mistral_swa"])
def test_prefix_hits_under_sliding_windows_match_hf(tmp_path, tokenizer_dir, arch):
    """A hit's cached blocks (whole and partial) feed layers whose window (gemma3's 8 tokens on
    alternate layers, mistral_swa's 48 on all) ends inside the cached prefix; a hunt found no hit
    tested there."""
    from conftest import make_checkpoint

    path = make_checkpoint(str(tmp_path / arch), arch, tokenizer_dir)
    rng = random.Random(2)
    prefix = [BOS] + _random_tokens(rng, 52)
    prompts = [prefix + _random_tokens(rng, k) for k in (1, 7, 20)]
    llm = LLM(path, dtype="float32")
    _run(llm, [prefix])
    got = _run(llm, prompts, SamplingParams(temperature=0, max_tokens=12))
    assert llm.get_stats()["prefix_cache_hit_tokens"] >= 3 * len(prefix)
    assert got == hf_greedy(path, prompts, 12)


def test_hit_rate_with_a_shared_256_token_prefix(llama_dir):
    rng = random.Random(2)
    prefix = [BOS] + _random_tokens(rng, 255)
    prompts = [prefix + _random_tokens(rng, rng.randrange(3, 20)) for _ in range(100)]
    llm = LLM(llama_dir, dtype="float32", block_size=16)
    _run(llm, prompts, SamplingParams(temperature=0, max_tokens=2))
    stats = llm.get_stats()
    # One generate call: the first prompt's prefix blocks are keyed when scheduled, so the other
    # 99 reuse all 16 of them.
    assert stats["prefix_cache_hit_tokens"] >= 99 * 256
    assert stats["prefix_cache_hit_rate"] >= 99 * 256 / sum(len(p) for p in prompts)


def test_eviction_under_a_small_cache_stays_correct(llama_dir):
    rng = random.Random(3)
    prompts = [[BOS] + _random_tokens(rng, 63) for _ in range(12)]
    prompts += [p[:40] + _random_tokens(rng, 10) for p in prompts[:4]]  # revisit early prefixes
    expected = _run(LLM(llama_dir, dtype="float32", enable_prefix_caching=False), prompts)
    llm = LLM(llama_dir, dtype="float32", num_kv_blocks=16, block_size=16, max_num_seqs=2)
    got = []
    for prompt in prompts:  # one at a time: each new prefix must evict older cached blocks
        got += _run(llm, [prompt])
    assert got == expected
    assert len(llm.llm_engine.block_manager.allocator.cached_blocks) <= 16


def test_prompt_longer_than_the_step_budget(llama_dir):
    rng = random.Random(4)
    prompts = [[BOS] + _random_tokens(rng, 299), [BOS] + _random_tokens(rng, 20)]
    llm = LLM(llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=64)
    assert _run(llm, prompts, SamplingParams(temperature=0, max_tokens=12)) == hf_greedy(llama_dir, prompts, 12)


def test_a_prefix_that_ends_inside_a_block_is_reused_to_its_last_shared_token(llama_dir):
    """A shared prefix of 24 tokens at block size 16 (as SmolLM2's chat template makes): prompts
    admitted after the step that computed it reuse all 24 tokens (a copy of the partly shared
    block), and their outputs are those of a run without the cache. ``num_cached_tokens`` says so."""
    rng = random.Random(3)
    prefix = [BOS] + _random_tokens(rng, 23)
    prompts = [prefix + _random_tokens(rng, rng.randrange(2, 30)) for _ in range(6)]
    baseline = _run(LLM(llama_dir, dtype="float32", enable_prefix_caching=False), prompts)
    llm = LLM(llama_dir, dtype="float32", block_size=16)
    outs = [llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)[0] for p in prompts]  # one at a time
    assert [o.outputs[0].token_ids for o in outs] == baseline
    assert [o.num_cached_tokens for o in outs] == [0] + [24] * 5


def test_skip_reading_prefix_cache(llama_dir):
    """vLLM's ``skip_reading_prefix_cache``: the request computes its whole prompt (its blocks still
    enter the cache); unset, it follows ``prompt_logprobs``; False with them is refused."""
    rng = random.Random(5)
    prompt = {"prompt_token_ids": [BOS] + _random_tokens(rng, 40)}
    llm = LLM(llama_dir, dtype="float32", block_size=16)
    first = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    skipped = llm.generate(prompt, dataclasses.replace(GREEDY, skip_reading_prefix_cache=True), use_tqdm=False)[0]
    read = llm.generate(prompt, dataclasses.replace(GREEDY, skip_reading_prefix_cache=False), use_tqdm=False)[0]
    assert [first.num_cached_tokens, skipped.num_cached_tokens, read.num_cached_tokens] == [0, 0, 40]
    # vLLM's num_cache_creation_tokens: the full prompt blocks' 32 tokens less the hits.
    assert [o.num_cache_creation_tokens for o in (first, skipped, read)] == [32, 32, 0]
    uncached = LLM(llama_dir, dtype="float32", enable_prefix_caching=False).generate(prompt, GREEDY, use_tqdm=False)[0]
    assert (uncached.num_cached_tokens, uncached.num_cache_creation_tokens) == (0, 0)
    assert first.outputs[0].token_ids == skipped.outputs[0].token_ids == read.outputs[0].token_ids
    assert not SamplingParams(prompt_logprobs=0).reads_prefix_cache and SamplingParams().reads_prefix_cache
    assert SamplingParams(prompt_logprobs=0).skip_reading_prefix_cache is None
    with pytest.raises(ValueError, match="skip_reading_prefix_cache=False cannot be set with prompt_logprobs"):
        SamplingParams(prompt_logprobs=0, skip_reading_prefix_cache=False)
    with pytest.raises(ValueError, match="skip_reading_prefix_cache must be"):
        SamplingParams(skip_reading_prefix_cache="no")


def test_a_request_that_fills_the_cache_runs_although_a_partial_hit_would_not_fit(llama_dir):
    """A review found this hang: the request needs every block, and holding a free partial-hit
    source would need one more, so it waited for blocks nothing was going to free."""
    rng = random.Random(0)
    head, shared = [BOS] + _random_tokens(rng, 7), _random_tokens(rng, 8)
    llm = LLM(llama_dir, dtype="float32", num_kv_blocks=4, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate({"prompt_token_ids": head + shared + _random_tokens(rng, 1)}, params, use_tqdm=False)
    prompt = head + shared[:4] + _random_tokens(rng, 19)  # 31 tokens + 1: all 4 blocks
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    uncached = LLM(llama_dir, dtype="float32", num_kv_blocks=4, block_size=8, enable_prefix_caching=False)
    assert out.outputs[0].token_ids == uncached.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert out.num_cached_tokens == 8


def test_cache_salt_keeps_prefixes_apart(llama_dir):
    """vLLM's ``cache_salt`` (found by a hunt: the key was refused): a request shares prefix-cache
    blocks only with requests of its own salt, and its outputs do not change."""
    prompt = [BOS] + _random_tokens(random.Random(4), 40)
    with LLM(llama_dir, dtype="float32", num_kv_blocks=64) as llm:
        base = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]

        def run(salt=None):
            return llm.generate({"prompt_token_ids": prompt, **({"cache_salt": salt} if salt else {})}, GREEDY,
                                use_tqdm=False)[0]

        unsalted, first_a, second_a, first_b = run(), run("a"), run("a"), run("b")
        assert [o.num_cached_tokens for o in (unsalted, first_a, second_a, first_b)] == [40, 0, 40, 0]
        assert all(o.outputs[0].token_ids == base.outputs[0].token_ids for o in (first_a, second_a, first_b))
        text = llm.generate({"prompt": "a salted text prompt", "cache_salt": "a"}, GREEDY, use_tqdm=False)[0]
        assert text.prompt == "a salted text prompt"
        with pytest.raises(ValueError, match="cache_salt must be a non-empty str, got 5"):
            llm.generate({"prompt": "x", "cache_salt": 5}, GREEDY, use_tqdm=False)
        # A rendered chat carries one too (the job runner's chat rows).
        from pagedlm.entrypoints.chat_utils import RenderedChat

        chat = llm.get_tokenizer().decode(prompt[1:])
        cached = [llm.generate(RenderedChat(chat, salt), GREEDY, use_tqdm=False)[0].num_cached_tokens
                  for salt in ("c", "c", "d")]
        assert cached[0] == cached[2] == 0 and cached[1] > 0
