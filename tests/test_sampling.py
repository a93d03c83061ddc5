"""SamplingParams semantics against Hugging Face: logprobs, prompt logprobs, penalties and
warpers, beam search; plus n/best_of sharing KV blocks, seeds, stop strings and processors."""

import dataclasses
import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import BOS, EOS, VOCAB_SIZE
from pagedlm import LLM, BeamSearchParams, SamplingParams
from pagedlm.model_executor.layers.sampler import Sampler, SamplingMetadata
from pagedlm.sampling_params import RepetitionDetectionParams, StructuredOutputsParams
from pagedlm.step import unpack_token_bitmask

PROMPTS = [[BOS, 5, 17, 99, 4], [BOS] + list(range(40, 100)), [BOS, 200, 201]]


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(llama_dir, dtype="float32")


@pytest.fixture(scope="module")
def hf(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def test_logprobs_match_hf_log_softmax(llm, hf):
    outs = llm.generate(_ids(PROMPTS), SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        comp = out.outputs[0]
        assert comp.token_ids == ref.sequences[0, len(prompt):].tolist()
        total = 0.0
        for step, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
            ref_lp = torch.log_softmax(ref.logits[step][0].float(), dim=-1)
            top_vals, top_ids = ref_lp.topk(5)
            assert set(top_ids.tolist()) <= set(entry) and token in entry
            for t, v in zip(top_ids.tolist(), top_vals.tolist()):
                assert entry[t].logprob == pytest.approx(v, abs=1e-4)
            assert entry[token].rank == 1 and entry[token].decoded_token is not None
            total += ref_lp[token].item()
        assert comp.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_greedy_cumulative_logprob_is_none_without_logprobs(llm, hf):
    """Plain greedy rows take the argmax alone and report no cumulative logprob, as vLLM reports
    none without ``logprobs``; with ``logprobs=0`` (the sampled token's alone) it is the sum of HF's
    log-softmax at the chosen tokens, and the tokens are the same."""
    plain, scored = (llm.generate(_ids(PROMPTS), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                                logprobs=logprobs), use_tqdm=False)
                     for logprobs in (None, 0))
    for prompt, out, with_logprobs in zip(PROMPTS, plain, scored):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        comp, scored_comp = out.outputs[0], with_logprobs.outputs[0]
        assert comp.token_ids == scored_comp.token_ids == ref.sequences[0, len(prompt):].tolist()
        assert comp.logprobs is None and comp.cumulative_logprob is None
        total = sum(torch.log_softmax(ref.logits[step][0].float(), dim=-1)[token].item()
                    for step, token in enumerate(comp.token_ids))
        assert scored_comp.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_prompt_logprobs_match_hf(llama_dir, hf):
    # A small step budget splits the prompt into chunks; prompt logprobs must still be complete.
    llm = LLM(llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=16)
    outs = llm.generate(_ids(PROMPTS), SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for pos in range(1, len(prompt)):
            entry = out.prompt_logprobs[pos]
            token = prompt[pos]
            assert entry[token].logprob == pytest.approx(ref[pos - 1, token].item(), abs=1e-4)
            assert entry[token].rank == int((ref[pos - 1] > ref[pos - 1, token]).sum()) + 1
            assert len(entry) in (3, 4)


def _sampler_meta(params: list[SamplingParams], outputs: list[list[int]], prompts: list[list[int]]) -> SamplingMetadata:
    return SamplingMetadata.build(
        params, prompts, outputs, banned_token_ids=[() for _ in params], generators={}, beam_rows=[],
        vocab_size=VOCAB_SIZE, device=torch.device("cpu"),
    )


def test_repetition_penalty_matches_hf_processor():
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB_SIZE) * 3
    prompts, outputs = [[1, 5, 9], [7, 7]], [[11, 5], [300]]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.7)]
    ours = Sampler()._process(logits.clone(), _sampler_meta(params, outputs, prompts))
    for row in range(2):
        ids = torch.tensor([prompts[row] + outputs[row]])
        ref = RepetitionPenaltyLogitsProcessor(params[row].repetition_penalty)(ids, logits[row : row + 1].clone())
        assert torch.equal(ours[row], ref[0])


def test_penalties_are_the_dense_formulas_on_the_rows_that_ask():
    """Only the seen entries are touched; each gets the bits of the dense [rows, vocab] formulas, and
    a row without penalties is left as it was."""
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB_SIZE) * 3
    prompts = [[1, 5, 9, 5], [7, 7], [3], [2, 4]]
    outputs = [[11, 5, 11], [300, 7, 2, 2], [8], [4, 4, 6]]
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.3), SamplingParams(presence_penalty=0.7),
              SamplingParams(), SamplingParams(repetition_penalty=0.8, presence_penalty=-0.2, frequency_penalty=0.1)]
    ours = Sampler()._process(logits.clone(), _sampler_meta(params, outputs, prompts))
    for row, p in enumerate(params):
        x = logits[row].clone()
        counts = torch.bincount(torch.tensor(outputs[row]), minlength=VOCAB_SIZE).float()
        seen = (counts + torch.bincount(torch.tensor(prompts[row]), minlength=VOCAB_SIZE)) > 0
        r = torch.tensor(p.repetition_penalty)
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
        x = x - torch.tensor(p.frequency_penalty) * counts - torch.tensor(p.presence_penalty) * (counts > 0)
        assert torch.equal(ours[row], x), row


def test_presence_and_frequency_penalties_follow_their_definition():
    logits = torch.zeros(1, VOCAB_SIZE)
    meta = _sampler_meta([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [[4, 4, 4, 9]], [[4, 10]])
    out = Sampler()._process(logits, meta)[0]
    assert out[4].item() == pytest.approx(-0.5 - 0.75) and out[9].item() == pytest.approx(-0.5 - 0.25)
    assert out[10].item() == 0.0  # prompt tokens are not penalised by presence/frequency


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reported_logprobs_are_raw_after_penalties(dtype):
    """Penalties change which token is picked, not the log-probabilities reported for it; the
    model's logits must come out of the sampler unchanged (fp32 ones are not copied by .float())."""
    torch.manual_seed(0)
    logits = (torch.randn(2, VOCAB_SIZE) * 3).to(dtype)
    original = logits.clone()
    params = [SamplingParams(temperature=0, presence_penalty=2.0, logprobs=2), SamplingParams(temperature=0, repetition_penalty=1.5)]
    out = Sampler()(logits, _sampler_meta(params, [[int(logits[0].argmax())], [int(logits[1].argmax())]], [[1], [1]]))
    assert torch.equal(logits, original)
    raw = torch.log_softmax(original.float(), dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert (out.token_ids != original.float().argmax(dim=-1)).all()  # the penalties did change the picks


@pytest.mark.parametrize("kwargs,warper", [
    (dict(top_k=7), lambda: TopKLogitsWarper(7)),
    (dict(top_p=0.6), lambda: TopPLogitsWarper(0.6)),
    (dict(min_p=0.2), lambda: MinPLogitsWarper(0.2)),
])
def test_warpers_keep_the_same_tokens_as_hf(kwargs, warper):
    torch.manual_seed(1)
    logits = torch.randn(64, VOCAB_SIZE) * 2
    params = [SamplingParams(temperature=1.0, seed=i, **kwargs) for i in range(64)]
    ref_kept = torch.isfinite(warper()(None, logits.clone()))
    meta = _sampler_meta(params, [[] for _ in range(64)], [[1] for _ in range(64)])
    meta.generators = {i: torch.Generator().manual_seed(i) for i in range(64)}
    sampled = Sampler()(logits.clone(), meta).token_ids
    assert ref_kept[torch.arange(64), sampled].all()
    # Many draws from one row reach every kept token and nothing else.
    row = logits[:1].expand(4000, -1).clone()
    meta = _sampler_meta([params[0]] * 4000, [[]] * 4000, [[1]] * 4000)
    drawn = set(Sampler()(row, meta).token_ids.tolist())
    kept = set(torch.nonzero(ref_kept[0]).flatten().tolist())
    assert drawn <= kept
    if len(kept) <= 10:
        assert drawn == kept


def test_n_with_seed_equals_independent_seeded_requests(llm):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=7, max_tokens=12)
    out = llm.generate(_ids(PROMPTS[:1]), params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    singles = llm.generate(
        _ids(PROMPTS[:1] * 4),
        [SamplingParams(temperature=1.0, top_p=0.95, seed=7 + i, max_tokens=12) for i in range(4)],
        use_tqdm=False,
    )
    assert [c.token_ids for c in out.outputs] == [s.outputs[0].token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


@pytest.mark.parametrize("n", [10, 16])
def test_n_above_max_num_seqs_runs_as_child_requests(llama_dir, n):
    """vLLM's parallel sampling: an n above max_num_seqs runs as requests of at most max_num_seqs
    completions, each completion seeded as one request seeds it, the prompt logprobs computed once."""
    params = SamplingParams(n=n, temperature=1.0, seed=5, max_tokens=6, logprobs=1, prompt_logprobs=1)
    prompts = _ids(PROMPTS[:2])
    small, big = LLM(llama_dir, dtype="float32", max_num_seqs=4), LLM(llama_dir, dtype="float32", max_num_seqs=16)
    whole = big.generate(prompts, params, use_tqdm=False)
    split = small.generate(prompts, params, use_tqdm=False)
    for a, b in zip(whole, split):
        assert [c.index for c in b.outputs] == list(range(n))
        assert [c.token_ids for c in b.outputs] == [c.token_ids for c in a.outputs]
        assert [c.logprobs for c in b.outputs] == [c.logprobs for c in a.outputs]
        assert b.prompt_logprobs == a.prompt_logprobs and b.finished and b.request_id.isdigit()
    assert len({tuple(c.token_ids) for c in split[0].outputs}) > 1
    done = dict(small.generate_as_completed(prompts, params))
    assert [[c.token_ids for c in done[i].outputs] for i in (0, 1)] == [[c.token_ids for c in o.outputs] for o in whole]
    assert not small.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match=r"best_of \(10\) exceeds max_num_seqs \(4\)"):
        small.generate(prompts, SamplingParams(n=2, best_of=10, temperature=1.0), use_tqdm=False)
    with pytest.raises(ValueError, match=r"LLM.generate runs a larger n"):
        small.llm_engine.add_request("r", prompts[0], params)
    # A seed near int64's end: the children's seeds wrap as torch wraps a generator's (found by a review).
    near_end = dataclasses.replace(params, seed=2**63 - 5, prompt_logprobs=None, logprobs=None)
    assert [c.token_ids for c in small.generate(prompts[:1], near_end, use_tqdm=False)[0].outputs] == \
        [c.token_ids for c in big.generate(prompts[:1], near_end, use_tqdm=False)[0].outputs]
    errors = dict(small.generate_as_completed(prompts[:1], dataclasses.replace(near_end, seed=-1 - 4),
                                              return_errors=True))
    assert "gives completion 4 the seed -1" in str(errors[0]) and errors[0].field == "seed"


def test_n_shares_prompt_blocks(llama_dir):
    llm = LLM(llama_dir, dtype="float32", block_size=16)
    prompt = [BOS] + [(7 * i) % 300 + 3 for i in range(511)]  # 512 tokens = 32 full blocks
    single = llm.generate(_ids([prompt]), SamplingParams(temperature=1.0, seed=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    single_peak = llm.get_stats()["peak_kv_blocks_in_use"]
    outs = llm.generate(_ids([prompt]), SamplingParams(n=8, temperature=1.0, seed=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    peak = llm.get_stats()["peak_kv_blocks_in_use"]
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    # Shared: the 32 prompt blocks once, plus at most 2 blocks of output per completion.
    assert single_peak == 33
    assert peak <= 32 + 8 * 2 < 8 * single_peak
    assert llm.get_stats()["num_free_kv_blocks"] == llm.get_stats()["num_kv_blocks"]


def test_best_of_returns_the_most_likely(llm):
    out = llm.generate(_ids(PROMPTS[:1]), SamplingParams(n=2, best_of=6, temperature=1.0, seed=3, max_tokens=10), use_tqdm=False)[0]
    everything = llm.generate(_ids(PROMPTS[:1]), SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=10, logprobs=0),
                              use_tqdm=False)[0]
    assert all(isinstance(c.cumulative_logprob, float) for c in out.outputs)  # reported: best_of ranks by it
    best = sorted(everything.outputs, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in best]


def test_multi_sequence_group_survives_preemption(llama_dir):
    prompts = [[BOS] + [i + 3] * 40 for i in range(6)]
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=30, ignore_eos=True)
    roomy = LLM(llama_dir, dtype="float32").generate(_ids(prompts), params, use_tqdm=False)
    tight_llm = LLM(llama_dir, dtype="float32", num_kv_blocks=24, block_size=16)
    tight = tight_llm.generate(_ids(prompts), params, use_tqdm=False)
    assert tight_llm.get_stats()["num_preemptions"] > 0
    assert [[c.token_ids for c in o.outputs] for o in tight] == [[c.token_ids for c in o.outputs] for o in roomy]


def test_stop_strings_cut_text_across_tokens(llm):
    tok = llm.get_tokenizer()
    base = llm.generate(_ids(PROMPTS[:1]), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    text = base.outputs[0].text
    # A stop string made of the end of one token's text and the start of the next.
    pieces = [tok.decode(PROMPTS[0][-6:] + base.outputs[0].token_ids[: i + 1])[len(tok.decode(PROMPTS[0][-6:])):]
              for i in range(len(base.outputs[0].token_ids))]
    i = next(i for i in range(3, 30) if len(pieces[i]) - len(pieces[i - 1]) >= 1 and len(pieces[i - 1]) - len(pieces[i - 2]) >= 1)
    stop = pieces[i][len(pieces[i - 1]) - 1 : len(pieces[i - 1]) + 1]
    first = text.find(stop)
    out = llm.generate(_ids(PROMPTS[:1]), SamplingParams(temperature=0, max_tokens=30, stop=[stop, "@@never@@"], ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:first] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(_ids(PROMPTS[:1]), SamplingParams(temperature=0, max_tokens=30, stop=stop, include_stop_str_in_output=True, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: first + len(stop)]


def test_which_stop_string_ends_the_text_as_in_vllm(llm):
    """Found against vLLM: the stop string that the text completes first wins, ties going to the
    first in ``stop`` (earliest start, ties alphabetical, before); the text of the first
    ``min_tokens`` tokens cannot complete one (it could, by one token)."""
    params = dict(temperature=0, max_tokens=30, ignore_eos=True)
    base = llm.generate(_ids(PROMPTS[:1]), SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    text = base.text

    def run(stop, **kw):
        out = llm.generate(_ids(PROMPTS[:1]), SamplingParams(**params, stop=stop, **kw), use_tqdm=False)[0].outputs[0]
        return out.text, out.stop_reason

    # p: where a 3-character string and its middle character both occur first
    p = next(p for p in range(len(text) - 3) if text.find(text[p : p + 3]) == p and text.find(text[p + 1]) == p + 1)
    longer, inner, pair = text[p : p + 3], text[p + 1], text[p : p + 2]
    assert run([longer, inner]) == (text[: p + 1], inner)  # inner completes first, though longer starts first
    assert run([pair, inner]) == (text[:p], pair) and run([inner, pair]) == (text[: p + 1], inner)  # same end

    pieces = [llm.get_tokenizer().decode(base.token_ids[: i + 1]) for i in range(3)]
    first = pieces[0][-1:] or pieces[1][-1:]
    for min_tokens in (0, 1, 2):
        done = len(pieces[min_tokens - 1]) if min_tokens else 0  # the text of the first min_tokens tokens
        end = text.find(first, max(0, done - len(first) + 1))
        expected = (text[:end], first) if end >= 0 else (text, None)
        assert run([first], min_tokens=min_tokens) == expected


def test_logits_processors_receive_tokens_and_steer(llm):
    calls = []

    def force_42(output_ids, logits):
        calls.append(list(output_ids))
        logits = torch.full_like(logits, float("-inf"))
        logits[42] = 0.0
        return logits

    def see_prompt(prompt_ids, output_ids, logits):
        assert prompt_ids == PROMPTS[0]
        return logits

    out = llm.generate(_ids(PROMPTS[:1]), SamplingParams(temperature=0.8, max_tokens=4, logits_processors=[see_prompt, force_42]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [42] * 4
    assert calls == [[], [42], [42, 42], [42, 42, 42]]


@pytest.mark.parametrize("logprobs", [None, 2])
def test_a_step_with_no_token_left_ends_only_that_completion_with_abort(llm, logprobs):
    """Processing that leaves a row all -inf has nothing to sample (the kernels would take id 0,
    a token that was banned): that completion ends with "abort" before the step; a processor that
    forces a token with +inf still gets it, and the other rows run on."""
    def ban_all_from(step):
        return lambda ids, logits: torch.full_like(logits, float("-inf")) if len(ids) >= step else logits

    def force_42(ids, logits):
        return logits.index_fill(0, torch.tensor([42]), float("inf"))

    prompts = _ids(PROMPTS[:3])
    params = [SamplingParams(temperature=0, max_tokens=6, logits_processors=[ban_all_from(2)], logprobs=logprobs),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=6, logits_processors=[ban_all_from(3)]),
              SamplingParams(temperature=0.7, max_tokens=3, logits_processors=[force_42], repetition_penalty=1.3)]
    alone = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2, logprobs=logprobs), use_tqdm=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    first = outs[0].outputs[0]
    assert first.finish_reason == "abort" and first.token_ids == alone[0].outputs[0].token_ids
    assert first.cumulative_logprob == pytest.approx(alone[0].outputs[0].cumulative_logprob)
    assert [(len(c.token_ids), c.finish_reason) for c in outs[1].outputs] == [(3, "abort"), (3, "abort")]
    assert outs[2].outputs[0].token_ids == [42] * 3 and outs[2].outputs[0].finish_reason == "length"
    # Beam search too, once no beam has a token to go on with (found by a review: beams took banned ids).
    beams = llm.generate(prompts[:1], SamplingParams(n=2, temperature=0, use_beam_search=True, max_tokens=6,
                                                     logits_processors=[ban_all_from(2)]), use_tqdm=False)[0]
    assert [(len(c.token_ids), c.finish_reason) for c in beams.outputs] == [(2, "abort"), (2, "abort")]
    assert llm.get_stats()["num_free_kv_blocks"] == llm.get_stats()["num_kv_blocks"]


@pytest.mark.parametrize("min_tokens", [0, 9])
def test_repetition_detection_ends_a_completion_where_its_output_first_repeats(llm, min_tokens):
    """vLLM's: the output is the run without detection, cut at its first token (not before
    min_tokens) that ends a pattern repeated min_count times; "repetition", "repetition_detected"."""
    def cycle_after_4(ids, logits):
        return logits if len(ids) < 4 else torch.full_like(logits, float("-inf")).index_fill(
            0, torch.tensor([(11, 12, 11, 13)[len(ids) % 4]]), 0.0)

    detection = {"max_pattern_size": 4, "min_pattern_size": 2, "min_count": 2}
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=24, min_tokens=min_tokens, ignore_eos=True,
                            logits_processors=[cycle_after_4])
    free = llm.generate(_ids(PROMPTS[:1]), params, use_tqdm=False)[0].outputs[0].token_ids
    detector = RepetitionDetectionParams(**detection)
    end = next(i for i in range(max(min_tokens, 1), len(free) + 1) if detector.detects(free[:i]))
    out = llm.generate(_ids(PROMPTS[:1]), params.clone(repetition_detection=detection), use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (free[:end], "repetition", "repetition_detected")
    assert end < len(free)


def test_logprob_token_ids_return_those_ids_logprobs_and_ranks_as_the_whole_vocabulary_has_them(llm):
    """vLLM's ``logprob_token_ids``: at each position the sampled token's entry, then the ids' own,
    in their order, with the values and ranks ``logprobs=-1`` gives them; in a batch with top-k
    and greedy rows, whose outputs stay as they are alone."""
    ids = [9, 3, 40]
    prompts = _ids(PROMPTS[:3])
    sampled = SamplingParams(temperature=0.9, seed=2, max_tokens=4)
    everything = llm.generate(prompts[:1], sampled.clone(logprobs=-1), use_tqdm=False)[0].outputs[0]
    others = [SamplingParams(temperature=0, max_tokens=4, logprobs=2), SamplingParams(temperature=0, max_tokens=4)]
    alone = llm.generate(prompts[1:], others, use_tqdm=False)
    outs = llm.generate(prompts, [sampled.clone(logprob_token_ids=ids), *others], use_tqdm=False)
    got = outs[0].outputs[0]
    assert got.token_ids == everything.token_ids and got.cumulative_logprob == everything.cumulative_logprob
    for token, position, whole in zip(got.token_ids, got.logprobs, everything.logprobs):
        assert list(position) == [token] + [t for t in ids if t != token]
        for t, entry in position.items():
            assert (entry.logprob, entry.rank, entry.decoded_token) == \
                (whole[t].logprob, whole[t].rank, whole[t].decoded_token)
    for out, before in zip(outs[1:], alone):
        assert out.outputs[0].token_ids == before.outputs[0].token_ids
        assert out.outputs[0].logprobs == before.outputs[0].logprobs
    with pytest.raises(ValueError, match=r"logprob_token_ids \[%d\] are outside the vocabulary" % VOCAB_SIZE):
        llm.generate(prompts[:1], SamplingParams(logprob_token_ids=[1, VOCAB_SIZE]), use_tqdm=False)


def test_detokenize_false_returns_ids_only(llm):
    out = llm.generate(_ids(PROMPTS[:1]), SamplingParams(temperature=0, max_tokens=5, detokenize=False), use_tqdm=False)[0]
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) == 5


@pytest.fixture(scope="module")
def eos_model_dir(llama_dir, tmp_path_factory, llm):
    """The tiny model with a frequently generated token declared EOS (next to the tokenizer's own),
    so beams do finish early."""
    outs = llm.generate(_ids([[BOS, i + 3, 2 * i + 5] for i in range(20)]), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    counts = Counter(t for o in outs for t in o.outputs[0].token_ids[2:])
    eos = counts.most_common(1)[0][0]
    path = tmp_path_factory.mktemp("eos_model") / "m"
    shutil.copytree(llama_dir, path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": eos}))
    return str(path), eos


def test_min_tokens_bans_eos_with_ignore_eos_too(eos_model_dir):
    """vLLM's min_tokens bans every EOS id whether or not ignore_eos (its all_stop_token_ids), as
    transformers' min_new_tokens does: up to where transformers stops, the tokens are its own."""
    path, eos = eos_model_dir
    llm = LLM(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[BOS, i + 3, 2 * i + 5] for i in range(8)]
    free = llm.generate(_ids(prompts), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert any(eos in o.outputs[0].token_ids[:6] for o in free)  # EOS would come before min_tokens
    held = llm.generate(_ids(prompts), SamplingParams(temperature=0, max_tokens=12, min_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(prompts, held):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=6,
                              eos_token_id=[eos, EOS], pad_token_id=0)
        seq = ref[0, len(prompt):].tolist()  # to its first EOS past min_new_tokens; ignore_eos goes on
        assert out.outputs[0].token_ids[: len(seq)] == seq
        assert len(out.outputs[0].token_ids) == 12


@pytest.mark.parametrize("width,n,length_penalty,early_stopping,repetition_penalty,min_tokens", [
    (4, 4, 1.0, False, 1.0, 0), (3, 2, 0.0, True, 1.0, 0), (4, 1, 2.0, "never", 1.0, 0), (2, 2, -1.0, False, 1.0, 0),
    # Processors act on the log-probabilities, as in Hugging Face's beam search (not on the logits).
    (3, 3, 1.0, False, 1.5, 0), (3, 2, 1.0, True, 1.0, 4),
])
def test_beam_search_matches_hf(eos_model_dir, width, n, length_penalty, early_stopping, repetition_penalty, min_tokens):
    path, eos = eos_model_dir
    llm = LLM(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = SamplingParams(n=n, best_of=width, use_beam_search=True, temperature=0, max_tokens=10,
                            length_penalty=length_penalty, early_stopping=early_stopping,
                            repetition_penalty=repetition_penalty, min_tokens=min_tokens)
    prompts = [[BOS, i + 3, 2 * i + 5] for i in range(6)]
    outs = llm.generate(_ids(prompts), params, use_tqdm=False)
    finished_early = 0
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, do_sample=False,
                              max_new_tokens=10, length_penalty=length_penalty, early_stopping=early_stopping,
                              repetition_penalty=repetition_penalty, min_new_tokens=min_tokens,
                              eos_token_id=[eos, EOS], pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        for row, comp in enumerate(out.outputs):
            seq = ref.sequences[row, len(prompt):].tolist()
            ends = [i for i, t in enumerate(seq) if t in (eos, EOS)]
            seq = seq[: ends[0] + 1] if ends else seq
            assert comp.token_ids == seq
            if repetition_penalty == 1.0 and not min_tokens:  # else HF scores the processed log-probabilities
                score = comp.cumulative_logprob / len(comp.token_ids) ** length_penalty
                assert score == pytest.approx(ref.sequences_scores[row].item(), abs=1e-4)
            finished_early += comp.finish_reason == "stop"
    if length_penalty <= 1.0:  # (a large penalty favours the beams that run to max_tokens)
        assert finished_early > 0
    assert llm.get_stats()["num_free_kv_blocks"] == llm.get_stats()["num_kv_blocks"]


@pytest.mark.parametrize("width", [2, 3])
def test_beam_search_with_many_stop_token_ids_matches_hf(eos_model_dir, width):
    """Found by a hunt: the candidates a step ranks were counted from the EOS ids alone, as Hugging
    Face counts its ``eos_token_id`` list; where ``stop_token_ids`` (which HF gets as EOS ids here)
    ended every candidate, the search stopped after one token with HF's beams still running."""
    path, eos = eos_model_dir
    llm = LLM(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [BOS, 50, 60, 70]
    with torch.no_grad():
        first = hf(torch.tensor([prompt])).logits[0, -1].topk(12).indices.tolist()
    stops = [t for t in first if t not in (eos, EOS)][:7]  # 7 of the first step's 8 best tokens end a beam
    params = SamplingParams(n=width, best_of=width, use_beam_search=True, temperature=0, max_tokens=12,
                            stop_token_ids=stops, length_penalty=3.0, early_stopping="never")
    [out] = llm.generate(_ids([prompt]), params, use_tqdm=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                          max_new_tokens=12, length_penalty=3.0, early_stopping="never",
                          eos_token_id=[eos, EOS, *stops], pad_token_id=0)
    for row, comp in enumerate(out.outputs):
        seq = ref[row, len(prompt):].tolist()
        ends = [i for i, t in enumerate(seq) if t in (eos, EOS, *stops)]
        assert comp.token_ids == (seq[: ends[0] + 1] if ends else seq)
    assert max(len(c.token_ids) for c in out.outputs) > 1


@pytest.mark.parametrize("constraint,width,n", [
    ({"regex": r"[a-z ]{1,40}\."}, 3, 3),
    ({"choice": ["cat", "a cat", "the dog", "banana", "fox", "a banana"]}, 4, 2),
    ({"json": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}, 2, 2),
])
def test_beam_search_under_a_grammar_matches_hf_prefix_constrained(llama_dir, constraint, width, n):
    """Structured outputs under beam search (refused before; vLLM 0.32's offline search applies
    them): each beam held to the grammar, ranked by the model's log-probabilities of what it
    allows, as Hugging Face's beam search with ``prefix_allowed_tokens_fn`` (here fed by the
    engine's own xgrammar matchers) ranks them. Every returned beam satisfies the grammar."""
    llm = LLM(llama_dir, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    manager = llm.llm_engine.structured_outputs
    so = StructuredOutputsParams(**constraint)
    prompts = [[BOS, i + 3, 2 * i + 5] for i in range(4)]
    params = SamplingParams(n=n, best_of=width, use_beam_search=True, temperature=0, max_tokens=12,
                            structured_outputs=so)
    outs = llm.generate(_ids(prompts), params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        def allowed(batch_id, ids):
            matcher = manager.new_matcher(so)
            if not all(matcher.accept_token(t) for t in ids[len(prompt):].tolist()) or matcher.is_terminated():
                return [EOS]  # a beam Hugging Face keeps at -inf score, outside the grammar
            bitmask = manager.bitmask(matcher)
            return unpack_token_bitmask(bitmask[None], bitmask.shape[0] * 32)[0].nonzero()[:, 0].tolist()

        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, do_sample=False,
                              max_new_tokens=12, eos_token_id=EOS, pad_token_id=0, prefix_allowed_tokens_fn=allowed,
                              output_scores=True, return_dict_in_generate=True)
        assert len(out.outputs) == n
        for row, comp in enumerate(out.outputs):
            seq = ref.sequences[row, len(prompt):].tolist()
            seq = seq[: seq.index(EOS) + 1] if EOS in seq else seq
            assert comp.token_ids == seq
            score = comp.cumulative_logprob / len(comp.token_ids)
            assert score == pytest.approx(ref.sequences_scores[row].item(), abs=1e-4)
            matcher = manager.new_matcher(so)
            assert all(matcher.accept_token(t) for t in comp.token_ids)
            assert matcher.is_terminated() == (comp.finish_reason == "stop")
    assert llm.get_stats()["num_free_kv_blocks"] == llm.get_stats()["num_kv_blocks"]


def test_llm_beam_search_holds_its_grammar_with_ignore_eos_too(llm):
    """``BeamSearchParams.structured_outputs`` (vLLM's; refused before): where the grammar can only
    end, a beam ends on EOS even with ignore_eos (as a sampled completion does). (Two beams may
    spell one text in different tokens.)"""
    choice = ["cat", "fox"]
    for ignore_eos in (False, True):
        params = BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=ignore_eos,
                                  structured_outputs={"choice": choice})
        for out in llm.beam_search(_ids([[BOS, 5, 6], [BOS, 7]]), params):
            texts = [llm.get_tokenizer().decode(s.tokens[len(s.tokens) - len(s.logprobs):-1]) for s in out.sequences]
            assert sorted(set(texts)) == choice and {s.finish_reason for s in out.sequences} == {"stop"}
    assert llm.get_stats()["num_free_kv_blocks"] == llm.get_stats()["num_kv_blocks"]


def test_beam_search_under_a_grammar_reports_the_models_logprobs_and_keeps_to_it(llm, hf):
    """Found by a review: each beam's logprob dicts mixed the masked logits' top entries with the
    model's value for its token (a rank-2 entry above rank 1); all are the model's now, as without a
    grammar. And a logits processor raising a token the grammar bans cannot lift a beam out of it
    (an assert stopped the engine, holding a KV block)."""
    so = StructuredOutputsParams(regex=r"[a-z ]{1,40}\.")
    params = SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0, max_tokens=6, logprobs=3,
                            structured_outputs=so)
    for prompt, out in zip(PROMPTS[:3], llm.generate(_ids(PROMPTS[:3]), params, use_tqdm=False)):
        for comp in out.outputs:
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + comp.token_ids])).logits[0, len(prompt) - 1 : -1]
            for row, token, entry in zip(torch.log_softmax(logits.float(), dim=-1), comp.token_ids, comp.logprobs):
                assert set(row.topk(3).indices.tolist()) <= set(entry)  # the model's top 3, the grammar's or not
                for t, logprob in entry.items():
                    assert logprob.logprob == pytest.approx(row[t].item(), abs=1e-4)
                    assert logprob.rank == int((row > row[t]).sum()) + 1 or t == token

    def lift(output_ids, row):  # 'Z' is never in the grammar
        row[llm.get_tokenizer().convert_tokens_to_ids("Z")] = 1e4
        return row

    params = SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0, max_tokens=6, structured_outputs=so,
                            logits_processors=[lift])
    for out in llm.generate(_ids(PROMPTS[:3]), params, use_tqdm=False):
        assert all(re.fullmatch(r"[a-z ]{1,40}\.?", llm.get_tokenizer().decode(c.token_ids, skip_special_tokens=True))
                   for c in out.outputs)
    assert llm.get_stats()["num_free_kv_blocks"] == llm.get_stats()["num_kv_blocks"]


def test_logits_processors_run_once_a_row_and_step_beside_beams(llm):
    """In a step with beam rows and sampled rows each row's processors run once: on log-probabilities
    for the beams, on logits for the others."""
    calls = {"beam": 0, "sampled": 0}

    def counting(kind):
        def processor(prompt_ids, output_ids, row):
            calls[kind] += 1
            return row
        return processor

    params = [SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=4, ignore_eos=True,
                             logits_processors=[counting("beam")]),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logits_processors=[counting("sampled")])]
    llm.generate(_ids([[BOS, 5, 6], [BOS, 7, 8]]), params, use_tqdm=False)
    assert calls == {"beam": 1 + 2 * 3, "sampled": 4}  # the prompt's row, then two beams


def test_beam_search_logprobs_are_the_models_at_each_beams_tokens(llm, hf):
    """Each beam's logprob dicts are those of its own prefix (a forked beam keeps its parent's
    earlier ones), as sampling reports them; their chosen entries sum to cumulative_logprob."""
    params = SamplingParams(n=3, best_of=4, use_beam_search=True, temperature=0, max_tokens=6, ignore_eos=True,
                            logprobs=3)
    for prompt, out in zip(PROMPTS, llm.generate(_ids(PROMPTS), params, use_tqdm=False)):
        assert len({tuple(c.token_ids) for c in out.outputs}) == 3
        for comp in out.outputs:
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + comp.token_ids])).logits[0, len(prompt) - 1 : -1]
            ref = torch.log_softmax(logits.float(), dim=-1)
            assert len(comp.logprobs) == len(comp.token_ids)
            for row, token, entry in zip(ref, comp.token_ids, comp.logprobs):
                assert next(iter(entry)) == token and entry[token].rank == int((row > row[token]).sum()) + 1
                top_vals, top_ids = row.topk(3)
                assert set(top_ids.tolist()) <= set(entry) and len(entry) <= 4
                for t in entry:
                    assert entry[t].logprob == pytest.approx(row[t].item(), abs=1e-4)
                assert entry[token].decoded_token is not None
            assert sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)) == pytest.approx(
                comp.cumulative_logprob, abs=1e-5)


@pytest.mark.parametrize("width,length_penalty", [(3, 1.0), (2, 0.0), (1, 1.0)])
def test_llm_beam_search_matches_hf(eos_model_dir, width, length_penalty):
    """vLLM's ``LLM.beam_search`` API over the engine's beam search: ``tokens`` hold the prompt,
    and the sequences are HF's ``num_beams`` ones (greedy at width 1)."""
    path, eos = eos_model_dir
    llm = LLM(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[BOS, i + 3, 2 * i + 5] for i in range(4)]
    params = BeamSearchParams(beam_width=width, max_tokens=8, length_penalty=length_penalty)
    outs = llm.beam_search(_ids(prompts), params)
    assert llm.beam_search(_ids(prompts), params, concurrency_limit=1) == outs
    assert llm.beam_search(_ids(prompts), params, concurrency_limit=np.int64(2)) == outs  # a review: refused
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                              max_new_tokens=8, length_penalty=length_penalty, eos_token_id=[eos, EOS], pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
        assert len(out.sequences) == width
        for row, seq in enumerate(out.sequences):
            expected = ref.sequences[row].tolist()
            ends = [i for i, t in enumerate(expected) if i >= len(prompt) and t in (eos, EOS)]
            expected = expected[: ends[0] + 1] if ends else expected
            assert seq.tokens == expected and seq.finish_reason == ("stop" if ends else "length")
            assert seq.orig_prompt == {"type": "token", "prompt_token_ids": prompt}  # vLLM's TokensInput
            assert seq.get_prompt() == {"type": "token", "prompt_token_ids": expected}
            assert seq.text == llm.get_tokenizer().decode(expected, skip_special_tokens=True)
            assert len(seq.logprobs) == len(expected) - len(prompt)
            assert all(len(e) == min(2 * width, VOCAB_SIZE) and t in e for t, e in zip(expected[len(prompt):], seq.logprobs))
            if width > 1:
                score = seq.cum_logprob / (len(expected) - len(prompt)) ** length_penalty
                assert score == pytest.approx(ref.sequences_scores[row].item(), abs=1e-4)


def test_beam_search_sequences_hold_their_prompt_as_vllms_orig_prompt(llm):
    """vLLM's ``BeamSearchSequence.orig_prompt`` (found by a hunt: missing): the prompt's engine
    input with its text and cache salt, in vLLM's field order; ``get_prompt`` continues the beam."""
    [out] = llm.beam_search([{"prompt": "hello there", "cache_salt": "s1"}], BeamSearchParams(beam_width=2, max_tokens=3))
    ids = llm.get_tokenizer()("hello there").input_ids
    for seq in out.sequences:
        assert seq.orig_prompt == {"type": "token", "prompt_token_ids": ids, "prompt": "hello there", "cache_salt": "s1"}
        assert seq.get_prompt() == {**seq.orig_prompt, "prompt_token_ids": seq.tokens} and seq.tokens[:len(ids)] == ids
    assert [f.name for f in dataclasses.fields(out.sequences[0])] == [
        "orig_prompt", "tokens", "logprobs", "lora_request", "cum_logprob", "text", "finish_reason", "stop_reason"]


def test_beam_search_checks_params_changed_after_construction_and_its_width(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=2)
    params.beam_width = 0
    with pytest.raises(ValueError, match="beam_width must be at least 1, got 0"):
        llm.beam_search(_ids([[BOS, 9]]), params)
    params.beam_width = llm.llm_engine.scheduler_config.max_num_seqs + 1
    with pytest.raises(ValueError, match=r"beam_width \(\d+\) exceeds max_num_seqs"):
        llm.beam_search(_ids([[BOS, 9]]), params)


@pytest.mark.parametrize("ignore_eos,stop_token_ids,finish_reason,stop_reason", [
    (False, [], "stop", None),
    (True, [], "length", None),  # EOS does not stop a sequence under ignore_eos, so beams ending on it ran out of length
    (True, [EOS], "stop", EOS),
])
def test_beam_finish_reason_follows_the_stop_rule(llm, ignore_eos, stop_token_ids, finish_reason, stop_reason):
    def eos_at_fourth_token(output_token_ids, logits):
        if len(output_token_ids) == 3:
            logits = torch.full_like(logits, float("-inf"))
            logits[EOS] = 0.0
        return logits

    params = SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=4, ignore_eos=ignore_eos,
                            stop_token_ids=stop_token_ids, logits_processors=[eos_at_fourth_token],
                            skip_special_tokens=False)
    out = llm.generate(_ids([[BOS, 9, 10, 11]]), params, use_tqdm=False)[0]
    eos_endings = [c for c in out.outputs if c.token_ids[-1] == EOS and len(c.token_ids) == 4]
    assert eos_endings
    assert all(c.finish_reason == finish_reason and c.stop_reason == stop_reason for c in eos_endings)
    # A stop token's text is left out of the text; an EOS that stopped nothing is ordinary text.
    assert all(c.text.endswith("</s>") == (finish_reason == "length") for c in eos_endings)


@pytest.mark.parametrize("length_penalty", [1100.0, -1100.0])
def test_beam_search_with_an_extreme_length_penalty_runs(llm, length_penalty):
    params = SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=12, ignore_eos=True,
                            length_penalty=length_penalty)
    out = llm.generate(_ids([[BOS, 9, 10, 11]]), params, use_tqdm=False)[0]
    assert len(out.outputs) == 2 and all(len(c.token_ids) == 12 for c in out.outputs)
    assert llm.get_stats()["num_free_kv_blocks"] == llm.get_stats()["num_kv_blocks"]


@pytest.mark.parametrize("processor,shown", [
    (lambda out, logits: logits[:-1], "must return a float tensor .*shape"),
    (lambda out, logits: logits.sum(), "must return a float tensor .*shape"),
    (lambda out, logits: logits.long(), "must return a float tensor .*int64"),
    (lambda out, logits: None, "must return a float tensor .*NoneType"),
    # Found by a hunt: the kernels took a NaN row's last id, every step, without a word.
    (lambda out, logits: logits.index_fill(0, torch.tensor([5, 9]), float("nan")),
     r"returned NaN for token id\(s\) \[5, 9\] \(2 in all\)"),
])
def test_a_logits_processor_returning_the_wrong_thing_is_named(llm, processor, shown):
    with pytest.raises(ValueError, match=f"logits processor .* {shown}"):
        llm.generate("Hello", SamplingParams(max_tokens=3, logits_processors=[processor]), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.get_stats()["num_free_kv_blocks"] == llm.get_stats()["num_kv_blocks"]


def test_a_logits_processor_cannot_change_the_tokens(llm):
    def meddle(prompt, out, logits):
        prompt.append(7)
        out.append(7)
        return logits

    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    plain = llm.generate(_ids([[BOS, 9, 10]]), params, use_tqdm=False)[0]
    meddled = llm.generate(_ids([[BOS, 9, 10]]), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                                 logits_processors=[meddle]), use_tqdm=False)[0]
    assert meddled.prompt_token_ids == plain.prompt_token_ids
    assert meddled.outputs[0].token_ids == plain.outputs[0].token_ids


def test_beam_search_reports_the_models_log_probabilities_as_sampling_does(llm):
    """Found by fuzzing (issue 19): beams reported the sum of processed log-probabilities (0 for a
    token a processor forced); cumulative_logprob is the model's for every kind of request."""
    forced = [40, 41, 42, 43]

    def force(output_token_ids, logits):
        logits = torch.full_like(logits, float("-inf"))
        logits[forced[len(output_token_ids)]] = 0.0
        return logits

    common = dict(temperature=0, max_tokens=4, ignore_eos=True, logits_processors=[force])
    sampled = llm.generate(_ids([[BOS, 9, 10]]), SamplingParams(logprobs=0, **common), use_tqdm=False)[0].outputs[0]
    beams = llm.generate(_ids([[BOS, 9, 10]]), SamplingParams(n=2, use_beam_search=True, **common), use_tqdm=False)[0]
    assert sampled.token_ids == forced and sampled.cumulative_logprob < -1.0
    best = beams.outputs[0]  # (the other beam holds a token the processor ruled out)
    assert best.token_ids == forced and best.cumulative_logprob == pytest.approx(sampled.cumulative_logprob, abs=1e-4)


def test_logprob_ranks_are_positions_with_the_chosen_token_first():
    """vLLM's dict: the chosen token first, the top entries ranked by position; a chosen token
    tied with the last of them ranks after them (the kernel's rank counts the tokens at least as
    likely, itself included)."""
    from types import SimpleNamespace

    from pagedlm.engine.llm_engine import LLMEngine
    from pagedlm.step import TopLogprobs

    group = SimpleNamespace(sampling_params=SimpleNamespace(detokenize=False))
    top = TopLogprobs(3, [5, 7], [-0.5, -1.0])
    tied = LLMEngine._logprob_dict(None, group, [], 9, -1.0, top)
    assert [(t, lp.rank) for t, lp in tied.items()] == [(9, 3), (5, 1), (7, 2)]
    among = LLMEngine._logprob_dict(None, group, [], 7, -1.0, top)
    assert [(t, lp.rank, lp.logprob) for t, lp in among.items()] == [(7, 2, -1.0), (5, 1, -0.5)]


def test_logprobs_minus_one_returns_the_whole_vocabulary(llm, hf):
    """vLLM's ``logprobs=-1`` / ``prompt_logprobs=-1``: every token's log-probability."""
    prompt = PROMPTS[0]
    out = llm.generate(_ids([prompt]), SamplingParams(temperature=0, max_tokens=1, logprobs=-1, prompt_logprobs=-1),
                       use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    entry = out.outputs[0].logprobs[0]
    assert len(entry) == VOCAB_SIZE and sorted(lp.rank for lp in entry.values()) == list(range(1, VOCAB_SIZE + 1))
    assert max(abs(entry[t].logprob - ref[-1, t].item()) for t in range(VOCAB_SIZE)) < 1e-4
    assert all(len(p) == VOCAB_SIZE for p in out.prompt_logprobs[1:])
    with pytest.raises(ValueError, match="logprobs must be None, -1 .the whole vocabulary. or >= 0, got -2"):
        SamplingParams(logprobs=-2)


def test_llm_seed_makes_unseeded_sampling_repeat(llama_dir):
    """``LLM(seed=)`` (vLLM's argument): completions without a seed of their own draw from the
    engine's generator, so a run repeats itself, and another seed gives other samples. The
    default is vLLM's 0 (found by a hunt: it was None, so unseeded runs never repeated)."""
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)

    def sample(**seed):
        with LLM(llama_dir, dtype="float32", **seed) as llm:
            return [o.outputs[0].token_ids for o in llm.generate(_ids(PROMPTS), params, use_tqdm=False)]

    first = sample(seed=7)
    assert sample(seed=7) == first and sample(seed=8) != first
    assert sample() == sample(seed=0) != first
    with pytest.raises(ValueError, match="seed must be None or an int"):
        LLM(llama_dir, seed="7")


def test_allowed_token_ids_and_logit_bias_steer_sampling_and_logprobs_stay_raw(llm, hf):
    """vLLM's ``allowed_token_ids`` (the argmax among them) and OpenAI's ``logit_bias`` (string ids,
    clamped to [-100, 100]); the reported logprobs are the model's own."""
    prompt = PROMPTS[1]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    allowed = [10, 20, 30, 40]
    out = llm.generate(_ids([prompt]), SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=allowed, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    token = out.token_ids[0]
    assert token == max(allowed, key=lambda t: ref[t].item())
    assert out.logprobs[0][token].logprob == pytest.approx(ref[token].item(), abs=1e-4)
    biased = llm.generate(_ids([prompt]), SamplingParams(temperature=0.7, seed=1, max_tokens=6, ignore_eos=True,
                                                         logit_bias={"42": 1000}), use_tqdm=False)[0].outputs[0]
    assert biased.token_ids == [42] * 6
    sampled = llm.generate(_ids([prompt]), SamplingParams(temperature=1.0, seed=2, max_tokens=30, ignore_eos=True,
                                                          allowed_token_ids=allowed), use_tqdm=False)[0].outputs[0]
    assert set(sampled.token_ids) <= set(allowed)
    with pytest.raises(ValueError, match=r"allowed_token_ids \[999\] are outside the vocabulary"):
        llm.generate(_ids([prompt]), SamplingParams(allowed_token_ids=[999]), use_tqdm=False)
    with pytest.raises(ValueError, match=r"logit_bias values \(biases\) must be a number"):
        SamplingParams(logit_bias={5: "high"})
    with pytest.raises(ValueError, match=r"logit_bias keys \(token ids\) must be an int, got 'a'"):
        SamplingParams(logit_bias={"a": 1.0})  # said "logit_bias must be an int", as if the whole field


def test_bad_words_are_never_generated(llama_dir):
    """vLLM's ``bad_words``: a one-token word is never sampled, a longer word's last token never
    right after the rest of it. Greedy, so the words are taken from what the model does generate."""
    from pagedlm.engine.bad_words import banned_by_bad_words, bad_words_token_ids

    llm = LLM(llama_dir, dtype="float32")
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    free = llm.generate(_ids(PROMPTS[:1]), params, use_tqdm=False)[0].outputs[0]
    word = tok.decode(free.token_ids[3:5])  # two of the tokens it generates, as text
    sequences = bad_words_token_ids(tok, [word])
    assert any(ids == free.token_ids[3:5] for ids in sequences)
    out = llm.generate(_ids(PROMPTS[:1]), params.clone(bad_words=[word]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:4] == free.token_ids[:4] and out.token_ids[4] != free.token_ids[4]
    for end in range(len(out.token_ids)):
        assert out.token_ids[end] not in banned_by_bad_words(sequences, out.token_ids[:end])
    assert banned_by_bad_words([[7], [1, 2, 3]], [9, 1, 2]) == {7, 3} and banned_by_bad_words([[1, 2, 3]], [2]) == set()
    with pytest.raises(ValueError, match="bad_words must be None or a list of non-blank strings"):
        SamplingParams(bad_words=[" "])


def test_a_bad_word_the_tokenizer_drops_is_refused(llama_dir, tmp_path):
    """A word the normalizer removes whole (a lone combining accent under an accent-stripping
    normalizer) would ban nothing: refused naming bad_words before anything runs, as vLLM's
    update_from_tokenizer refuses it (found by a hunt: accepted and ignored)."""
    model = shutil.copytree(llama_dir, tmp_path / "model")
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "StripAccents"}]}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    llm = LLM(str(model), dtype="float32")
    assert llm.get_tokenizer().encode("\u0301", add_special_tokens=False) == []
    params = SamplingParams(temperature=0, max_tokens=2, bad_words=["ok", "\u0301"])
    with pytest.raises(ValueError, match=r"bad_words entry '\u0301' tokenizes to no token.*could ban nothing"):
        llm.generate(_ids(PROMPTS[:2]), params, use_tqdm=False)
    [(index, error)] = [r for r in llm.generate_as_completed(_ids(PROMPTS[:1]), params, return_errors=True)]
    assert index == 0 and error.field == "bad_words"
    assert llm.generate(_ids(PROMPTS[:1]), params.clone(bad_words=["ok"]), use_tqdm=False)[0].outputs[0].token_ids


def test_allowed_token_ids_that_bans_cover_entirely_are_refused(llm):
    """Every allowed id a stop token while min_tokens holds, or a one-token bad word: nothing could
    be sampled (the kernel took an all -inf row's first id, outside allowed_token_ids)."""
    word = llm.get_tokenizer().decode([7])
    for params in (SamplingParams(allowed_token_ids=[EOS], min_tokens=2, max_tokens=4),
                   SamplingParams(allowed_token_ids=[EOS], min_tokens=2, max_tokens=4, ignore_eos=True),
                   SamplingParams(allowed_token_ids=[7], bad_words=[word], max_tokens=4),
                   SamplingParams(allowed_token_ids=[EOS, 7], bad_words=[word], min_tokens=1, max_tokens=4)):
        with pytest.raises(ValueError, match=r"allowed_token_ids \[.*\] are all banned at some step"):
            llm.generate(_ids([[BOS, 5]]), params, use_tqdm=False)
    out = llm.generate(_ids([[BOS, 5]]), SamplingParams(allowed_token_ids=[EOS, 7], min_tokens=2, max_tokens=4),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:2] == [7, 7]
    # Without allowed_token_ids, the whole vocabulary (found by a hunt: a request of 0 tokens ended
    # "abort" and counted as completed).
    vocab_size = llm.llm_engine.vocab_size
    every_stop = SamplingParams(stop_token_ids=list(range(vocab_size)), min_tokens=3, max_tokens=4)
    with pytest.raises(ValueError, match="every token of the vocabulary is banned at some step"):
        llm.generate(_ids([[BOS, 5]]), every_stop, use_tqdm=False)
    assert llm.llm_engine.check_request([BOS, 5], every_stop).field == "stop_token_ids"
    out = llm.generate(_ids([[BOS, 5]]), SamplingParams(stop_token_ids=list(range(vocab_size - 1)), min_tokens=1,
                                                        max_tokens=2, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] == vocab_size - 1 or out.token_ids[0] == EOS


def test_stop_strings_that_are_not_valid_unicode_are_refused():
    """Found by a hunt: a lone surrogate (a JSON input's escape) was taken as a stop string that the
    output's text, valid Unicode, could never hold (bad_words refused it: the same kind)."""
    for stop in ("\ud800", ["ok", "x\udc80"]):
        with pytest.raises(ValueError, match="stop strings must be valid Unicode") as exc:
            SamplingParams(stop=stop)
        assert exc.value.field == "stop"


def test_a_beam_search_decodes_its_beams_once_unless_streamed(llm, monkeypatch):
    """Found by a soak hunt: every live beam was decoded whole at every step (17.7 ms a step at 1,000
    tokens against 2.1 without text). Now only a CUMULATIVE output decodes live beams; the text is the same."""
    from pagedlm.engine import llm_engine
    from pagedlm.sampling_params import RequestOutputKind

    calls = []
    decode = llm_engine.decode_completion
    monkeypatch.setattr(llm_engine, "decode_completion", lambda *args: calls.append(1) or decode(*args))
    params = SamplingParams(use_beam_search=True, best_of=3, n=2, temperature=0, max_tokens=12, ignore_eos=True)
    final = llm.generate({"prompt_token_ids": [BOS, 5, 6]}, params, use_tqdm=False)[0]
    assert len(calls) == 2  # the two results
    engine = llm.llm_engine
    engine.add_request("streamed", [BOS, 5, 6], params.clone(output_kind=RequestOutputKind.CUMULATIVE))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(calls) > 2 + 12  # live beams decoded at each step
    tok = llm.get_tokenizer()
    assert [c.text for c in outs[-1].outputs] == [c.text for c in final.outputs] == \
        [tok.decode(c.token_ids) for c in final.outputs]
    assert all(c.text == tok.decode(c.token_ids) for o in outs[:-1] for c in o.outputs)


def test_prompt_logprob_token_ids_score_each_row_as_hf_log_softmax(llama_dir, hf):
    """vLLM's ``prompt_logprob_token_ids``: row ``i`` scores its ids as prompt token
    ``prompt_logprob_start + i + 1``, -inf where padded; over prompt chunks (a 16-token step
    budget), again on a prefix-cache hit of the same prompt, and for a request split into child
    requests (n above max_num_seqs), whose first child scores the prompt."""
    llm = LLM(llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=16)
    prompt = PROMPTS[1]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for start in (None, 7):
        first = start or 0
        rows = [[(3 * i + j) % VOCAB_SIZE for j in range(1 + i % 3)] for i in range(len(prompt) - 1 - first)]
        params = SamplingParams(temperature=0.5, seed=3, n=6, max_tokens=2, prompt_logprob_token_ids=rows,
                                prompt_logprob_start=start, prompt_logprobs=0)
        for out in llm.generate(_ids([prompt, prompt]), params, use_tqdm=False):
            scores = out.prompt_token_id_logprobs
            assert scores.dtype == np.float32 and scores.shape == (len(rows), 3) and len(out.outputs) == 6
            for i, row in enumerate(rows):
                expected = [ref[first + i, t].item() for t in row] + [float("-inf")] * (3 - len(row))
                assert scores[i].tolist() == pytest.approx(expected, abs=1e-4)
                # The prompt token's own score is its prompt logprob's, to the bit.
                if prompt[first + i + 1] in row:
                    assert scores[i, row.index(prompt[first + i + 1])] == np.float32(
                        out.prompt_logprobs[first + i + 1][prompt[first + i + 1]].logprob)
    unscored = llm.generate(_ids([prompt]), SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert unscored.prompt_token_id_logprobs is None


def test_prompt_scores_made_a_few_rows_of_logits_at_a_time_are_the_same(llama_dir, monkeypatch):
    """Prompt logprobs and prompt_logprob_token_ids' scores come from logits made
    ``_PROMPT_ROWS_PER_PASS`` rows at a time (1,024: a 2,048-token chunk of a 152k vocabulary
    would take 1.2 GB at once); the passes give the values one pass gives, to the bit."""
    from pagedlm.worker import model_runner

    prompt = PROMPTS[1]
    params = SamplingParams(max_tokens=1, prompt_logprobs=2, prompt_logprob_token_ids=[[4, 9]] * (len(prompt) - 1))
    llm = LLM(llama_dir, dtype="float32")
    whole = llm.generate(_ids([prompt]), params, use_tqdm=False)[0]
    monkeypatch.setattr(model_runner, "_PROMPT_ROWS_PER_PASS", 7)
    passes = llm.generate(_ids([prompt]), params, use_tqdm=False)[0]
    assert passes.prompt_logprobs == whole.prompt_logprobs and len(whole.prompt_logprobs) == len(prompt)
    assert (passes.prompt_token_id_logprobs == whole.prompt_token_id_logprobs).all()


def test_prompt_logprob_token_ids_are_checked_against_the_prompt_and_model(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_logprobs=2)
    prompt = _ids([PROMPTS[0]])  # 5 tokens: 4 scored rows
    for rows, start, message in [
        ([[1]] * 3, None, r"prompt_logprob_token_ids has 3 rows, but the prompt has 4 scored rows"),
        ([[1]] * 4, 1, r"has 4 rows, but the prompt has 3 scored rows \(prompt_len - 1 - prompt_logprob_start\)"),
        ([[1], [VOCAB_SIZE], [1], [1]], None, rf"prompt_logprob_token_ids \[{VOCAB_SIZE}\] are outside the vocabulary"),
        ([[1, 2, 3]] * 4, None, r"has 3 ids a row, over max_logprobs \(2\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, SamplingParams(prompt_logprob_token_ids=rows, prompt_logprob_start=start),
                         use_tqdm=False)


def test_trace_decode_token_ids_force_the_tokens_and_report_their_model_logprobs(llama_dir, hf):
    """vLLM's trace replay: the trace's tokens whatever the sampling says, with the model's own
    log-probabilities of them (HF's log-softmax of the traced sequence) and ranks; the completion
    ends with the trace ("length"), at ``max_tokens`` when shorter, and where ``max_model_len``
    ends; an EOS in the trace does not end it, and stop, stop_token_ids and min_tokens are refused
    (found by a hunt: EOS and stops ended it, where vLLM's input processor clears them all so the
    trace replays whole)."""
    llm = LLM(llama_dir, dtype="float32", enable_trace_replay=True, max_model_len=64)
    prompt, trace = PROMPTS[0], [300, 7, 7, 150, 42, 9]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + trace])).logits[0].float(), dim=-1)
    for params in (SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=1.0, seed=5, top_k=3, logprobs=1,
                                                                             repetition_penalty=1.5, logit_bias={7: -50})):
        out = llm.generate(_ids([prompt]), params.clone(trace_decode_token_ids=trace), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == trace and out.finish_reason == "length"
        for step, (token, entry) in enumerate(zip(trace, out.logprobs)):
            expected = ref[len(prompt) - 1 + step]
            assert entry[token].logprob == pytest.approx(expected[token].item(), abs=1e-4)
            assert entry[token].rank == int((expected > expected[token]).sum()) + 1
    cut = llm.generate(_ids([prompt]), SamplingParams(max_tokens=2, trace_decode_token_ids=trace), use_tqdm=False)
    assert cut[0].outputs[0].token_ids == trace[:2]
    whole = llm.generate(_ids([prompt]), SamplingParams(trace_decode_token_ids=[5, EOS, 6]), use_tqdm=False)
    assert whole[0].outputs[0].token_ids == [5, EOS, 6] and whole[0].outputs[0].finish_reason == "length"
    for field in ({"stop": ["x"]}, {"stop_token_ids": [6]}, {"min_tokens": 1}):
        with pytest.raises(ValueError, match=f"replays the whole trace, so {next(iter(field))} would change nothing"):
            SamplingParams(trace_decode_token_ids=[5, EOS, 6], **field)
    long = llm.generate(_ids([prompt]), SamplingParams(trace_decode_token_ids=[9] * 100), use_tqdm=False)[0].outputs[0]
    assert long.token_ids == [9] * (64 - len(prompt)) and long.finish_reason == "length"
    with pytest.raises(ValueError, match=r"trace_decode_token_ids needs LLM\(enable_trace_replay=True\)"):
        LLM(llama_dir, dtype="float32").generate(_ids([prompt]), SamplingParams(trace_decode_token_ids=[5]))
    with pytest.raises(ValueError, match=rf"trace_decode_token_ids \[{VOCAB_SIZE}\] are outside the vocabulary"):
        llm.generate(_ids([prompt]), SamplingParams(trace_decode_token_ids=[5, VOCAB_SIZE]))
