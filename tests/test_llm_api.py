"""The user-facing API: prompt forms, output fields, validation, tokenization, stopping, seeds."""

import os
import random
import re
import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import BOS, EOS, VOCAB_SIZE
from pagedlm import BeamSearchParams, LLM, CompletionOutput, RequestOutput, SamplingParams, default_model_path


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(llama_dir, dtype="float32", max_model_len=256)


def test_prompt_forms_and_output_fields(llm):
    tok = llm.get_tokenizer()
    ids = tok("Hello, my name is").input_ids
    outs = llm.generate(
        ["Hello, my name is", {"prompt": "Hello, my name is"}, {"prompt_token_ids": ids}],
        SamplingParams(temperature=0, max_tokens=5), use_tqdm=False,
    )
    assert len(outs) == 3 and all(isinstance(o, RequestOutput) and o.finished for o in outs)
    assert outs[0].prompt == outs[1].prompt == "Hello, my name is" and outs[2].prompt is None
    assert outs[0].prompt_token_ids == outs[2].prompt_token_ids == ids
    assert len({o.request_id for o in outs}) == 3
    first = outs[0].outputs[0]
    assert isinstance(first, CompletionOutput) and first.index == 0
    assert all(o.outputs[0].token_ids == first.token_ids for o in outs)
    assert first.finish_reason == "length" and first.stop_reason is None and len(first.token_ids) == 5
    assert first.cumulative_logprob is None  # without logprobs, as vLLM's
    single = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert single[0].outputs[0].token_ids == first.token_ids
    # vars() and extra attributes work as on vLLM's objects (found against vLLM 0.32: slots refused them).
    assert vars(first)["token_ids"] == first.token_ids and vars(outs[0])["outputs"] == [first]
    outs[0].my_tag = 1
    # vLLM's RequestOutput is a plain class: equal only to itself and hashable (a hunt: a dataclass's
    # value equality made it unhashable, so a set or a dict keyed by outputs raised TypeError).
    again = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert len({outs[0], again, outs[0]}) == 2 and outs[0] == outs[0] and outs[0] != again


def test_special_tokens_added_once(llm):
    tok = llm.get_tokenizer()
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_token_ids == tok("The capital of France is").input_ids
    assert out.prompt_token_ids[0] == BOS and out.prompt_token_ids[1] != BOS


def test_a_prompt_past_the_tokenizers_model_max_length_gets_no_transformers_warning(tokenizer_dir, caplog):
    """Found by a docs walk: a row too long for the model printed transformers' "Token indices
    sequence length is longer than the specified maximum ... will result in indexing errors" beside
    pagedlm's own error naming the row; and a tokenizer's model_max_length is not pagedlm's limit."""
    import transformers

    from pagedlm.transformers_utils.tokenizer import get_tokenizer

    tok = get_tokenizer(tokenizer_dir)
    tok.model_max_length = 8
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            assert len(tok("The capital of France is Paris. " * 4).input_ids) > 8
    finally:
        transformers.logging.disable_propagation()
    assert "Token indices sequence length" not in caplog.text


def test_text_is_incremental_decode_of_tokens(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate(["Hello", "日本語 and Ünïcödé", "12 + 30 ="], SamplingParams(temperature=1.0, seed=3, max_tokens=40), use_tqdm=False)
    for out in outs:
        comp = out.outputs[0]
        full = tok.decode(out.prompt_token_ids + comp.token_ids, skip_special_tokens=True)
        prompt = tok.decode(out.prompt_token_ids, skip_special_tokens=True)
        assert comp.text == full[len(prompt):]


@pytest.mark.parametrize("which", ["smollm2", "byte_level_bpe", "sentencepiece"])
def test_a_completion_after_a_prompt_cut_inside_a_character_holds_no_prompt_text(which, tokenizer_dir, request):
    """Token-id prompts may end inside a character (a continuation of a completion cut by
    max_tokens). The completion's text is what its tokens add after the prompt's whole characters,
    and never the prompt's text (which stop strings and structured outputs would then match; found
    by a hunt: a prompt whose last tokens each ended inside a character gave its whole characters,
    "日本" of "12日本" + half of "語", to the completion, and a space before one); a completion that
    ends inside a character keeps what a full decode shows. Every cut of a sentence, with
    completions of 1, 2 and 6 tokens, and with one that does not finish the prompt's character,
    whose "\ufffd" is the prompt's too (found by a hunt: it began the completion's text)."""
    from transformers import AutoTokenizer

    from pagedlm import default_model_path
    from pagedlm.engine.detokenizer import decode_completion

    where = {"smollm2": default_model_path, "byte_level_bpe": lambda: tokenizer_dir,
             "sentencepiece": lambda: request.getfixturevalue("sentencepiece_llama_dir")}[which]()
    tok = AutoTokenizer.from_pretrained(where)
    ids = tok("The word for 'thank you' is ありがとう, wörld 日本語 and 🙂👍🏽 done", add_special_tokens=False).input_ids
    other = tok(" fox", add_special_tokens=False).input_ids
    for cut in range(1, len(ids)):
        # (A byte-fallback decode of a completion that ends inside a character turns its whole
        # run of byte tokens into "\ufffd", which the incremental text does not: not compared.)
        natural = () if which == "sentencepiece" else (ids[cut: cut + 1], ids[cut: cut + 2], ids[cut: cut + 6])
        for completion in (*natural, other):
            full = tok.decode(ids[:cut] + completion)
            # The prompt's whole characters, or its text at a token where the completion changes none of it.
            candidates = [tok.decode(ids[:j]) for j in range(cut + 1)] + [tok.decode(ids[:cut]).rstrip("\ufffd")]
            expected = full[max(len(c) for c in candidates if full.startswith(c)):]
            texts, end = decode_completion(tok, ids[:cut], completion, SamplingParams())
            assert "".join(texts) + end == expected, (cut, completion)
    if which == "smollm2":  # " \xe5" then "\xe8": a byte no character takes, then one the completion finishes
        assert decode_completion(tok, [13223, 179], [138, 115], SamplingParams()) == (["", "轥"], "")
        assert decode_completion(tok, [13223, 179], [51], SamplingParams()) == (["C"], "")


def test_outputs_in_input_order_with_per_prompt_params(llm):
    prompts = [{"prompt_token_ids": [BOS] + [10 + i] * (3 + 20 * i)} for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=2 + i) for i in range(6)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3, 4, 5, 6, 7]
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in prompts]


def test_bad_inputs_raise_one_error_listing_each(llm):
    engine = llm.llm_engine
    prompts = [
        "fine",
        {"prompt_token_ids": []},
        {"prompt_token_ids": [1, 999999]},
        {"prompt_token_ids": list(range(3, 259))},  # 256 tokens: none left to generate
        {"bogus": 1},
        "also fine",
    ]
    params = [SamplingParams(max_tokens=4)] * 3 + [SamplingParams(max_tokens=50)] + [SamplingParams()] * 2
    with pytest.raises(ValueError) as err:
        llm.generate(prompts, params, use_tqdm=False)
    msg = str(err.value)
    assert "4 of 6 prompts are invalid" in msg
    for i in (1, 2, 3, 4):
        assert f"prompt {i}:" in msg
    assert "prompt 0:" not in msg and "prompt 5:" not in msg
    assert "empty" in msg and "vocabulary" in msg and "max_model_len" in msg
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="sampling_params has 2 entries for 1 prompt[.]"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    conversation = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="sampling_params has 1 entry for 2 conversations[.]"):
        llm.chat([conversation, conversation], [SamplingParams()], use_tqdm=False)


def test_max_tokens_past_max_model_len_stops_there_with_length(llm):
    """As vLLM's check_stop: a sequence ends with "length" at max_model_len (256 here), whatever
    max_tokens asks; the request is not refused."""
    out = llm.generate({"prompt_token_ids": [BOS] + [7] * 249}, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def _pagedlm_log(caplog):
    """Capture the pagedlm logger (it does not propagate to the root logger)."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def capture():
        logger = logging.getLogger("pagedlm")
        level = logger.level
        logger.addHandler(caplog.handler)
        logger.setLevel(logging.INFO)
        try:
            yield caplog
        finally:
            logger.removeHandler(caplog.handler)
            logger.setLevel(level)

    return capture()


def test_a_text_that_starts_with_bos_gets_one_bos_and_a_warning(llm, caplog):
    tok = llm.get_tokenizer()
    expected = tok("The capital of France is").input_ids
    assert expected[0] == BOS and expected[1] != BOS
    params = SamplingParams(temperature=0, max_tokens=4)
    with _pagedlm_log(caplog):
        out = llm.generate([tok.bos_token + "The capital of France is"] * 2, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in out] == [expected, expected]
    assert caplog.text.count("already started with the BOS token") == 1 and "2 prompt(s)" in caplog.text
    assert out[0].outputs[0].token_ids == llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.llm_engine
    engine.add_request("bos", tok.bos_token + "The capital of France is", params)
    finished = [o for o in engine.step() if o.request_id == "bos"]
    assert finished[0].prompt_token_ids == expected
    engine.abort_request("bos")


def test_a_tokenizer_that_adds_no_bos_keeps_a_text_that_starts_with_its_bos_token():
    """Found by a hunt: SmolLM2's tokenizer adds no BOS, yet its bos_token is the chat marker
    <|im_start|>; a text starting with two of them lost one."""
    from pagedlm.transformers_utils.tokenizer import encode_prompts

    tok = AutoTokenizer.from_pretrained(default_model_path())
    text = tok.bos_token * 2 + "user\nhi"
    assert encode_prompts(tok, [text]) == [tok(text).input_ids] and tok(text).input_ids[:2] == [tok.bos_token_id] * 2


def test_an_empty_text_is_the_prompt_the_tokenizer_makes_of_it(llm):
    assert llm.get_tokenizer()("").input_ids == [BOS]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = llm.generate("", params, use_tqdm=False)[0]
    assert out.prompt_token_ids == [BOS]
    assert out.outputs[0].token_ids == llm.generate({"prompt_token_ids": [BOS]}, params, use_tqdm=False)[0].outputs[0].token_ids


def test_stop_token_text_is_left_out_unless_include_stop_str_in_output(llm):
    tok = llm.get_tokenizer()
    prompt = tok("Hello").input_ids
    tokens = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    stop = next(t for t in tokens[3:] if tok.decode([t]).strip())  # a token with visible text
    cut = tokens.index(stop)

    def text_of(ids):
        return tok.decode(prompt + ids, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]

    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop],
                                include_stop_str_in_output=include)
        comp = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0]
        assert comp.token_ids == tokens[: cut + 1] and comp.finish_reason == "stop" and comp.stop_reason == stop
        assert comp.text == text_of(tokens[: cut + 1] if include else tokens[:cut])
    # n > 1 completions take the same path.
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=20, ignore_eos=True, stop_token_ids=[stop])
    for comp in llm.generate("Hello", params, use_tqdm=False)[0].outputs:
        shown = comp.token_ids[:-1] if comp.finish_reason == "stop" else comp.token_ids
        assert comp.text == text_of(shown)


def test_a_stop_tokens_own_text_meets_the_stop_strings_with_include_stop_str_in_output(llm):
    """vLLM 0.32 (a differential hunt): the stop token's text, added by include_stop_str_in_output,
    is checked for stop strings too; one it completes is the stop reason and the text ends there."""
    tok = llm.get_tokenizer()
    stop = next(t for t in range(len(tok)) if t not in tok.all_special_ids and len(tok.decode([t]).strip()) >= 3)
    word = tok.decode([stop])
    for include, text, reason in ((True, word[: word.index(word.strip()[:2]) + 2], word.strip()[:2]), (False, "", stop)):
        params = SamplingParams(max_tokens=5, allowed_token_ids=[stop], stop_token_ids=[stop], stop=[word.strip()[:2]],
                                include_stop_str_in_output=include)
        comp = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0]
        assert (comp.token_ids, comp.text, comp.finish_reason, comp.stop_reason) == ([stop], text, "stop", reason)


def test_tiny_temperatures_sample_at_vllms_least_one():
    """vLLM raises a temperature in (0, 0.01) to 0.01 and samples; it read as greedy here (n>1 refused)."""
    assert SamplingParams(temperature=1e-6, n=2, seed=1).temperature == 0.01
    assert SamplingParams(temperature=0.0).greedy


def test_eos_text_is_left_out_with_skip_special_tokens_false(llm):
    def eos_as_third_token(output_token_ids, logits):
        if len(output_token_ids) == 2:
            logits = torch.full_like(logits, float("-inf"))
            logits[EOS] = 0.0
        return logits

    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=10, skip_special_tokens=False, include_stop_str_in_output=include,
                                logits_processors=[eos_as_third_token])
        comp = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0]
        assert len(comp.token_ids) == 3 and comp.token_ids[-1] == EOS
        assert comp.finish_reason == "stop" and comp.stop_reason is None
        assert comp.text.endswith("</s>") == include


def test_prompt_that_never_fits_the_cache_is_rejected(llama_dir):
    llm = LLM(llama_dir, dtype="float32", num_kv_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate({"prompt_token_ids": list(range(3, 100))}, SamplingParams(max_tokens=1), use_tqdm=False)


def test_stop_token_ids_and_eos(llm):
    greedy = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    tokens = greedy.outputs[0].token_ids
    stop = tokens[5]
    stopped = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]), use_tqdm=False)[0]
    comp = stopped.outputs[0]
    cut = tokens.index(stop)
    if EOS in tokens[:cut]:
        pytest.skip("EOS came first")
    assert comp.token_ids == tokens[: cut + 1]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop


def test_eos_from_generation_config_stops(llama_dir, tmp_path):
    import json
    import shutil

    ref = LLM(llama_dir, dtype="float32").generate("Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    tokens = ref.outputs[0].token_ids
    # Declare the 4th generated token an EOS id in generation_config.json only.
    model_dir = tmp_path / "m"
    shutil.copytree(llama_dir, model_dir)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen["eos_token_id"] = [EOS, tokens[3]]
    (model_dir / "generation_config.json").write_text(json.dumps(gen))
    out = LLM(str(model_dir), dtype="float32").generate("Hello", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == tokens[: tokens.index(tokens[3]) + 1]
    # As vLLM reports it: generation_config's other EOS ids are stop tokens, named by stop_reason.
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == tokens[3]
    ignored = LLM(str(model_dir), dtype="float32").generate("Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert ignored.outputs[0].token_ids == tokens
    # Found by a hunt: a generation_config directory's EOS ids were not read, the model's were (vLLM
    # reads the directory's file for both); "vllm" keeps the model's EOS ids, as vLLM does.
    given = tmp_path / "given"
    given.mkdir()
    (given / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, tokens[3]]}))
    params = SamplingParams(temperature=0, max_tokens=12)
    out = LLM(llama_dir, dtype="float32", generation_config=str(given)).generate("Hello", params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == tokens[: tokens.index(tokens[3]) + 1]
    (given / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    out = LLM(str(model_dir), dtype="float32", generation_config=str(given)).generate("Hello", params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == tokens
    out = LLM(str(model_dir), dtype="float32", generation_config="vllm").generate("Hello", params, use_tqdm=False)[0]
    assert out.outputs[0].stop_reason == tokens[3]


def test_seed_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    alone = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=10)] * 5
    batch = llm.generate(["x", "Hello, my", "Hello", "yy", "The capital", "z"], others[:2] + [params] + others[2:], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    different = llm.generate("Hello", SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=16), use_tqdm=False)
    assert different[0].outputs[0].token_ids != alone


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    top1 = llm.generate("Hello", SamplingParams(temperature=0.7, top_k=1, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_min_tokens_suppresses_stop_tokens(llm):
    greedy = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    stop = greedy.outputs[0].token_ids[1]
    out = llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=12, min_tokens=4, stop_token_ids=[stop], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids[0] == greedy.outputs[0].token_ids[0]
    assert stop not in out.token_ids[:4]
    assert len(out.token_ids) >= 4


def test_default_max_tokens_runs_to_max_model_len(llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_model_len=40)
    out = llm.generate({"prompt_token_ids": [BOS, 5, 6, 7]}, SamplingParams(temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 36 and out.outputs[0].finish_reason == "length"


def test_progress_bar_reports_throughput(llm, capsys):
    llm.generate(["a", "b"], SamplingParams(max_tokens=3), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "output:" in err and "toks/s" in err


@pytest.mark.parametrize("second_interrupt", [False, True])
def test_interrupted_generate_leaves_engine_clean(llm, monkeypatch, second_interrupt):
    """An interrupt aborts the call's requests. Found by a hunt: a second Ctrl-C landing in the
    abort of the first one's clean-up skipped the reset of the call's state, and every later call
    said the LLM was "already running"."""
    import signal

    engine = llm.llm_engine
    real_step, real_abort = engine.step, type(engine).abort_request
    calls = {"n": 0}

    def interrupted_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step()

    def abort_interrupted(self, request_ids):
        signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, before the abort has run
        real_abort(self, request_ids)

    monkeypatch.setattr(engine, "step", interrupted_step)
    if second_interrupt:
        monkeypatch.setattr(type(engine), "abort_request", abort_interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a", "b", "c"], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_kv_blocks
    assert len(llm.generate(["a"], SamplingParams(max_tokens=2), use_tqdm=False)) == 1


def test_the_garbage_collector_frees_an_llm_and_the_users_objects_in_reference_cycles(llama_dir):
    """Found by a hunt: the engine froze the whole heap out of the cyclic GC (gc.freeze), so a
    user's object in a cycle, made before the LLM, and an LLM held in a cycle were never freed."""
    import gc
    import weakref

    class Holder:
        def __init__(self, value):
            self.value = value
            self.me = self  # a reference cycle

    users = Holder(bytearray(1024))
    llm = Holder(LLM(llama_dir, dtype="float32", num_kv_blocks=16))
    llm.value.generate(["a"], SamplingParams(max_tokens=2), use_tqdm=False)
    refs = [weakref.ref(users), weakref.ref(llm.value)]
    del users, llm
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


@pytest.mark.parametrize("where", ["Scheduler._add", "BlockSpaceManager.can_append_slots", "BlockSpaceManager.allocate",
                                   "ModelRunner.execute_model"])
def test_an_interrupt_inside_a_step_leaves_the_same_outputs_and_no_leak(llama_dir, monkeypatch, where):
    """Found by a hunt: an interrupt inside scheduling dropped groups from both queues (leaked
    blocks, a later hang) or left prompt blocks keyed but never written (a later prefix-cache hit
    gave other tokens). The step now requeues every request to be computed again."""
    import pagedlm.engine.block_manager as block_manager
    import pagedlm.engine.scheduler as scheduler
    import pagedlm.worker.model_runner as model_runner

    llm = LLM(llama_dir, dtype="float32", num_kv_blocks=12, block_size=8)
    prompts = [[BOS] + list(range(40, 81)), [BOS, 5, 6, 7], [BOS] + list(range(40, 70))]
    params = [SamplingParams(temperature=0.8, seed=i, n=2, max_tokens=12, ignore_eos=True) for i in range(3)]

    def run():
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[c.token_ids for c in o.outputs] for o in outs]

    expected = run()
    module = {"Scheduler": scheduler, "BlockSpaceManager": block_manager, "ModelRunner": model_runner}[where.split(".")[0]]
    cls, name = getattr(module, where.split(".")[0]), where.split(".")[1]
    real, calls = getattr(cls, name), {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    stats = llm.get_stats()
    assert not llm.llm_engine.has_unfinished_requests() and stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert run() == expected


def test_stepping_on_after_an_interrupt_past_the_draws_gives_the_uninterrupted_outputs(llm, monkeypatch):
    """An interrupt after the seeded generators drew the step's random numbers (in the sampler's
    logprobs pass): the step's draws are undone with it, so stepping on draws them again."""
    import pagedlm.model_executor.layers.sampler as sampler

    engine = llm.llm_engine
    params = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=42, logprobs=1, ignore_eos=True)

    def run() -> list[list[int]]:
        engine.add_request("seeded", {"prompt_token_ids": [BOS, 17, 33, 50, 90]}, params)
        done = None
        while engine.has_unfinished_requests():
            try:
                done = next((o for o in engine.step() if o.finished), done)
            except KeyboardInterrupt:
                pass
        return [c.token_ids for c in done.outputs]

    expected = run()
    real, calls = sampler.rank_and_top_logprobs, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (4, 9):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler, "rank_and_top_logprobs", interrupted)
    assert run() == expected and calls["n"] > 9


@pytest.mark.parametrize("where", ["BlockAllocator.free", "LLMEngine._append"])
def test_a_ctrl_c_while_the_engine_changes_its_state_waits_for_the_change(llama_dir, monkeypatch, where):
    """A SIGINT landing half-way through applying a step's outputs, an abort or an add left blocks
    freed from a table but not from the allocator (a leak, or a later double free) or a token
    without its logprobs. Such changes now hold the signal until they end (``deferred_signals``)."""
    import signal

    import pagedlm.engine.block_manager as block_manager
    import pagedlm.engine.llm_engine as llm_engine

    llm = LLM(llama_dir, dtype="float32", num_kv_blocks=24, block_size=8)
    prompts = [[BOS] + list(range(40, 81)), [BOS, 5, 6, 7], [BOS] + list(range(40, 70))]
    params = [SamplingParams(temperature=0.8, seed=i, n=2, max_tokens=12, ignore_eos=True, logprobs=2) for i in range(3)]

    def run():
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[(c.token_ids, [sorted(d) for d in c.logprobs]) for c in o.outputs] for o in outs]

    expected = run()
    module = {"BlockAllocator": block_manager, "LLMEngine": llm_engine}[where.split(".")[0]]
    cls, name = getattr(module, where.split(".")[0]), where.split(".")[1]
    real, calls = getattr(cls, name), {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # delivered at the next bytecode, inside the change
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    assert calls["n"] >= 3
    stats = llm.get_stats()
    assert not llm.llm_engine.has_unfinished_requests() and stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert run() == expected


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _interrupt_at_entry(monkeypatch, module) -> list[int]:
    """``module.deferred_signals`` raising KeyboardInterrupt at its first entry (where the hold is
    not in place yet: as a SIGINT landing in its set-up), then the real one."""
    import contextlib

    from pagedlm.utils import deferred_signals

    entered = [0]

    @contextlib.contextmanager
    def interrupted_at_entry():
        entered[0] += 1
        if entered[0] == 1:
            raise KeyboardInterrupt
        with deferred_signals():
            yield

    monkeypatch.setattr(module, "deferred_signals", interrupted_at_entry)
    return entered


def test_an_interrupt_while_a_clean_up_sets_up_its_hold_still_cleans_up(llama_dir, monkeypatch):
    """Found by a hunt: a SIGINT landing in deferred_signals' own set-up skipped the clean-up it
    guarded: generate's end (the LLM then refused every call as "already running") and close()'s
    release; run_uninterrupted runs it again and raises the interrupt after."""
    import pagedlm.utils as utils

    llm = LLM(llama_dir, dtype="float32")
    prompts = [[BOS, 5, 6, 7], [BOS, 9]]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    entered = _interrupt_at_entry(monkeypatch, utils)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert entered[0] >= 2
    monkeypatch.undo()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == expected
    _interrupt_at_entry(monkeypatch, utils)
    with pytest.raises(KeyboardInterrupt):
        llm.close()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(prompts, GREEDY, use_tqdm=False)


def test_an_interrupt_between_the_model_and_the_step_s_hold_drops_the_step(llm, monkeypatch):
    """Found by a hunt: a SIGINT landing after the model ran, before the hold over applying its
    outputs, kept the step's seeded draws and lost its outputs (stepping on gave other tokens)."""
    import pagedlm.engine.llm_engine as llm_engine

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=1, ignore_eos=True)

    def run(interrupt_at: int | None) -> list[int]:
        engine.add_request("seeded", {"prompt_token_ids": [BOS, 17, 33, 50]}, params)
        done, steps = None, 0
        while engine.has_unfinished_requests():
            steps += 1
            if steps == interrupt_at:
                _interrupt_at_entry(monkeypatch, llm_engine)
            try:
                done = next((o for o in engine.step() if o.finished), done)
            except KeyboardInterrupt:
                monkeypatch.undo()
        return list(done.outputs[0].token_ids)

    expected = run(None)
    for step in (1, 2, 4):
        assert run(step) == expected, step


def test_an_interrupt_as_wait_for_completion_takes_the_queue_leaves_it_queued(llama_dir, monkeypatch):
    """Found by a hunt: a SIGINT in the loop that numbers the taken queue's requests (before the
    code that puts them back on an interrupt) lost every queued request."""
    import pagedlm.entrypoints.llm as llm_module

    llm = LLM(llama_dir, dtype="float32")
    llm.enqueue([[BOS, 5, 6], [BOS, 7]], GREEDY, use_tqdm=False)

    def interrupted(items):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm_module, "enumerate", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        llm.wait_for_completion(use_tqdm=False)
    monkeypatch.undo()
    assert len(llm.wait_for_completion(use_tqdm=False)) == 2


def test_a_signal_raising_while_deferred_signals_installs_its_hold_restores_every_handler(monkeypatch):
    """Found by a review: a SIGTERM whose handler raises (a job's), landing after SIGINT's hold was
    installed and before SIGTERM's, left SIGINT on the hold for good (every later Ctrl-C swallowed)."""
    import signal

    from pagedlm.utils import deferred_signals

    class Stop(Exception):
        pass

    def term(signum, frame):
        raise Stop

    original_int, original_term = signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, term)
    real, fired = signal.signal, []

    def racing(signum, handler):
        previous = real(signum, handler)
        if signum == signal.SIGINT and not fired:  # SIGTERM arrives just after SIGINT's hold is in
            fired.append(True)
            term(signal.SIGTERM, None)
        return previous

    try:
        monkeypatch.setattr(signal, "signal", racing)
        with pytest.raises(Stop):
            with deferred_signals():
                pass
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is original_int and signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGTERM, original_term)


def test_deferred_signals_deliver_sigterm_first_and_restore_every_handler():
    """Found by a review: with both signals held, the first delivery's exception lost the second
    (a scheduler's SIGTERM), and a signal between two handler restores left a holding handler."""
    import signal

    from pagedlm.utils import deferred_signals

    calls = []

    def on_term(signum, frame):
        calls.append("term")
        raise SystemExit(143)

    previous_term = signal.signal(signal.SIGTERM, on_term)
    try:
        with pytest.raises(SystemExit):
            with deferred_signals():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
                calls.append("block ran to its end")
        assert calls == ["block ran to its end", "term"]
        assert signal.getsignal(signal.SIGTERM) is on_term and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def test_a_ctrl_c_inside_an_abort_frees_every_block(llm, monkeypatch):
    import signal

    from pagedlm.engine.block_manager import BlockAllocator

    engine = llm.llm_engine
    for i in range(3):
        engine.add_request(str(i), [BOS] + list(range(5, 30)),
                           SamplingParams(n=2, temperature=1, seed=i, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    real, calls = BlockAllocator.free, {"n": 0}

    def interrupted(self, block):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)
        return real(self, block)

    monkeypatch.setattr(BlockAllocator, "free", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.abort_request(["0", "1", "2"])
    assert calls["n"] > 2 and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_kv_blocks


def test_generate_refuses_while_requests_added_directly_are_unfinished(llm):
    """Found by a hunt: their outputs reached generate's bookkeeping as a bare KeyError."""
    engine = llm.llm_engine
    engine.add_request("mine", [BOS, 5], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="unfinished requests added with llm_engine.add_request"):
        llm.generate("x", SamplingParams(max_tokens=1), use_tqdm=False)
    engine.abort_request("mine")
    assert len(llm.generate("x", SamplingParams(max_tokens=1), use_tqdm=False)) == 1


def test_engine_add_request_takes_vllm_s_arguments(llm):
    """Found against vLLM 0.32: its add_request(request_id, prompt, params, arrival_time, ...) takes
    every prompt form; pagedlm's took (prompt text, params, prompt_token_ids)."""
    engine = llm.llm_engine
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    text = "The capital of France is"
    ids = llm.get_tokenizer()(text).input_ids
    forms = {"str": text, "text": {"prompt": text}, "tokens": {"prompt_token_ids": ids}, "list": ids,
             "echo": {"prompt_token_ids": ids, "prompt": "shown"}}
    for i, (name, prompt) in enumerate(forms.items()):
        assert engine.add_request(name, prompt, greedy, time.monotonic() + i, None, None,
                                  priority=np.int64(0) if name == "list" else 0) == name
    assert engine.get_num_unfinished_requests() == 5 and engine.get_tokenizer() is llm.get_tokenizer()
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert {tuple(o.outputs[0].token_ids) for o in finished.values()} == {tuple(finished["str"].outputs[0].token_ids)}
    assert {name: o.prompt for name, o in finished.items()} == {
        "str": text, "text": text, "tokens": None, "list": None, "echo": "shown"}
    assert all(o.prompt_token_ids == ids for o in finished.values())
    with pytest.raises(TypeError, match="request_id must be a str, got int"):
        engine.add_request(7, text, greedy)
    for kwargs, match in [({"priority": 1}, "priority must be 0"), ({"priority": 0.0}, "priority must be 0"),
                          ({"priority": False}, "priority must be 0"), ({"priority": np.int64(2)}, "priority must be 0"),
                          ({"trace_headers": {}}, "trace_headers: pagedlm exports no traces"),
                          ({"lora_request": object()}, "lora_request: pagedlm runs no LoRA"),
                          ({"tokenization_kwargs": {"truncation": True}}, "unknown key.s. 'truncation'")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request("x", text, greedy, **kwargs)
    with pytest.raises(ValueError, match="unknown prompt key 'token_type_ids'"):
        engine.add_request("x", {"prompt": text, "token_type_ids": [0]}, greedy)
    assert not engine.has_unfinished_requests()


def test_a_prompt_in_chunks_makes_no_output_until_it_samples(llama_dir):
    """Found against vLLM 0.32: a step that prefilled a chunk of a prompt returned its request with
    no tokens (``outputs[0].token_ids[-1]`` raised IndexError); vLLM returns nothing for it."""
    with LLM(llama_dir, dtype="float32", max_num_batched_tokens=32, max_num_seqs=4, num_kv_blocks=64) as llm:
        engine = llm.llm_engine
        engine.add_request("long", [BOS] + list(range(5, 105)), SamplingParams(max_tokens=3, ignore_eos=True))
        steps = []
        while engine.has_unfinished_requests():
            steps.append(engine.step())
        assert len(steps) == 6 and steps[:3] == [[], [], []]  # 101 prompt tokens in chunks of 32
        assert [len(outs[0].outputs[0].token_ids) for outs in steps[3:]] == [1, 2, 3]


def test_step_reports_every_scheduled_request_until_it_finishes_and_abort_frees_it(llm):
    engine = llm.llm_engine
    greedy = dict(temperature=0, ignore_eos=True)
    engine.add_request("a", [BOS, 5, 6], SamplingParams(max_tokens=4, **greedy))
    engine.add_request("b", [BOS, 7, 8], SamplingParams(max_tokens=200, **greedy))
    with pytest.raises(ValueError, match="already running"):
        engine.add_request("a", [BOS, 5, 6], SamplingParams(max_tokens=4, **greedy))
    outs = engine.step()
    assert [(o.request_id, o.finished, len(o.outputs[0].token_ids)) for o in outs] == [("a", False, 1), ("b", False, 1)]
    snapshot = outs[0].outputs[0]
    finished = {}
    while "a" not in finished:
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert len(snapshot.token_ids) == 1 and snapshot.finish_reason is None  # a snapshot, not a live view
    done = finished["a"].outputs[0]
    assert done.finish_reason == "length" and done.text == llm.get_tokenizer().decode(done.token_ids)
    assert [o.request_id for o in engine.step()] == ["b"]  # a finished request is not reported again
    # Found by a hunt: with an empty queue, wait_for_completion returned [] and left "b" unfinished
    # (with one queued it raised); both raise now.
    with pytest.raises(RuntimeError, match="engine holds unfinished requests added with llm_engine.add_request"):
        llm.wait_for_completion(use_tqdm=False)
    engine.abort_request("b", internal=False)  # vLLM's signature (a hunt: a TypeError)
    engine.abort_request(["b", "never-added"])
    with pytest.raises(TypeError, match="internal must be a bool"):
        engine.abort_request("b", internal="no")
    assert not engine.has_unfinished_requests() and engine.step() == []
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_kv_blocks
    alone = llm.generate({"prompt_token_ids": [BOS, 5, 6]}, SamplingParams(max_tokens=4, **greedy), use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == done.token_ids


@pytest.mark.parametrize("abort_at_call", [1, 3])
@pytest.mark.parametrize("victim", [{}, {"n": 2, "temperature": 1.0, "seed": 0}, {"detokenize": False}])
def test_a_request_aborted_by_a_logits_processor_mid_step_gets_nothing_more(llm, victim, abort_at_call):
    """Found by a hunt: the step applied its outputs to a request aborted while the model ran
    (from another request's logits processor): a KeyError that stranded the other request's
    finished output and left the engine stepping forever, or an output after the abort."""
    engine = llm.llm_engine
    calls = []

    def abort_b(token_ids, logits):
        calls.append(1)
        if len(calls) == abort_at_call:
            engine.abort_request("b")
        return logits

    greedy = dict(temperature=0, ignore_eos=True, max_tokens=3)
    engine.add_request("a", [BOS, 5, 6], SamplingParams(logits_processors=[abort_b], **greedy))
    engine.add_request("b", [BOS, 7, 8], SamplingParams(**{**greedy, "max_tokens": 10, **victim}))
    outputs = []
    for _ in range(10):
        if not engine.has_unfinished_requests():
            break
        outputs += [(len(calls), o) for o in engine.step()]
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_kv_blocks
    assert all(at < abort_at_call for at, o in outputs if o.request_id == "b")
    final = [o for _, o in outputs if o.request_id == "a" and o.finished]
    alone = llm.generate({"prompt_token_ids": [BOS, 5, 6]}, SamplingParams(**greedy), use_tqdm=False)[0]
    assert [o.outputs[0].token_ids for o in final] == [alone.outputs[0].token_ids]


def test_generate_whose_request_a_logits_processor_aborts_raises_instead_of_waiting(llm):
    """It waited forever for the aborted request's output."""
    engine = llm.llm_engine

    def abort_the_other(token_ids, logits):
        engine.abort_request(list(engine.seq_groups)[1:])  # the second prompt's
        return logits

    params = [SamplingParams(max_tokens=3, logits_processors=[abort_the_other]), SamplingParams(max_tokens=3)]
    with pytest.raises(RuntimeError, match="prompt\\(s\\) 1 of this call were aborted with llm_engine.abort_request"):
        llm.generate([{"prompt_token_ids": [BOS, 5]}, {"prompt_token_ids": [BOS, 6]}], params, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert llm.generate({"prompt_token_ids": [BOS, 5]}, SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
    got = dict(llm.generate_as_completed([{"prompt_token_ids": [BOS, 5]}, {"prompt_token_ids": [BOS, 6]}], params,
                                         use_tqdm=False, return_errors=True))
    assert got[0].finished and isinstance(got[1], ValueError) and "aborted" in str(got[1])


def test_failure_while_adding_requests_leaves_nothing_queued(llm, monkeypatch):
    engine = llm.llm_engine
    real_add = engine.add_request
    added = []

    def add_then_fail(request_id, *args, **kwargs):
        if added:
            raise RuntimeError("tokenizer died")
        added.append(request_id)
        return real_add(request_id, *args, **kwargs)

    monkeypatch.setattr(engine, "add_request", add_then_fail)
    with pytest.raises(RuntimeError, match="tokenizer died"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=3), use_tqdm=False)
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_kv_blocks


def test_unsupported_architecture_is_a_clear_error(llama_dir, tmp_path):
    import json
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(llama_dir, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported architectures: LlamaForCausalLM"):
        LLM(str(model_dir))


def test_dtype_auto_and_bad_args(llama_dir):
    assert LLM(llama_dir, num_kv_blocks=8).llm_engine.model_config.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        LLM(llama_dir, dtype="int8")
    with pytest.raises(ValueError, match="block_size"):
        LLM(llama_dir, block_size=12)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(llama_dir, max_model_len=10**6)


def test_float16_checkpoint_runs_in_bfloat16_on_cpu(llama_dir, tmp_path):
    import json
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(llama_dir, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["dtype"] = "float16"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(model_dir), device="cpu", num_kv_blocks=8)
    assert llm.llm_engine.model_config.dtype == torch.bfloat16
    assert LLM(str(model_dir), device="cpu", dtype="float16", num_kv_blocks=8).llm_engine.model_config.dtype == torch.float16


def test_kv_cache_size_is_logged(llama_dir, caplog):
    import logging

    logger = logging.getLogger("pagedlm")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    try:
        LLM(llama_dir, num_kv_blocks=10, block_size=16)
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
    assert "10 blocks = 160 tokens of KV cache" in caplog.text


def _forcing(token_ids: list[int]):
    """A logits processor that makes output position i the token ``token_ids[i]``."""
    def force(output_token_ids, logits):
        logits = torch.full_like(logits, float("-inf"))
        logits[token_ids[len(output_token_ids)]] = 0.0
        return logits
    return force


def test_a_context_that_begins_inside_a_character_adds_no_replacement_characters(sentencepiece_llama_dir):
    """Byte-fallback SentencePiece: the prompt's last 6 tokens begin inside 👍 (byte tokens), which
    a decode shows as "\ufffd"s that later tokens could change; the context then reaches back to a
    whole character (vLLM's fast detokenizer does the same), so neither the text nor a
    ``decoded_token`` carries them."""
    llm = LLM(sentencepiece_llama_dir, dtype="float32")
    tok = llm.get_tokenizer()
    cat = tok.get_vocab()["▁cat"]
    ids = tok("a cat 👍🏽").input_ids
    assert tok.decode(ids[-6:]).startswith("\ufffd")
    out = llm.generate("a cat 👍🏽", SamplingParams(temperature=0, max_tokens=2, logprobs=0, allowed_token_ids=[cat]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == " cat cat" and [lp[cat].decoded_token for lp in out.logprobs] == [" cat", " cat"]


def test_decoded_token_is_the_text_a_token_adds_in_context(sentencepiece_llama_dir):
    llm = LLM(sentencepiece_llama_dir, dtype="float32")
    tok = llm.get_tokenizer()
    vocab = tok.get_vocab()
    # "▁a" and "a" are distinct tokens that decode alone to the same "a"; 日 is three byte tokens.
    space_a, bare_a, space_cat = vocab["▁a"], vocab["a"], vocab["▁cat"]
    assert tok.decode([space_a]) == tok.decode([bare_a]) == "a"
    prompt = "banana a cat 日"
    forced = [space_a, space_cat, bare_a, vocab["<0xE6>"], vocab["<0x97>"], vocab["<0xA5>"]]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=1, prompt_logprobs=1, ignore_eos=True,
                            logits_processors=[_forcing(forced)])
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    decoded = [None] + [out.prompt_logprobs[i][t].decoded_token for i, t in enumerate(ids) if i]
    assert decoded[ids.index(space_a)] == " a" and decoded[ids.index(space_cat)] == " cat"
    assert decoded[-3:] == ["", "", "日"]  # the byte that completes the character gives all of it
    comp = out.outputs[0]
    assert comp.token_ids == forced
    chosen = [lp[t].decoded_token for t, lp in zip(comp.token_ids, comp.logprobs)]
    assert chosen == [" a", " cat", "a", "", "", "日"] and "".join(chosen) == comp.text == " a cata日"
    # Every top-k alternative is decoded in the same context (a whole decode gives the same text),
    # less the "\ufffd" of the context's unfinished character that the token breaks (vLLM's).
    broke = 0
    for i, position in enumerate(comp.logprobs):
        context_text = tok.decode(ids + forced[:i])
        context = context_text.rstrip("\ufffd")
        broken = "\ufffd" * (len(context_text) - len(context))
        for t, lp in position.items():
            added = tok.decode(ids + forced[:i] + [t]).rstrip("\ufffd")[len(context):]
            alternative = t != comp.token_ids[i]
            assert lp.decoded_token == (added[len(broken):] if alternative and broken and added.startswith(broken)
                                        else added)
            broke += alternative and bool(broken) and added.startswith(broken) and added != broken
    assert broke  # an alternative that breaks the unfinished character is among them
    assert not any(lp.decoded_token.startswith("\ufffd") for position in comp.logprobs for lp in position.values())
    silent = llm.generate(prompt, SamplingParams(max_tokens=2, logprobs=1, detokenize=False), use_tqdm=False)[0]
    assert all(lp.decoded_token is None for position in silent.outputs[0].logprobs for lp in position.values())


@pytest.mark.parametrize("which", ["smollm2", "byte_level_bpe"])
def test_an_alternatives_decoded_token_is_what_taking_it_would_have_added(which, tokenizer_dir):
    """Found by a hunt against vLLM: after a completion's token of a space and half a character
    (SmolLM2's " \xe5"), the alternatives that complete the character lacked the space the taken
    token's text has (" 匠" taken, "包" beside it; vLLM: " 包"), and an alternative of a space and
    half a character gave " " where the taken one gave "". Each alternative now gives what the
    detokenizer adds when it is taken; a prompt's whole characters stay the prompt's. Random
    completions of split characters, every position, every token of a pool."""
    from pagedlm.engine.detokenizer import decode_completion, decode_in_context

    tok = AutoTokenizer.from_pretrained(default_model_path() if which == "smollm2" else tokenizer_dir)
    if which == "smollm2":
        assert tok.decode([13223, 230, 223]) == " 包"
        assert decode_in_context(tok, tok.encode("\n\n#") + [13223, 230], [250, 223, 241], num_output_tokens=2) == \
            [" 匠", " 包", " 北"]
        assert decode_in_context(tok, tok.encode("\n\n#") + [13223, 230], [250, 223], num_output_tokens=0) == ["匠", "包"]
        assert decode_in_context(tok, tok.encode("\n\n#"), [13223, 216, 27709], num_output_tokens=0) == ["", " ", ""]
    if which == "byte_level_bpe":  # found by a review: runs of tokens that each end one character and begin the next
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte = {b: tok.convert_tokens_to_ids(c) for b, c in bytes_to_unicode().items()}
        ids = tok.convert_tokens_to_ids
        for prompt, out, alt in [(tok.encode("Hi"), [byte[0xEC], byte[0x80], ids("¥æ"), byte[0x8F]], byte[0xA9]),
                                 (ids(["e", ",", "ì"]), ids(["ł", "¥æ"]), ids("ªŀ"))]:
            taken, _ = decode_completion(tok, prompt, out + [alt], SamplingParams())
            assert decode_in_context(tok, prompt + out, [out[-1], alt], num_output_tokens=len(out))[1] == taken[-1]
    pool = sorted(set(tok.encode("日本語 匠 包 北 naïve café 🙂👍🏽 a, b", add_special_tokens=False)))
    rng = random.Random(0)
    for _ in range(40):
        prompt = [rng.choice(pool) for _ in range(rng.randint(1, 4))]
        out = [rng.choice(pool) for _ in range(rng.randint(1, 5))]
        for i in range(len(out)):
            context = prompt + out[:i]
            context_broken = tok.decode(context).endswith("\ufffd")
            texts = decode_in_context(tok, context, [out[i], *pool], num_output_tokens=i)
            for t, text in zip(pool, texts[1:]):
                taken, end = decode_completion(tok, prompt, out[:i] + [t], SamplingParams())
                if context_broken and not end and "\ufffd" in taken[-1]:
                    continue  # it breaks the context's character: its own text, without the "\ufffd" (vLLM's)
                assert text == taken[-1], (prompt, out[:i], t, text, taken)


def test_a_completion_cut_inside_a_character_ends_its_last_decoded_token_too(sentencepiece_llama_dir):
    """A completion whose last tokens leave a character incomplete ends its text with the "\ufffd" a
    decode gives those bytes; its last token's decoded_token carries it, so the taken tokens' texts
    still add up to the text (sampled, flat logprobs, beam search)."""
    llm = LLM(sentencepiece_llama_dir, dtype="float32")
    vocab = llm.get_tokenizer().get_vocab()
    forced = [vocab["▁a"], vocab["<0xE6>"], vocab["<0x97>"]]  # 日 is E6 97 A5
    for extra in ({}, {"flat_logprobs": True}, {"use_beam_search": True, "best_of": 2}):
        params = SamplingParams(temperature=0, max_tokens=3, logprobs=0, ignore_eos=True,
                                logits_processors=[_forcing(forced)], **extra)
        comp = llm.generate("banana", params, use_tqdm=False)[0].outputs[0]
        assert comp.token_ids == forced and comp.text.startswith(" a\ufffd"), extra
        chosen = [lp[t].decoded_token for t, lp in zip(comp.token_ids, comp.logprobs)]
        assert chosen[:2] == [" a", ""] and "".join(chosen) == comp.text, extra
        # Ended because no token was left to sample (every beam stuck, for beam search).
        def stuck(output_token_ids, logits):
            return _forcing(forced)(output_token_ids, logits) if len(output_token_ids) < 3 else logits - float("inf")

        comp = llm.generate("banana", params.clone(max_tokens=5, logits_processors=[stuck]), use_tqdm=False)[0].outputs[0]
        chosen = [lp[t].decoded_token for t, lp in zip(comp.token_ids, comp.logprobs)]
        assert comp.finish_reason == "abort" and comp.text.startswith(" a\ufffd"), extra
        assert chosen[:2] == [" a", ""] and "".join(chosen) == comp.text, extra
        # Ended by EOS instead, whose own decoded_token shows the unfinished bytes: nothing is added
        # twice (a review), whether EOS is in the text or not.
        eos = llm.get_tokenizer().eos_token_id
        for include in (False, True):
            params = params.clone(max_tokens=4, ignore_eos=False, include_stop_str_in_output=include,
                                  logits_processors=[_forcing(forced + [eos])])
            comp = llm.generate("banana", params, use_tqdm=False)[0].outputs[0]
            chosen = [lp[t].decoded_token for t, lp in zip(comp.token_ids, comp.logprobs)]
            assert comp.token_ids == forced + [eos] and chosen[2] == "" and chosen[3].endswith("</s>"), (extra, include)
            assert "".join(chosen) == comp.text + "</s>", (extra, include)


@pytest.mark.parametrize("which", ["sentencepiece_llama_dir", "llama_dir", "wordpiece_llama_dir"])
def test_taken_tokens_decoded_tokens_add_up_to_the_text_whatever_their_bytes(which, request):
    """Found by a hunt: where a byte-fallback decoder turned a whole run of byte tokens into
    "\ufffd" (the run ends inside a character, or holds bytes that are not UTF-8), the taken tokens'
    decoded_token no longer added up to the text: a context ending in one emoji and inside another
    showed the emoji again, a token that starts a character gave "\ufffd", and a byte-level token
    of a letter and half a character ("n" + 0xC3) cut by max_tokens missed its "\ufffd". Random
    token sequences, half of them byte tokens, sampled and by beam search, every decoder."""
    llm = LLM(request.getfixturevalue(which), dtype="float32", enable_trace_replay=True)
    tok = llm.get_tokenizer()
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    byte_tokens = [i for t, i in tok.get_vocab().items() if re.fullmatch(r"<0x[0-9A-F]{2}>", t)]
    others = [i for i in range(len(tok)) if i not in special]
    if not byte_tokens:  # byte-level BPE: tokens of one byte, UTF-8 lead and continuation bytes among them
        byte_tokens = [i for i in others if len(tok.convert_ids_to_tokens(i)) == 1] or others  # (WordPiece: none)
    rng = random.Random(0)

    def draw(n):
        return [rng.choice(byte_tokens if rng.random() < 0.5 else others) for _ in range(n)]

    cases = [(draw(rng.randint(1, 10)), draw(rng.randint(1, 10))) for _ in range(60)]
    if which == "llama_dir":
        cases.append((tok.encode("Hello"), tok.convert_tokens_to_ids(["nÃ"])))
    else:
        cases.append((tok.encode("a cat 😀"), tok.encode("😀", add_special_tokens=False)[-4:]))
    params = [SamplingParams(trace_decode_token_ids=out, logprobs=1, skip_special_tokens=False,
                             spaces_between_special_tokens=i % 2 == 0) for i, (_, out) in enumerate(cases)]
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt, _ in cases], params, use_tqdm=False)
    for (prompt, out), output in zip(cases, outputs):
        comp = output.outputs[0]
        chosen = [lp[t].decoded_token for t, lp in zip(comp.token_ids, comp.logprobs)]
        assert comp.token_ids == out and "".join(chosen) == comp.text, (prompt, out, chosen, comp.text)
    if which == "sentencepiece_llama_dir":  # the emoji after an emoji: its text once
        assert chosen == ["", "", "", "😀"] and comp.text == "😀"
    if which == "llama_dir":
        assert chosen == ["n\ufffd"] == [comp.text]
    for prompt, out in cases[:12]:
        beams = SamplingParams(use_beam_search=True, best_of=2, temperature=0, max_tokens=len(out), logprobs=0, ignore_eos=True,
                               skip_special_tokens=False, logits_processors=[_forcing(out)])
        comp = llm.generate({"prompt_token_ids": prompt}, beams, use_tqdm=False)[0].outputs[0]
        chosen = [lp[t].decoded_token for t, lp in zip(comp.token_ids, comp.logprobs)]
        assert comp.token_ids == out and "".join(chosen) == comp.text, (prompt, out, chosen, comp.text)


def test_a_prompt_ending_in_special_tokens_that_are_skipped_still_gives_the_completion_its_context(
        wordpiece_llama_dir):
    """Found by a hunt: with skip_special_tokens, a prompt whose last 6 tokens were all special gave
    the detokenizer a context without text, so WordPiece's "##s" after it kept its "##" and the
    completion lost its space; the context now reaches back to text (a full decode's reading)."""
    from pagedlm.engine.detokenizer import decode_completion

    tok = AutoTokenizer.from_pretrained(wordpiece_llama_dir)
    prompt = tok.convert_tokens_to_ids(["cat", "##s"] + ["</s>", "<x>", "<y>", "<s>"] * 2)
    out = tok.convert_tokens_to_ids(["##s", "cat"])
    texts, end = decode_completion(tok, prompt, out, SamplingParams(skip_special_tokens=True))
    full, before = tok.decode(prompt + out, skip_special_tokens=True), tok.decode(prompt, skip_special_tokens=True)
    assert "".join(texts) + end == full[len(before):] == "s cat"


def test_a_byte_fallback_run_that_is_not_utf8_keeps_the_text_shown_and_its_spaces(sentencepiece_llama_dir):
    """Found by a hunt: a byte-fallback decoder turns a whole run of byte tokens into "\ufffd" when
    it holds bytes that are not UTF-8, so a completion cut inside a character gave "ą\ufffd\ufffd"
    for "ą" + 0xC4 (one "\ufffd" per byte left), and the detokenizer, starting afresh where the
    run broke, lost the bytes not yet shown and the space of the next "▁cat" ("cat" for
    "\ufffd\ufffd\ufffd cat"). Characters already shown stand; a full decode would show them as
    "\ufffd" too."""
    llm = LLM(sentencepiece_llama_dir, dtype="float32", enable_trace_replay=True)
    tok = llm.get_tokenizer()
    prompt = tok.encode("a cat 😀")
    expected = {("<0xC4>", "<0x85>", "<0xC4>"): ("ą\ufffd", ["", "ą", "\ufffd"]),
                ("<0xF0>", "<0x9F>", "<0x98>", "▁cat"): ("\ufffd" * 3 + " cat", ["", "", "", "\ufffd" * 3 + " cat"]),
                ("▁cat", "<0x80>", "<0x80>", "▁cat"): (" cat\ufffd\ufffd cat", [" cat", "", "", "\ufffd\ufffd cat"]),
                ("<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "<0xF0>"): ("😀\ufffd", ["", "", "", "😀", "\ufffd"])}
    for tokens, (text, chosen) in expected.items():
        out = tok.convert_tokens_to_ids(list(tokens))
        comp = llm.generate({"prompt_token_ids": prompt}, SamplingParams(trace_decode_token_ids=out, logprobs=0),
                            use_tqdm=False)[0].outputs[0]
        assert (comp.text, [lp[t].decoded_token for t, lp in zip(comp.token_ids, comp.logprobs)]) == (text, chosen), tokens
    # A prompt's logprobs read two byte-fallback emojis in a row as two.
    out = llm.generate("a 😀😀", SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert "".join(out.prompt_logprobs[i][ids[i]].decoded_token for i in range(1, len(ids))) == " a 😀😀"


def test_spaces_between_special_tokens_as_vllm_reads_it(wordpiece_llama_dir):
    llm = LLM(wordpiece_llama_dir, dtype="float32")
    vocab = llm.get_tokenizer().get_vocab()
    forced = [vocab["<x>"], vocab["<y>"], vocab["dog"], vocab["##s"]]
    texts = {}
    for spaces in (True, False):
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, skip_special_tokens=False,
                                spaces_between_special_tokens=spaces, logits_processors=[_forcing(forced)])
        texts[spaces] = llm.generate({"prompt_token_ids": [vocab["cat"]]}, params, use_tqdm=False)[0].outputs[0].text
    # The WordPiece decoder spaces every token; False drops the space between two special tokens.
    assert texts == {True: " <x> <y> dogs", False: " <x><y> dogs"}
    # decoded_token follows the text, alternatives too (found by a hunt: " <y>" after "<x>"); the
    # completion's first token is spaced from the prompt's special token, as its text is (vLLM's).
    listed = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, skip_special_tokens=False,
                            spaces_between_special_tokens=False, logprob_token_ids=forced[:2],
                            logits_processors=[_forcing(forced)])
    comp = llm.generate({"prompt_token_ids": [vocab["<y>"]]}, listed, use_tqdm=False)[0].outputs[0]
    assert [{t: lp.decoded_token for t, lp in position.items()} for position in comp.logprobs] == [
        {vocab["<x>"]: " <x>", vocab["<y>"]: " <y>"}, {vocab["<y>"]: "<y>", vocab["<x>"]: "<x>"},
        {vocab["dog"]: " dog", vocab["<x>"]: "<x>", vocab["<y>"]: "<y>"}, {vocab["##s"]: "s", vocab["<x>"]: " <x>", vocab["<y>"]: " <y>"}]
    beams = SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=4, ignore_eos=True,
                           skip_special_tokens=False, spaces_between_special_tokens=False,
                           logits_processors=[_forcing(forced)])
    assert llm.generate({"prompt_token_ids": [vocab["cat"]]}, beams, use_tqdm=False)[0].outputs[0].text == texts[False]


def test_generation_config_sampling_defaults_as_vllm_applies_them(llama_dir, tmp_path, caplog):
    import json
    import shutil

    from conftest import hf_greedy

    model_dir = tmp_path / "m"
    shutil.copytree(llama_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": True, "temperature": 0.7, "top_k": 1, "max_new_tokens": 6}
    ))
    with _pagedlm_log(caplog):
        llm = LLM(str(model_dir), dtype="float32", max_model_len=64)
    assert "temperature=0.7, top_k=1, max_tokens=6" in caplog.text and "generation_config='vllm'" in caplog.text
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.7, 1, 6)
    prompt = [BOS, 5, 6, 7]
    out = llm.generate({"prompt_token_ids": prompt}, use_tqdm=False)[0].outputs[0]
    # top_k=1 samples the argmax: the six tokens Hugging Face's generate gives with this config.
    assert out.token_ids == hf_greedy(str(model_dir), [prompt], 6)[0][:6] and out.finish_reason == "length"
    # A default max_tokens is shortened to fit max_model_len instead of rejecting the prompt.
    long_prompt = [BOS] + [9] * 60
    assert len(llm.generate({"prompt_token_ids": long_prompt}, use_tqdm=False)[0].outputs[0].token_ids) <= 3

    off = LLM(str(model_dir), dtype="float32", max_model_len=64, generation_config="vllm")
    assert off.get_default_sampling_params() == SamplingParams()
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": EOS, "do_sample": False, "temperature": 0.7, "presence_penalty": 0.5, "frequency_penalty": 0.3}))
    defaults = LLM(str(model_dir), dtype="float32", max_model_len=64).get_default_sampling_params()
    # vLLM 0.32 reads the two penalties too (found by a differential run); do_sample=false is HF's greedy.
    assert (defaults.temperature, defaults.presence_penalty, defaults.frequency_penalty) == (0.0, 0.5, 0.3)
    with pytest.raises(ValueError, match="generation_config must be 'auto'"):
        LLM(str(model_dir), generation_config="nowhere")
    # vLLM's override_generation_config: set over the model's defaults, or alone with "vllm".
    over = {"temperature": 0.2, "max_new_tokens": 9, "top_p": None}
    defaults = LLM(str(model_dir), dtype="float32", max_model_len=64,
                   override_generation_config=over).get_default_sampling_params()
    assert (defaults.temperature, defaults.presence_penalty, defaults.max_tokens) == (0.2, 0.5, 9)
    alone = LLM(str(model_dir), dtype="float32", max_model_len=64, generation_config="vllm",
                override_generation_config=over).get_default_sampling_params()
    assert (alone.temperature, alone.presence_penalty, alone.max_tokens) == (0.2, 0.0, 9)
    with pytest.raises(ValueError, match="override_generation_config: unknown key.s. 'do_sampl'; allowed: temperature"):
        LLM(str(model_dir), override_generation_config={"do_sampl": False})
    # A None value unsets the model's (vLLM's update-then-drop-None); a bad value is named (found by a review).
    unset = LLM(str(model_dir), dtype="float32", max_model_len=64,
                override_generation_config={"presence_penalty": None}).get_default_sampling_params()
    assert (unset.temperature, unset.presence_penalty) == (0.0, 0.0)
    from pagedlm.entrypoints.llm import check_engine_args
    for call in (lambda: LLM(str(model_dir), override_generation_config={"temperature": "hot"}),
                 lambda: check_engine_args(str(model_dir), {"override_generation_config": {"temperature": "hot"}})):
        with pytest.raises(ValueError, match="override_generation_config with the model's generation config gives "
                                             "unusable sampling defaults"):
            call()


def test_vllm_s_other_constructor_arguments(llama_dir):
    """Found against vLLM 0.32: its arguments raised TypeError even at values pagedlm honours;
    None (vLLM's default for the budgets) raised ValueError."""
    greedy = SamplingParams(temperature=0, max_tokens=3, logprobs=2)
    with LLM(llama_dir, dtype="float32") as llm:
        expected = llm.generate("Hello", greedy, use_tqdm=False)[0].outputs[0].token_ids
    vllm_style = dict(enforce_eager=True, disable_log_stats=True, quantization=None, revision=None, tokenizer_mode="auto",
                      skip_tokenizer_init=False, load_format="auto", cpu_offload_gb=0, pipeline_parallel_size=1,
                      max_num_seqs=None, max_num_batched_tokens=None, enable_chunked_prefill=None,
                      enable_prefix_caching=None, block_size=None, max_logprobs=2)
    with LLM(llama_dir, dtype="float32", **vllm_style) as llm:
        assert llm.generate("Hello", greedy, use_tqdm=False)[0].outputs[0].token_ids == expected
        config = llm.llm_engine.scheduler_config
        assert (config.max_num_seqs, config.max_num_batched_tokens, llm.llm_engine.cache_config.block_size) == (256, 2048, 16)
        with pytest.raises(ValueError, match=r"logprobs \(3\) exceeds max_logprobs \(2\), the LLM's limit"):
            llm.generate("Hello", SamplingParams(max_tokens=1, logprobs=3), use_tqdm=False)
        with pytest.raises(ValueError, match=r"prompt_logprobs \(-1, the vocabulary\) exceeds max_logprobs"):
            llm.generate("Hello", SamplingParams(max_tokens=1, prompt_logprobs=-1), use_tqdm=False)
        with pytest.raises(ValueError, match=r"beam_search ranks 2 \* beam_width \(4\) logprobs a step, over max_logprobs"):
            llm.beam_search(["Hello"], BeamSearchParams(beam_width=2, max_tokens=2))
    with LLM(llama_dir, dtype="float32", max_logprobs=VOCAB_SIZE) as llm:  # -1 is the vocabulary, within the limit
        assert len(llm.generate("Hello", SamplingParams(max_tokens=1, logprobs=-1), use_tqdm=False)[0]
                   .outputs[0].logprobs[0]) == VOCAB_SIZE
        # vLLM's beam_search(prompts, params, lora_request, use_tqdm, concurrency_limit)
        assert len(llm.beam_search(["Hello"], BeamSearchParams(beam_width=2, max_tokens=2), None, False, 1)) == 1
    # As vLLM: a budget under 256 lowers the default max_num_seqs; no chunking budgets max_model_len.
    with LLM(llama_dir, dtype="float32", max_num_batched_tokens=64, num_kv_blocks=64) as llm:
        assert llm.llm_engine.scheduler_config.max_num_seqs == 64
    with LLM(llama_dir, dtype="float32", hf_overrides={"max_position_embeddings": 4096}, enable_chunked_prefill=False,
             num_kv_blocks=300) as llm:
        assert llm.llm_engine.scheduler_config.max_num_batched_tokens == 4096
    # hf_overrides: fields of the config, or a function of it.
    with LLM(llama_dir, dtype="float32", hf_overrides={"max_position_embeddings": 100}) as llm:
        assert llm.llm_engine.model_config.max_model_len == 100

    def shorter(config):
        config.max_position_embeddings = 90
        return config

    with LLM(llama_dir, dtype="float32", hf_overrides=shorter) as llm:
        assert llm.llm_engine.model_config.max_model_len == 90
    # A YaRN override keeps the model's rope_theta, which transformers 5 holds only in the
    # rope_parameters it replaces, and takes original_max_position_embeddings as transformers
    # does (found by a hunt: theta 10,000 silently, and a bare TypeError).
    yarn = {"rope_type": "yarn", "factor": 4.0}
    theta = AutoConfig.from_pretrained(llama_dir).rope_parameters["rope_theta"]
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, rope_parameters={
        **yarn, "rope_theta": theta, "original_max_position_embeddings": 80}, max_position_embeddings=80).eval()
    prompt = [BOS] + list(range(30, 90))
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                               eos_token_id=EOS)[0, len(prompt):].tolist()
    with LLM(llama_dir, dtype="float32", hf_overrides={"rope_parameters": yarn, "max_position_embeddings": 80}) as llm:
        assert llm.model_config.hf_config.rope_parameters == {**yarn, "rope_theta": theta,
                                                              "original_max_position_embeddings": 80}
        got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8))
        assert got[0].outputs[0].token_ids == expected and len(expected) > 3
    for kwargs, error, match in [
        ({"disable_log_stats": False}, ValueError, r"disable_log_stats must be True \(pagedlm logs no periodic"),
        ({"quantization": "awq"}, ValueError, "quantization must be None"),
        ({"enforce_eager": 1}, ValueError, "enforce_eager must be True or False"),
        ({"swap_spaces": 4}, TypeError, "unexpected keyword argument 'swap_spaces'"),
        ({"hf_overrides": [1]}, ValueError, "hf_overrides must be a dict of config fields or a function"),
        ({"hf_overrides": lambda config: None}, ValueError, "hf_overrides must return the config, got NoneType"),
        ({"hf_overrides": {"sliding_window": 8}}, ValueError, "hf_overrides: .*'sliding_window' is no field of LlamaConfig, so nothing would read it; its fields: .*rms_norm_eps"),
        ({"hf_overrides": {"rms_norm_eps": "x"}}, ValueError, "hf_overrides: "),  # transformers' own error type
        ({"hf_overrides": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}}, ValueError,
         "set rope_parameters instead of rope_scaling"),
        ({"max_logprobs": -2}, ValueError, "max_logprobs must be None, -1"),
    ]:
        with pytest.raises(error, match=match):
            LLM(llama_dir, **kwargs)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_close_releases_the_kv_cache_and_weights(llama_dir, caplog):
    closed = []  # kept alive: only close() can give their memory back

    def make_and_close() -> None:
        with LLM(llama_dir, dtype="float32", num_kv_blocks=8192) as llm:  # 8192 × 16 tokens: 128 MiB of KV cache
            for key, value in llm.llm_engine.model_runner.cache_engine.kv_caches:  # make every page resident
                key.fill_(0.0)
                value.fill_(0.0)
            llm.generate(["a b c"], SamplingParams(max_tokens=3), use_tqdm=False)
        closed.append(llm)

    for _ in range(3):
        make_and_close()
    baseline = _rss_bytes()
    for _ in range(8):
        make_and_close()
    assert _rss_bytes() - baseline < 96 * 2**20  # eight caches kept would be 1 GiB
    closed[-1].close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        closed[-1].generate("a")
    with pytest.raises(RuntimeError, match="closed"):
        closed[-1].get_stats()
    with _pagedlm_log(caplog):
        LLM(llama_dir, dtype="float32", num_kv_blocks=10, block_size=16, max_model_len=128).close()
    assert "Memory plan: weights" in caplog.text and "longest sequence 128 tokens" in caplog.text


def test_close_with_an_abandoned_iteration_in_a_reference_cycle_returns(llama_dir):
    """Found by a hunt: close() hung for ever where user code had left a generate_as_completed
    iteration in a reference cycle (an exception kept with its traceback): the engine's
    gc.collect() ran under close()'s hold of the engine lock, and the iteration's finaliser waited
    for that lock in the same thread. A collection inside a step could do the same."""
    import gc
    import threading

    llm = LLM(llama_dir, dtype="float32")

    def consume() -> None:
        iteration = llm.generate_as_completed([[BOS, 5, 6]] * 3, SamplingParams(temperature=0, max_tokens=8),
                                              use_tqdm=False)
        try:
            for _ in iteration:
                raise ValueError("a bad row")
        except ValueError as exc:
            kept = exc  # frame -> exc -> traceback -> frame: the iteration stays alive until collected
        assert kept

    gc.disable()  # so that the cycle is collected only inside the locked sections below
    try:
        consume()
        with pytest.raises(RuntimeError, match="already running"):  # it has not ended yet
            llm.generate([[BOS, 5]], SamplingParams(max_tokens=2), use_tqdm=False)
        closer = threading.Thread(target=llm.close, daemon=True)
        closer.start()
        closer.join(60)
        assert not closer.is_alive(), "close() waited on itself"
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[BOS, 5]], SamplingParams(max_tokens=2), use_tqdm=False)


def test_a_close_from_another_thread_waits_for_the_step_then_the_call_finds_it_closed(llama_dir):
    """Found by a hunt: close() during another thread's step freed the model under it
    (AttributeError: 'NoneType' object has no attribute 'compute_logits', or a KeyError). Then by a
    CI run: the lock is not fair, so close() waited for the whole call, not for its step."""
    import threading

    llm = LLM(llama_dir, dtype="float32")
    stepping = threading.Event()
    calls = []

    def slow(ids, logits):
        calls.append(len(ids))
        stepping.set()
        time.sleep(0.05)  # the close below lands inside this step
        return logits

    errors = []

    def generate():
        try:
            llm.generate([[BOS, 5, 6]] * 2, SamplingParams(max_tokens=50, logits_processors=[slow]), use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    thread = threading.Thread(target=generate)
    thread.start()
    assert stepping.wait(60)
    before = len(calls)
    llm.close()
    thread.join(60)
    assert [type(e) for e in errors] == [RuntimeError] and "This LLM is closed" in str(errors[0])
    assert len(calls) <= before + 2, (before, len(calls))  # the step's other sequence, then no step


def test_reset_prefix_cache_from_another_thread_waits_for_the_step(llama_dir):
    """Noticed in a review: reset_prefix_cache took no lock, so another thread's reset rewrote the
    block manager's hash tables while a step was admitting sequences through them. From inside a
    step (a logits processor) it would wait for itself: refused."""
    import threading

    llm = LLM(llama_dir, dtype="float32", enable_prefix_caching=True)
    stepping, reset_done, during_step, inside = threading.Event(), threading.Event(), [], []

    def watch(ids, logits):
        if not stepping.is_set():
            stepping.set()
            during_step.append(reset_done.wait(0.5))  # the reset, if it does not wait for this step
            try:
                llm.reset_prefix_cache()
            except RuntimeError as exc:
                inside.append(str(exc))
        return logits

    def reset():
        assert stepping.wait(60)
        llm.reset_prefix_cache()
        reset_done.set()

    thread = threading.Thread(target=reset)
    thread.start()
    llm.generate([[BOS, 5, 6]], SamplingParams(max_tokens=3, logits_processors=[watch]), use_tqdm=False)
    thread.join(60)
    assert reset_done.is_set() and during_step == [False]
    assert len(inside) == 1 and "reset_prefix_cache was called from inside a step" in inside[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_close_returns_cuda_memory(llama_dir):
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        with LLM(llama_dir, dtype="float32", device="cuda", num_kv_blocks=2048) as llm:
            llm.generate(["a b c"], SamplingParams(max_tokens=3), use_tqdm=False)
    assert torch.cuda.memory_allocated() == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_batch_invariant_false_on_cuda_runs_one_product_per_linear(llama_dir):
    from pagedlm.model_executor.layers.linear import Linear

    prompts, params = ["a b c", "d e"], SamplingParams(temperature=0, max_tokens=4)
    outputs = []
    for batch_invariant in (True, False):
        with LLM(llama_dir, dtype="float32", device="cuda", num_kv_blocks=64, batch_invariant=batch_invariant) as llm:
            model = llm.llm_engine.model_runner.model
            linears = [m for m in model.modules() if isinstance(m, Linear)]
            assert linears and all(m.fixed_shape == batch_invariant for m in linears)
            outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert all(len(ids) == 4 for ids in outputs[1])


def test_numpy_penalties_run_and_out_of_vocabulary_stop_ids_are_refused_up_front(llm):
    import numpy as np

    params = SamplingParams(temperature=0, max_tokens=4, presence_penalty=np.float64(0.5),
                            frequency_penalty=np.float64(0.5), repetition_penalty=np.float64(1.2))
    assert len(llm.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    vocab = llm.llm_engine.vocab_size
    with pytest.raises(ValueError, match=r"prompt 0: stop_token_ids \[%d\] are outside the vocabulary" % vocab):
        llm.generate("Hello", SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=[vocab]), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_request_checks_found_by_a_differential_against_vllm(llm, llama_dir):
    """Token ids below 0 in params' checked (shared) containers reached the sampler: -2 gave the
    vocabulary's last-but-one token and a -1 bias an IndexError mid-run. min_tokens past the room
    max_model_len leaves ran to "length" with EOS banned (vLLM refuses: its max_tokens defaults to
    that room)."""
    from pagedlm.sampling_params import CheckedDict, CheckedList

    for name, value in (("allowed_token_ids", CheckedList([-2, 5])), ("logit_bias", CheckedDict({-1: 5.0}))):
        with pytest.raises(ValueError, match=rf"prompt 0: {name} \[-\d\] are outside the vocabulary"):
            llm.generate([[BOS, 5]], SamplingParams(max_tokens=2, **{name: value}), use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids must be None or a non-empty list"):
        SamplingParams(allowed_token_ids=CheckedList([]))
    room = llm.llm_engine.model_config.max_model_len - 2
    with pytest.raises(ValueError, match=rf"min_tokens \({room + 1}\) must be <= max_tokens, which is max_model_len"):
        llm.generate([[BOS, 5]], SamplingParams(min_tokens=room + 1), use_tqdm=False)
    assert len(llm.generate([[BOS, 5]], SamplingParams(min_tokens=room, ignore_eos=True), use_tqdm=False)[0]
               .outputs[0].token_ids) == room
    with pytest.raises(ValueError, match=r"vLLM's -1, the longest the KV cache holds, is not taken: pass None"):
        LLM(llama_dir, max_model_len=-1)


@pytest.mark.parametrize("kwargs,field", [
    (dict(device="cuda:x"), "device"),
    (dict(num_kv_blocks=True), "num_kv_blocks"),
    (dict(kv_cache_memory_bytes=True), "kv_cache_memory_bytes"),
    (dict(max_model_len=True), "max_model_len"),
    (dict(max_num_seqs=True), "max_num_seqs"),
    (dict(tensor_parallel_size=2), "tensor_parallel_size"),
    (dict(trust_remote_code="yes"), "trust_remote_code"),
    (dict(tokenizer="no/such/dir"), "tokenizer"),
    (dict(tokenizer=3), "tokenizer"),
    (dict(chat_template="no_such_template.jinja"), "chat_template"),
    (dict(chat_template="{% for m in messages %}{{ m.content }}"), r"chat_template is not a valid Jinja template: "
                                                                   r"Unexpected end of template.*\(line 1\)"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=0.5, num_kv_blocks=8), "gpu_memory_utilization"),
    (dict(num_kv_blocks=8, kv_cache_memory_bytes=2**20), "num_kv_blocks and kv_cache_memory_bytes"),
    (dict(batch_invariant="yes"), r"batch_invariant must be None \(the backend's\), True or False"),
    (dict(device="cpu", batch_invariant=False), r"batch_invariant must be None or True on the CPU \(False is for CUDA"),
])
def test_constructor_arguments_are_checked_before_the_weights_load(llama_dir, kwargs, field, monkeypatch):
    import pagedlm.engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "ModelRunner", None)  # reaching the weights would fail differently
    with pytest.raises(ValueError, match=field):
        LLM(llama_dir, **kwargs)


def test_batch_invariant_is_refused_where_the_torch_reference_runs_the_ops(llama_dir, monkeypatch):
    """Found by a hunt: with PAGEDLM_OPS_BACKEND=torch-reference (or no extension), whose results
    change with the batch, batch_invariant=True was taken and not honoured, and False refused as if
    the CPU kernels ran; None (the default) is the backend's: False there."""
    from pagedlm import config
    import pagedlm.engine.llm_engine as llm_engine

    monkeypatch.setattr(config, "backend_for", lambda device: "torch-reference")
    with pytest.raises(ValueError, match=r"batch_invariant=True needs pagedlm's kernels, but the ops run on the torch "
                                         r"reference \(PAGEDLM_OPS_BACKEND=torch-reference"):
        LLM(llama_dir, batch_invariant=True)
    monkeypatch.setattr(llm_engine, "ModelRunner", None)  # the configs were made: no need for the weights
    for given in (None, False):
        with pytest.raises(TypeError):  # past the checks, at the model runner
            LLM(llama_dir, batch_invariant=given)
    assert config.ModelConfig.create(llama_dir, "float32", None, "cpu").batch_invariant is False
    monkeypatch.undo()
    assert config.ModelConfig.create(llama_dir, "float32", None, "cpu").batch_invariant is True


def test_gpu_memory_utilization_sets_the_cache_s_share_of_ram_on_cpu(llama_dir, monkeypatch):
    """As a vLLM script passes it (vLLM's CPU backend reserves that share of RAM): here the KV
    cache's share of the available RAM, which is 0.2 by default."""
    from pagedlm import config

    monkeypatch.setattr(config, "_available_ram", lambda: 64 << 20)
    sizes = {share: LLM(llama_dir, device="cpu", dtype="float32", gpu_memory_utilization=share).get_stats()["num_kv_blocks"]
             for share in (None, 0.4)}
    block = LLM(llama_dir, device="cpu", dtype="float32", num_kv_blocks=1).llm_engine.model_runner.cache_engine.num_bytes
    assert sizes == {None: int(0.2 * (64 << 20)) // block, 0.4: int(0.4 * (64 << 20)) // block}


def test_a_checkpoint_without_tokenizer_files_is_refused_by_name(tmp_path, llama_dir):
    """A hunt: transformers' error said to install sentencepiece or tiktoken, which is not the fix."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(llama_dir, name), bare / name)
    with pytest.raises(ValueError, match="holds no tokenizer .*pass tokenizer= .* that has the model's tokenizer"):
        LLM(str(bare), num_kv_blocks=32)
    with LLM(str(bare), tokenizer=llama_dir, num_kv_blocks=32) as llm:
        assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_tokenizer_and_chat_template_replace_the_models(tmp_path, llama_dir, chat_llama_dir):
    """``tokenizer=`` takes another checkpoint's tokenizer and chat template; ``chat_template=``
    (a template or a file) replaces it wherever chats are rendered; ``chat``'s own argument wins."""
    chat = [{"role": "user", "content": "Hi"}]
    with LLM(llama_dir, tokenizer=chat_llama_dir, num_kv_blocks=32) as llm:
        expected = AutoTokenizer.from_pretrained(chat_llama_dir).apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False)
        assert llm.chat(chat, SamplingParams(max_tokens=2), use_tqdm=False)[0].prompt == expected
    template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    for given in (template, str(path), path):
        with LLM(llama_dir, chat_template=given, num_kv_blocks=32) as llm:
            assert llm.get_tokenizer().chat_template is None  # the tokenizer's own, as in vLLM
            assert llm.chat(chat, SamplingParams(max_tokens=2), use_tqdm=False)[0].prompt == "<Hi>"
            own = llm.chat(chat, SamplingParams(max_tokens=2), use_tqdm=False, chat_template="[{{ messages[0].content }}]")
            assert own[0].prompt == "[Hi]"
    # Found by a hunt: LLM's template replaced the tokenizer's named ones, so a call naming one of
    # them was refused as no file (vLLM resolves the name with the tokenizer's templates).
    named = tmp_path / "named"
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = {"default": "D:{{ messages[0].content }}", "tool_use": "T:{{ messages[0].content }}"}
    tokenizer.save_pretrained(named)
    with LLM(llama_dir, tokenizer=str(named), chat_template=template, num_kv_blocks=32) as llm:
        assert llm.chat(chat, SamplingParams(max_tokens=2), use_tqdm=False)[0].prompt == "<Hi>"
        assert llm.chat(chat, SamplingParams(max_tokens=2), use_tqdm=False, chat_template="tool_use")[0].prompt == "T:Hi"
    # chat's argument is read as LLM's (found by a hunt: a path was rendered as the template's text).
    other = tmp_path / "other.jinja"
    other.write_text("({{ messages[0].content }})")
    with LLM(llama_dir, num_kv_blocks=32) as llm:
        for given in (str(other), other):
            assert llm.chat(chat, SamplingParams(max_tokens=2), use_tqdm=False, chat_template=given)[0].prompt == "(Hi)"
        with pytest.raises(ValueError, match="'oops.jinja' is no file"):
            llm.chat(chat, SamplingParams(max_tokens=2), use_tqdm=False, chat_template="oops.jinja")
        with pytest.raises(ValueError, match=f"'{tmp_path}' is a directory"):
            llm.chat(chat, SamplingParams(max_tokens=2), use_tqdm=False, chat_template=str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_a_cpu_only_torch_is_a_clear_error(llama_dir):
    with pytest.raises(ValueError, match="no CUDA device"):
        LLM(llama_dir, device="cuda")


def test_every_prompt_problem_is_listed_with_its_index(llm):
    import numpy as np

    with pytest.raises(ValueError, match="prompts must be a prompt or a list of prompts"):
        llm.generate(None, use_tqdm=False)
    with pytest.raises(ValueError) as err:
        llm.generate(["ab\ud800cd", None, {"prompt": 5}, "fine"], SamplingParams(max_tokens=2), use_tqdm=False)
    msg = str(err.value)
    assert "3 of 4 prompts are invalid" in msg and "prompt 0: the text is not valid Unicode" in msg
    assert "prompt 1: a prompt must be" in msg and 'prompt 2: "prompt" must be a str' in msg
    out = llm.generate({"prompt_token_ids": [np.int64(BOS), np.int32(5)]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert out[0].prompt_token_ids == [BOS, 5] and all(type(t) is int for t in out[0].prompt_token_ids)


def test_vllm_s_other_prompt_keys_and_call_arguments_at_their_no_op_values(llm):
    """Found against vLLM 0.32: prompt dicts with its other keys, and generate/chat arguments, were
    refused without naming the key (or raised TypeError). Their no-op values run; others are
    refused naming them."""
    greedy = SamplingParams(temperature=0, max_tokens=2)
    chat = [{"role": "user", "content": "Hi"}]
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    expected = llm.generate("Hi", greedy, use_tqdm=False)[0].outputs[0].token_ids
    for prompt in ({"prompt": "Hi", "multi_modal_data": None}, {"prompt": "Hi", "mm_processor_kwargs": {}},
                   {"prompt": "Hi", "multi_modal_uuids": None, "media_io_kwargs": {}}):
        assert llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids == expected
    out = llm.generate(["Hi", "Hi"], greedy, use_tqdm=False, lora_request=None, priority=[0, 0], mm_processor_kwargs=None)
    assert [o.outputs[0].token_ids for o in out] == [expected] * 2
    for zeros in ([np.int64(0)] * 2, np.zeros(2, dtype=np.int64), np.int32(0), np.array(0)):  # a hunt: "takes 0"
        out = llm.generate(["Hi", "Hi"], greedy, use_tqdm=False, priority=zeros)
        assert [o.outputs[0].token_ids for o in out] == [expected] * 2
    assert llm.chat(chat, greedy, False, None, 0, template, "string")[0].prompt == "Hi"  # vLLM's positions
    for prompt, match in [({"prompt": "Hi", "multi_modal_data": {"image": 1}}, "multi_modal_data: pagedlm runs text-only"),
                          ({"prompt": "Hi", "multi_modal_data": []}, "multi_modal_data: pagedlm runs text-only"),
                          ({"prompt_token_ids": [BOS], "token_type_ids": [0]}, "unknown prompt key 'token_type_ids'")]:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, greedy, use_tqdm=False)
    for kwargs, match in [({"priority": 1}, "priority: pagedlm schedules first come, first served; it takes None or 0, got 1"),
                          ({"priority": [0]}, "priority has 1 entry for 2 prompts"),
                          ({"priority": False}, "priority: pagedlm schedules first come, first served"),
                          ({"lora_request": "adapter"}, "lora_request: pagedlm runs no LoRA adapters"),
                          ({"mm_processor_kwargs": {"size": 1}}, "mm_processor_kwargs: pagedlm runs text-only")]:
        with pytest.raises(ValueError, match=match):
            llm.generate(["Hi", "Hi"], greedy, use_tqdm=False, **kwargs)
    with pytest.raises(ValueError, match="chat_template_content_format must be one of auto, string, openai"):
        llm.chat(chat, greedy, use_tqdm=False, chat_template=template, chat_template_content_format="parts")


def test_add_special_tokens_of_tokenization_kwargs(llm):
    """vLLM's ``tokenization_kwargs={"add_special_tokens": ...}`` (found by a hunt: refused): a
    text prompt without its BOS; a chat with the tokenizer's specials added to the template's."""
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=1)
    bare = tok("Hi", add_special_tokens=False).input_ids
    for flag, ids in [(None, [BOS] + bare), (True, [BOS] + bare), (False, bare)]:
        kwargs = None if flag is None else {"add_special_tokens": flag}
        assert llm.generate("Hi", greedy, use_tqdm=False, tokenization_kwargs=kwargs)[0].prompt_token_ids == ids
        assert llm.llm_engine.add_request("r", "Hi", greedy, tokenization_kwargs=kwargs) == "r"
        assert next(o for o in llm.llm_engine.step() if o.request_id == "r").prompt_token_ids == ids
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = [{"role": "user", "content": "Hi"}]
    assert llm.chat(chat, greedy, use_tqdm=False, chat_template=template)[0].prompt_token_ids == bare
    assert llm.chat(chat, greedy, use_tqdm=False, chat_template=template,
                    tokenization_kwargs={"add_special_tokens": True})[0].prompt_token_ids == [BOS] + bare


def test_token_prompts_in_vllms_other_forms(llm):
    """Found against vLLM: a bare list of token ids is a prompt (and a list of ints passed as
    ``prompts`` is one), and a token prompt may carry the text it stands for, which is echoed."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    expected = llm.generate({"prompt_token_ids": [BOS, 5, 6]}, params, use_tqdm=False)[0]
    one = llm.generate([BOS, 5, 6], params, use_tqdm=False)
    several = llm.generate([[BOS, 5, 6], (BOS, 7)], params, use_tqdm=False)
    echoed = llm.generate({"prompt_token_ids": [BOS, 5, 6], "prompt": "XYZ"}, params, use_tqdm=False)[0]
    assert len(one) == 1 and one[0].outputs[0].token_ids == expected.outputs[0].token_ids
    assert several[0].outputs[0].token_ids == expected.outputs[0].token_ids and several[1].prompt_token_ids == [BOS, 7]
    assert (echoed.prompt, echoed.prompt_token_ids) == ("XYZ", [BOS, 5, 6]) and expected.prompt is None
    assert echoed.outputs[0].token_ids == expected.outputs[0].token_ids
    with pytest.raises(ValueError, match='prompt 0: "prompt" beside "prompt_token_ids" must be a str'):
        llm.generate({"prompt_token_ids": [BOS], "prompt": 5}, params, use_tqdm=False)
    # generate_as_completed reads a flat list of ints as generate does (found by a review: three bad prompts).
    streamed = list(llm.generate_as_completed([BOS, 5, 6], params))
    assert [(i, out.outputs[0].token_ids) for i, out in streamed] == [(0, expected.outputs[0].token_ids)]


def test_bytes_that_are_not_utf8_do_not_stop_a_byte_fallback_tokenizer(sentencepiece_llama_dir):
    """Found by review: '5' as a byte token, then a byte that cannot start a character, made
    tokenizers' DecodeStream raise mid-run; random sampling hit it for a third of the seeds."""
    llm = LLM(sentencepiece_llama_dir, dtype="float32")
    tok = llm.get_tokenizer()
    forced = tok.convert_tokens_to_ids(["<0x35>", "<0x9F>", "at"])
    params = SamplingParams(temperature=0, max_tokens=3, logits_processors=[_forcing(forced)])
    comp = llm.generate({"prompt_token_ids": [BOS, tok.convert_tokens_to_ids("▁")]}, params, use_tqdm=False)[0].outputs[0]
    assert comp.token_ids == forced and comp.text.startswith("5") and comp.text.endswith("at")
    sampled = llm.generate(["banana a cat"] * 4, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=24, ignore_eos=True),
                           use_tqdm=False)
    assert all(len(c.token_ids) == 24 for o in sampled for c in o.outputs)


def test_edges_of_closing_aborting_and_generation_configs(llama_dir, tmp_path):
    llm = LLM(llama_dir, dtype="float32", num_kv_blocks=16)
    engine = llm.llm_engine
    with pytest.raises(TypeError, match="request_id must be a str"):
        engine.abort_request(5)
    llm.close()
    for call in (llm.get_default_sampling_params, engine.step,
                 lambda: engine.add_request("x", [BOS], SamplingParams(max_tokens=1))):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        LLM(llama_dir, generation_config=str(tmp_path))
    (tmp_path / "generation_config.json").write_text("")
    with pytest.raises(ValueError, match="not readable JSON"):
        LLM(llama_dir, generation_config=str(tmp_path))
    (tmp_path / "generation_config.json").unlink()
    with pytest.raises(ValueError, match="generation_config must be"):
        LLM(llama_dir, generation_config=str(tmp_path))


def test_a_hub_model_id_resolves_through_the_local_hf_cache(llama_dir, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in os.listdir(llama_dir):
        os.symlink(os.path.join(llama_dir, name), snapshot / name)
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = SamplingParams(temperature=0, max_tokens=4)
    with LLM("acme/tiny-llama", dtype="float32", max_model_len=64) as llm:
        got = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids
    with LLM(llama_dir, dtype="float32", max_model_len=64) as llm:
        assert got == llm.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=f"not in the Hugging Face cache at {tmp_path / 'hub'}"):
        LLM("acme/absent-model")
    with pytest.raises(ValueError, match="checkpoint directory, a .gguf file or a Hugging Face model id"):
        LLM("not a model")


def test_building_an_llm_imports_no_compiler(model_dir):
    """Building the model on the meta device must not reach torch's Python references (a meta
    ``arange`` did): they import torch._dynamo and with it triton, half a second of start-up and
    ~50 lines of nanobind leak reports on stderr when the process exits."""
    import subprocess
    import sys

    code = ("import sys; from pagedlm import LLM, SamplingParams; llm = LLM(sys.argv[1]); "
            "llm.generate(['Hi'], SamplingParams(max_tokens=2), use_tqdm=False); "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, model_dir], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "nanobind" not in proc.stderr


def test_params_changed_after_construction_are_checked_and_queued_requests_keep_theirs(llm):
    engine = llm.llm_engine
    bad = SamplingParams(temperature=0, max_tokens=4)
    bad.temperature = -1.0
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 2\]"):
        engine.add_request("bad", [BOS, 5, 6], bad)
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match=r"1 of 2 prompts are invalid; nothing was run:\n  prompt 1: temperature"):
        llm.generate([{"prompt_token_ids": [BOS, 5, 6]}] * 2, [SamplingParams(max_tokens=2), bad], use_tqdm=False)
    results = list(llm.generate_as_completed([{"prompt_token_ids": [BOS, 5, 6]}] * 2, [SamplingParams(max_tokens=2), bad],
                                             return_errors=True, use_tqdm=False))
    assert sorted((i, type(r).__name__) for i, r in results) == [(0, "RequestOutput"), (1, "FieldError")]
    assert dict(results)[1].field == "temperature"
    odd = SamplingParams(max_tokens=2)
    odd.output_kind = "junk"  # LLM runs every request FINAL_ONLY, but a bad value is still refused
    with pytest.raises(ValueError, match="prompt 0: output_kind must be one of"):
        llm.generate([{"prompt_token_ids": [BOS, 5, 6]}], odd, use_tqdm=False)

    params = SamplingParams(temperature=0, max_tokens=3)
    engine.add_request("kept", [BOS, 5, 6], params)
    params.max_tokens = 9  # after the request was added: it keeps max_tokens=3
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs[-1].outputs[0].token_ids) == 3

    params = SamplingParams(temperature=0.8, seed=1, max_tokens=2)
    params.n = 2  # best_of was never given, so it follows n
    params.logits_processors = [lambda prompt_ids, output_ids, logits: torch.where(torch.arange(logits.numel()) == 42, 0.0, -1e9)]
    out = llm.generate([{"prompt_token_ids": [BOS, 5, 6]}], params, use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [[42, 42], [42, 42]]


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm):
    """vLLM's left truncation: the request runs on the prompt's last k tokens, and its output says
    which; -1 keeps what max_model_len (256) leaves room for."""
    long = [BOS] + list(range(3, 303))  # 301 tokens: over max_model_len
    params = SamplingParams(temperature=0, max_tokens=3, truncate_prompt_tokens=20)
    got = llm.generate({"prompt_token_ids": long}, params, use_tqdm=False)[0]
    want = llm.generate({"prompt_token_ids": long[-20:]}, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert got.prompt_token_ids == long[-20:] and got.outputs[0].token_ids == want.outputs[0].token_ids
    most = llm.generate({"prompt_token_ids": long}, params.clone(truncate_prompt_tokens=-1, max_tokens=1), use_tqdm=False)[0]
    assert most.prompt_token_ids == long[-255:] and len(most.outputs[0].token_ids) == 1
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be None, -1 .the model's limit. or >= 1, got 0"):
        SamplingParams(truncate_prompt_tokens=0)


def test_tokenization_kwargs_truncate_prompts_as_vllm_0_32_does(llm):
    """vLLM 0.32 truncates through ``tokenization_kwargs={"truncate_prompt_tokens": k}`` (its
    SamplingParams no longer has the field). Found against it: a text prompt keeps the BOS its
    tokenizer adds and its last k - 1 tokens; token ids and chats keep their last k; other keys,
    and k over max_model_len, are refused. -1 keeps max_model_len - 1 tokens (vLLM 0.32 keeps
    max_model_len, which it then refuses). SamplingParams' field still applies, the smaller wins."""
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=1)

    def prompt_ids(prompts, params=greedy, **kwargs) -> list[list[int]]:
        return [o.prompt_token_ids for o in llm.generate(prompts, params, use_tqdm=False, **kwargs)]

    def truncated(k: int) -> dict:
        return {"tokenization_kwargs": {"truncate_prompt_tokens": k}}

    text = "The capital of France is Paris. The quick brown fox jumps over the lazy dog."
    full = tok(text).input_ids
    assert full[0] == BOS and len(full) > 10
    assert prompt_ids([text, {"prompt": text}], **truncated(5)) == [[BOS] + full[-4:]] * 2
    assert prompt_ids(text, **truncated(1)) == [[BOS]]
    assert prompt_ids(text, greedy.clone(truncate_prompt_tokens=5)) == [[BOS] + full[-4:]]
    engine = llm.llm_engine
    engine.add_request("truncated text", text, greedy.clone(truncate_prompt_tokens=5))
    while engine.has_unfinished_requests():
        out = engine.step()
    assert out[0].prompt_token_ids == [BOS] + full[-4:]
    assert prompt_ids(text, **truncated(len(full))) == [full]
    ids = list(range(3, 23))
    assert prompt_ids({"prompt_token_ids": ids}, **truncated(5)) == [ids[-5:]]
    long = [BOS] + list(range(3, 303))  # over max_model_len (256)
    assert prompt_ids({"prompt_token_ids": long}, **truncated(-1)) == [long[-255:]]
    assert prompt_ids({"prompt_token_ids": ids}, greedy.clone(truncate_prompt_tokens=8), **truncated(5)) == [ids[-5:]]
    assert prompt_ids({"prompt_token_ids": ids}, greedy.clone(truncate_prompt_tokens=4), **truncated(5)) == [ids[-4:]]

    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    chat = llm.chat([{"role": "user", "content": text}], greedy, use_tqdm=False, chat_template=template,
                    **truncated(4))[0]
    assert chat.prompt_token_ids == tok(chat.prompt, add_special_tokens=False).input_ids[-4:]
    streamed = llm.generate_as_completed([{"prompt_token_ids": ids}], greedy, **truncated(3))
    assert [out.prompt_token_ids for _, out in streamed] == [ids[-3:]]
    # vLLM's explicit truncation_side slices the ids as they are, a BOS among them (found by a hunt:
    # it was refused).
    for side, want in (("left", full[-5:]), ("right", full[:5])):
        kwargs = {"truncate_prompt_tokens": 5, "truncation_side": side}
        assert prompt_ids([text, {"prompt_token_ids": full}], tokenization_kwargs=kwargs) == [want] * 2
        engine.add_request(f"side {side}", text, greedy, tokenization_kwargs=kwargs)
        while engine.has_unfinished_requests():
            out = engine.step()
        assert out[0].prompt_token_ids == want
    assert prompt_ids(text, greedy.clone(truncate_prompt_tokens=3),
                      tokenization_kwargs={"truncation_side": "right"}) == [full[:3]]

    for kwargs, match in [
        ({"truncation": True}, "unknown key.s. 'truncation'; pagedlm takes 'truncate_prompt_tokens', "
                               "'truncation_side', 'add_special_tokens'"),
        ({"truncation_side": "middle"}, "truncation_side must be 'left' or 'right', got 'middle'"),
        ({"add_special_tokens": 1}, "add_special_tokens must be a bool, got 1"),
        ({"truncate_prompt_tokens": 257}, r"truncate_prompt_tokens \(257\) cannot be greater than max_model_len \(256\)"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be None, -1 .the model's limit. or >= 1, got 0"),
        ({"truncate_prompt_tokens": 5.0}, "truncate_prompt_tokens must be an int"),
        ([("truncate_prompt_tokens", 5)], "tokenization_kwargs must be a dict, got list"),
    ]:
        for call in (lambda: llm.generate(text, greedy, use_tqdm=False, tokenization_kwargs=kwargs),
                     lambda: llm.chat([{"role": "user", "content": text}], greedy, use_tqdm=False,
                                      chat_template=template, tokenization_kwargs=kwargs),
                     lambda: llm.generate_as_completed([text], greedy, tokenization_kwargs=kwargs)):
            with pytest.raises(ValueError, match=match):
                call()
    assert not llm.llm_engine.has_unfinished_requests()
    assert prompt_ids(text, tokenization_kwargs={"truncate_prompt_tokens": None}) == [full]
    # SamplingParams' own, per request (it is checked against the LLM's max_model_len when added).
    with pytest.raises(ValueError, match=r"prompt 0: truncate_prompt_tokens \(257\) cannot be greater than "
                                         r"max_model_len \(256\)"):
        llm.generate(text, greedy.clone(truncate_prompt_tokens=257), use_tqdm=False)


def test_arguments_of_the_wrong_kind_are_refused_at_the_call(llm):
    """Refused before anything runs (a generator is not even started), naming the argument."""
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams, None, or an iterable .* got dict"):
        llm.generate_as_completed(["a"], {"max_tokens": 1})
    with pytest.raises(ValueError, match="return_errors must be a bool, got 'no'"):
        llm.generate_as_completed(["a"], return_errors="no")
    for call in (lambda: llm.generate("a", use_tqdm="no"), lambda: llm.generate_as_completed(["a"], use_tqdm=0)):
        with pytest.raises(ValueError, match="use_tqdm must be a bool or a callable"):
            call()
    # bytes are a sequence of ints: they would run as one-token prompts.
    for call in (lambda: llm.generate(b"hello"), lambda: llm.generate_as_completed(bytearray(b"hi"))):
        with pytest.raises(ValueError, match="got (bytes|bytearray): decode it to a str first"):
            call()
    for prompts in (5, None):  # a hunt: zip's TypeError, naming no argument
        with pytest.raises(ValueError, match="prompts must be a prompt or an iterable of prompts, got (int|NoneType)"):
            llm.generate_as_completed(prompts)
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=r"arrival_time must be None or time.monotonic\(\) seconds .* got 'now'"):
        engine.add_request("late", "Hello", SamplingParams(), "now")
    with pytest.raises(ValueError) as err:
        engine.add_request("bad", {"prompt_token_ids": [-1]}, SamplingParams())
    assert not str(err.value).endswith("..")
    assert not engine.has_unfinished_requests()


def test_what_a_vllm_script_reads_and_calls_is_there_or_explained(llm, llama_dir):
    """vLLM's output fields pagedlm never sets are None, its ``model_config`` and exports are where
    vLLM has them, its arguments at their defaults are taken, and its methods pagedlm has not say
    what to use instead."""
    from pagedlm import PromptType  # noqa: F401
    from pagedlm.logprobs import Logprob, PromptLogprobs, SampleLogprobs  # noqa: F401

    out = llm.generate([[BOS, 5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert (out.metrics, out.lora_request, out.encoder_prompt, out.encoder_prompt_token_ids) == (None,) * 4
    assert out.outputs[0].lora_request is None
    assert llm.model_config is llm.llm_engine.model_config and llm.reset_prefix_cache() is True is llm.llm_engine.reset_prefix_cache()
    with pytest.raises(AttributeError, match="LLM.embed is vLLM's; pagedlm does not have it: pagedlm runs generative"):
        llm.embed(["x"])
    assert not hasattr(llm, "sleep") and not hasattr(llm, "no_such_method")
    unbuilt = LLM.__new__(LLM)  # an __init__ that raised: a property names what is missing, not itself
    with pytest.raises(AttributeError, match="'LLM' object has no attribute '_engine'"):
        unbuilt.model_config
    LLM(llama_dir, dtype="float32", runner="auto", convert="auto", compilation_config=0, enable_lora=False,
        cpu_offload_gb=0.0, logits_processors=[], mm_processor_kwargs=None, swap_space=4).close()
    # vLLM 0.32's arguments at their no-op values (found by an examples hunt: a bare TypeError).
    LLM(llama_dir, dtype="float32", served_model_name=None, logprobs_mode="raw_logprobs", scheduling_policy="fcfs",
        enable_sleep_mode=False, model_impl="auto", worker_cls="auto", stream_interval=1, mm_processor_kwargs={},
        limit_mm_per_prompt={"image": 0, "video": 0}, language_model_only=True, disable_cascade_attn=True,
        config_format="hf", long_prefill_token_threshold=0).close()
    with LLM(llama_dir, dtype="float32", num_gpu_blocks_override=40) as llm:  # vLLM's name for num_kv_blocks
        assert llm.llm_engine.block_manager.num_kv_blocks == 40
    with pytest.raises(ValueError, match="num_gpu_blocks_override is vLLM's name for num_kv_blocks: give one"):
        LLM(llama_dir, num_gpu_blocks_override=40, num_kv_blocks=40)
    with pytest.raises(ValueError, match=r"num_gpu_blocks_override \(num_kv_blocks\) must be a positive int, got 0"):
        LLM(llama_dir, num_gpu_blocks_override=0)  # a hunt: the message named num_kv_blocks alone
    with pytest.raises(ValueError, match=r"limit_mm_per_prompt must be None or \{\} \(pagedlm runs text-only models\)"):
        LLM(llama_dir, limit_mm_per_prompt={"image": 1})
    for name, value, why in [("logprobs_mode", "processed_logprobs", "vLLM's raw_logprobs"),
                             ("scheduling_policy", "priority", "first come, first served"),
                             ("served_model_name", "m", "serves no API")]:
        with pytest.raises(ValueError, match=rf"{name} must be .*{why}.*got {value!r}"):
            LLM(llama_dir, **{name: value})
    with pytest.raises(AttributeError, match="LLM.release_kv_cache_memory is vLLM's; pagedlm does not have it"):
        llm.release_kv_cache_memory()
    with pytest.raises(AttributeError, match="LLM.update_weights is vLLM's; .*create a new LLM"):  # its RL methods
        llm.update_weights()
    with pytest.raises(ValueError, match=r"enable_lora must be False \(pagedlm runs no LoRA adapters\), got True"):
        LLM(llama_dir, enable_lora=True)


def test_the_demo_reports_a_bad_value_as_a_usage_error_before_loading(capsys, monkeypatch):
    from pagedlm.entrypoints import demo

    monkeypatch.setattr(demo, "LLM", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit):
        demo.main(["--max-tokens", "0"])
    assert "pagedlm: error: max_tokens must be None or at least 1, got 0." in capsys.readouterr().err


def test_a_request_added_to_the_engine_inside_an_iteration_is_named_when_it_finishes(llm):
    """Found by a hunt: it ended the iteration with a bare KeyError of its id."""
    outputs = llm.generate_as_completed([[BOS, 5, 6], [BOS, 7, 8]], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                                                                     for n in (1, 8)])
    next(outputs)
    llm.llm_engine.add_request("sneaky", [BOS, 9], SamplingParams(max_tokens=1))
    with pytest.raises(RuntimeError, match="request 'sneaky', added with llm_engine.add_request while this LLM was"):
        list(outputs)
    assert not llm.llm_engine.has_unfinished_requests()


def test_enqueue_then_wait_for_completion_runs_the_queue_in_its_order(llama_dir):
    """vLLM's enqueue / enqueue_chat / wait_for_completion: requests checked and queued, run
    together by the wait, their outputs in queue order under the returned request ids, as
    generate and chat give them; generate between runs only its own prompts; a bad prompt queues
    nothing; a wait that raises leaves the queue to run again."""
    llm = LLM(llama_dir, dtype="float32", max_model_len=256, max_num_seqs=4)
    greedy, sampled = SamplingParams(temperature=0, max_tokens=6), SamplingParams(n=6, seed=3, max_tokens=4)
    prompts = ["hello there", {"prompt_token_ids": [BOS, 40, 41, 42]}]
    chat = [{"role": "user", "content": "hi"}]
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    ids = llm.enqueue(prompts, greedy, use_tqdm=False) + llm.enqueue_chat(chat, sampled, use_tqdm=False,
                                                                         chat_template=template)
    assert len(set(ids)) == 3
    alone = llm.generate(["other"], greedy, use_tqdm=False)
    assert alone[0].request_id not in ids
    with pytest.raises(ValueError, match="1 of 2 prompts are invalid; nothing was run"):
        llm.enqueue(["fine", {"prompt_token_ids": [VOCAB_SIZE]}], greedy)
    outs = llm.wait_for_completion(RequestOutput, use_tqdm=False)
    assert [o.request_id for o in outs] == ids and llm.wait_for_completion(use_tqdm=False) == []
    expected = llm.generate(prompts, greedy, use_tqdm=False) + llm.chat(chat, sampled, use_tqdm=False,
                                                                          chat_template=template)
    assert [o.outputs for o in outs] == [o.outputs for o in expected] and len(outs[2].outputs) == 6
    assert outs[2].prompt == expected[2].prompt

    calls = []

    def fails_once(output_ids, logits):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a processor's bad day")
        return logits

    llm.enqueue(prompts, greedy.clone(logits_processors=[fails_once]), use_tqdm=False)
    with pytest.raises(RuntimeError, match="bad day"):
        llm.wait_for_completion(use_tqdm=False)
    again = llm.wait_for_completion(use_tqdm=False)
    assert [o.outputs for o in again] == [o.outputs for o in expected[:2]]
    for output_type in (str, (1,), ("x", RequestOutput)):  # a hunt: a tuple of non-types raised issubclass' TypeError
        with pytest.raises(ValueError, match="output_type must be None or a type RequestOutput is an instance of"):
            llm.wait_for_completion(output_type)
    assert llm.wait_for_completion(object, use_tqdm=False) == []

    # Two waits at once: the queue goes to one of them whole; nothing runs twice or is lost.
    ids = llm.enqueue([f"p{i}" for i in range(6)], greedy, use_tqdm=False)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(llm.wait_for_completion(use_tqdm=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.request_id for r in results for o in r) == sorted(ids) and len(results) == 2

    def waits(output_ids, logits):  # a processor calling into its own LLM would wait for its step forever
        llm.wait_for_completion(use_tqdm=False)
        return logits

    for call in (lambda: llm.generate("x", greedy.clone(logits_processors=[waits]), use_tqdm=False),
                 lambda: llm.wait_for_completion(use_tqdm=False)):
        llm.enqueue("queued", greedy.clone(logits_processors=[waits]), use_tqdm=False)
        with pytest.raises(RuntimeError, match="wait_for_completion was called from inside a step of this LLM"):
            call()

    def closes(output_ids, logits):
        llm.close()
        return logits

    with pytest.raises(RuntimeError, match=r"close\(\) was called from inside a step of this LLM"):
        llm.generate("x", greedy.clone(logits_processors=[closes]), use_tqdm=False)
    llm.enqueue(prompts, greedy, use_tqdm=False)
    llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.wait_for_completion()
