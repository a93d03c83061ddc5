"""Greedy parity with Hugging Face transformers on the same weights (float32)."""

import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (
    EOS, VOCAB_SIZE, assert_first_tokens_match_hf_bf16, assert_prompt_logprobs_match_hf, hf_greedy, prompt_logprob_errors,
)
from pagedlm import LLM, SamplingParams, ops

LENGTHS = [1, 2, 5, 15, 16, 17, 31, 32, 33, 64, 100, 129, 200, 250, 300, 7]
MAX_TOKENS = 24


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in lengths]


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_engine_runs_the_extension_kernels():
    """The parity tests below run through pagedlm._C unless the reference is forced explicitly."""
    print("ops backend on cpu:", ops.backend_for("cpu"))
    if os.environ.get("PAGEDLM_OPS_BACKEND") != "torch-reference":
        assert ops.EXTENSION_LOADED and ops.backend_for("cpu") == "cpu"


def test_greedy_matches_hf_in_one_batch(model_dir):
    prompts = _prompts(0, LENGTHS)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    llm = LLM(model_dir, dtype="float32")
    assert _generate(llm, prompts) == expected
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_kv_blocks


def test_greedy_independent_of_batch_composition(llama_dir):
    prompts = _prompts(1, LENGTHS)
    expected = hf_greedy(llama_dir, prompts, MAX_TOKENS)
    llm = LLM(llama_dir, dtype="float32")
    order = list(range(len(prompts)))
    random.Random(2).shuffle(order)
    extra = _prompts(3, [40, 3, 90, 180, 11])
    mixed = [prompts[i] for i in order] + extra
    got = _generate(llm, mixed)
    assert [got[order.index(i)] for i in range(len(prompts))] == expected
    # Small step budgets change how prefill is chunked and which requests share a step.
    small = LLM(llama_dir, dtype="float32", max_num_seqs=3, max_num_batched_tokens=48)
    assert _generate(small, prompts) == expected


def test_preemption_keeps_outputs_identical(llama_dir):
    prompts = _prompts(4, [60, 70, 80, 90, 50, 40, 30, 100])
    expected = hf_greedy(llama_dir, prompts, 40)
    # 20 blocks of 16 tokens cannot hold all eight sequences at once: the scheduler must preempt.
    llm = LLM(llama_dir, dtype="float32", num_kv_blocks=20)
    assert _generate(llm, prompts, 40) == expected
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_kv_blocks


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_mostly_agrees(llama_dir, dtype):
    prompts = _prompts(5, [5, 50, 120])
    expected = hf_greedy(llama_dir, prompts, 8, dtype=getattr(torch, dtype))
    llm = LLM(llama_dir, dtype=dtype)
    assert llm.llm_engine.model_config.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float16)
    got = _generate(llm, prompts, 8)
    # Low precision may flip near-ties later in a sequence; the first token must agree.
    assert [g[0] for g in got] == [e[0] for e in expected]


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and ops.backend_for("cuda") == "cuda"), reason="needs a GPU and CUDA kernels")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_matches_hf_on_cuda(llama_dir, dtype):
    """The CUDA kernels end to end against HF on the same GPU; bf16 may flip near-ties late in a
    sequence (different attention accumulation order), so there the first tokens must agree."""
    prompts = _prompts(6, LENGTHS)
    expected = hf_greedy(llama_dir, prompts, MAX_TOKENS, dtype=getattr(torch, dtype), device="cuda")
    llm = LLM(llama_dir, dtype=dtype, device="cuda")
    got = _generate(llm, prompts)
    if dtype == "float32":
        assert got == expected
    else:
        assert [g[:4] for g in got] == [e[:4] for e in expected]
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_kv_blocks


@pytest.mark.parametrize(
    "arch", ["qwen3", "granite", "phi3", "phi3_longrope", "llama_longrope", "phi3_odd_rotary", "gemma", "gemma2",
             "gemma3", "mistral_swa", "qwen2_swa", "smollm3", "olmo2", "olmo3"]
)
def test_under_preemption_and_prefix_cache_hits(tmp_path, tokenizer_dir, arch):
    from conftest import make_checkpoint

    path = make_checkpoint(str(tmp_path / arch), arch, tokenizer_dir)
    shared = _prompts(7, [48])[0]
    prompts = [shared + p for p in _prompts(8, [10, 30, 50, 70, 20, 40, 60, 5])]
    expected = hf_greedy(path, prompts, 30)
    # 20 blocks of 16 tokens cannot hold all eight at once (preemption); the shared 48-token prefix
    # (longer than the sliding windows) is served from the prefix cache after the first prompt.
    llm = LLM(path, dtype="float32", num_kv_blocks=20)
    assert _generate(llm, prompts, 30) == expected
    stats = llm.get_stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert _generate(llm, prompts, 30) == expected  # again, now mostly from the cache
    # bfloat16: the first tokens are HF's bfloat16 ones, up to a near-tie one bf16 step apart.
    assert_first_tokens_match_hf_bf16(path, prompts[:4], [g[0] for g in _generate(LLM(path, dtype="bfloat16"),
                                                                                  prompts[:4], 4)])


@pytest.mark.parametrize("arch", ["mistral_swa", "qwen2_swa", "gemma2", "gemma3", "smollm3", "olmo3"])
def test_prompt_logprobs_match_hf_across_sliding_windows(tmp_path, tokenizer_dir, arch):
    """Every position of prompts several windows long, prefilled in 64-token chunks (so chunks start
    inside and outside the windows), against one Hugging Face forward pass. Greedy continuations alone
    can miss a wrong window: with random weights they often do not depend on the far context."""
    from conftest import make_checkpoint

    path = make_checkpoint(str(tmp_path / arch), arch, tokenizer_dir)
    assert_prompt_logprobs_match_hf(LLM(path, dtype="float32", max_num_batched_tokens=64, max_num_seqs=2), path,
                                     _prompts(9, [300, 130, 47]))


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_multimodal_gemma3_runs_its_language_model(tmp_path, tokenizer_dir, tie_word_embeddings):
    """A Gemma3ForConditionalGeneration checkpoint (vision tower and projector saved beside the
    language model under "language_model.model.*"): text prompts give transformers' greedy tokens.
    Its top-level tie_word_embeddings and EOS ids count, as transformers reads them (the text
    config's say otherwise)."""
    import shutil

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from conftest import _CONFIGS, VOCAB_SIZE

    text = _CONFIGS["gemma3"]()
    text.vocab_size = VOCAB_SIZE
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=VOCAB_SIZE - 1, boi_token_index=VOCAB_SIZE - 2,
                          eoi_token_index=VOCAB_SIZE - 3, tie_word_embeddings=tie_word_embeddings,
                          eos_token_id=[EOS, VOCAB_SIZE - 4])
    torch.manual_seed(0)
    path = tmp_path / "gemma3_mm"
    Gemma3ForConditionalGeneration(config).save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path / name)
    prompts = _prompts(10, [5, 60, 130])
    expected = hf_greedy(str(path), prompts, 16)
    llm = LLM(str(path), dtype="float32")
    assert VOCAB_SIZE - 4 in llm.llm_engine.stop_checker.eos_token_ids
    assert _generate(llm, prompts, 16) == expected


@pytest.mark.parametrize("text_arch", ["mistral", "ministral3"])
def test_multimodal_mistral3_runs_its_language_model(tmp_path, tokenizer_dir, text_arch):
    """A Mistral3ForConditionalGeneration checkpoint (Mistral Small 3.1/3.2 with a Mistral text
    config, Ministral 3 with its own): text prompts give transformers' greedy tokens and prompt
    log-probabilities; Ministral 3's attention temperature on q from original_max_position_embeddings
    (64 here) on, which the longer prompts cross."""
    import shutil

    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    from conftest import _CONFIGS, VOCAB_SIZE

    text = _CONFIGS[text_arch]()
    text.vocab_size = VOCAB_SIZE
    if text_arch == "ministral3":
        text.rope_parameters.update(original_max_position_embeddings=64, factor=16.0)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=28, patch_size=14, head_dim=16)
    config = Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=VOCAB_SIZE - 1,
                            spatial_merge_size=1)
    torch.manual_seed(0)
    path = tmp_path / "mistral3_mm"
    Mistral3ForConditionalGeneration(config).save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path / name)
    prompts = _prompts(16, [5, 40, 110, 200])
    llm = LLM(str(path), dtype="float32")
    hf = Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
                    for p in prompts]
    assert _generate(llm, prompts, 16) == [e[: e.index(EOS) + 1] if EOS in e else e for e in expected]
    assert prompt_logprob_errors(llm, str(path), prompts, hf).max() <= 2e-4


def test_a_composite_checkpoint_of_another_text_model_is_refused_naming_it(tmp_path, tokenizer_dir):
    """Found by a review: a Mistral 3 checkpoint whose language model is Mistral 4's (MLA, MoE) was
    loaded as Mistral's, failing on its first unexpected weight with a hint about architectures."""
    import shutil

    from transformers import Mistral3Config, Mistral4Config, PixtralVisionConfig

    text = Mistral4Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                          vocab_size=VOCAB_SIZE)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=28, patch_size=14, head_dim=16)
    Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                   architectures=["Mistral3ForConditionalGeneration"]).save_pretrained(tmp_path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), tmp_path / name)
    with pytest.raises(ValueError, match="Mistral3ForConditionalGeneration with a text config of model_type 'mistral4' "
                                         "is not supported; supported: 'mistral', 'ministral3'"):
        LLM(str(tmp_path))


def test_longrope_siblings_cross_the_threshold_on_their_own(tmp_path, tokenizer_dir):
    """n=2 sampled completions of prompts that cross LongRoPE's 64-token threshold while generating,
    preempted (after which siblings run out of step): each completion switches factors when it crosses
    itself, so the results equal those of a run without preemption."""
    from conftest import make_checkpoint

    path = make_checkpoint(str(tmp_path / "phi3_longrope"), "phi3_longrope", tokenizer_dir)
    prompts = _prompts(11, [50, 60, 63, 40, 58, 45])
    params = [SamplingParams(n=2, temperature=0.9, top_p=0.9, seed=7 + i, max_tokens=24, logprobs=0)
              for i in range(len(prompts))]

    def run(**kwargs):
        llm = LLM(path, dtype="float32", block_size=8, **kwargs)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return llm, [[(c.token_ids, [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]) for c in o.outputs]
                     for o in outs]

    _, expected = run()
    tight, got = run(num_kv_blocks=24)
    assert tight.get_stats()["num_preemptions"] > 0
    assert got == expected


def test_longrope_siblings_on_both_sides_of_the_threshold_fit_the_cache(tmp_path, tokenizer_dir):
    """Found by a fuzz hunt: siblings out of step (a two-token step budget shared with another
    request) on both sides of the threshold hold two copies of the prompt's blocks (their salts
    differ); admission counted one, and the recompute's re-admission failed an assertion out of
    generate. Admission counts both: such a request is refused up front or runs to its end."""
    from conftest import make_checkpoint

    path = make_checkpoint(str(tmp_path / "phi3_longrope"), "phi3_longrope", tokenizer_dir)
    prompts = [{"prompt_token_ids": [5]}, {"prompt_token_ids": _prompts(3, [60])[0]}]
    params = [SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=20, ignore_eos=True)]
    tight = dict(dtype="float32", block_size=8, max_num_seqs=2, max_num_batched_tokens=2, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="60 prompt tokens \\+ max_tokens \\(20\\) do not fit the KV cache: its 16 KV "
                                         "blocks of 8 tokens hold at most 64 tokens"):
        LLM(path, num_kv_blocks=16, **tight).generate(prompts, params, use_tqdm=False)
    expected = LLM(path, dtype="float32", block_size=8).generate(prompts, params, use_tqdm=False)
    got = LLM(path, num_kv_blocks=20, **tight).generate(prompts, params, use_tqdm=False)  # two copies: 20 blocks
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in expected]


def test_longrope_for_one_layer_type_is_refused(tmp_path, tokenizer_dir):
    """Gemma 3's RoPE per layer type: "longrope" on one type would switch those layers alone."""
    from conftest import make_checkpoint

    path = make_checkpoint(str(tmp_path / "gemma3"), "gemma3", tokenizer_dir)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["rope_parameters"]["full_attention"] = {
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
        "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="rope_type 'longrope' for the full_attention layers .* is not supported"):
        LLM(path, dtype="float32")


def test_no_chunked_prefill_needs_a_budget_of_max_model_len(llama_dir):
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(512\) must be >= max_model_len \(1024\)"):
        LLM(llama_dir, enable_chunked_prefill=False, max_num_batched_tokens=512)


def test_max_num_seqs_over_the_default_token_budget_says_it_is_a_default(llama_dir):
    """Found by a hunt: the refusal named a max_num_batched_tokens the user never set."""
    with pytest.raises(ValueError, match=r"max_num_seqs \(3000\) must be <= max_num_batched_tokens, which defaults to "
                                         r"2048 here; set max_num_batched_tokens too"):
        LLM(llama_dir, max_num_seqs=3000)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(2048\) must be >= max_num_seqs \(3000\)"):
        LLM(llama_dir, max_num_seqs=3000, max_num_batched_tokens=2048)


def _edited_checkpoint(tmp_path, tokenizer_dir, arch: str, **fields) -> str:
    from conftest import make_checkpoint

    path = make_checkpoint(str(tmp_path / arch), arch, tokenizer_dir)
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, **fields}, f)
    return path


@pytest.mark.parametrize("where", ["compression_config", "text_config", "quantize_config.json", "hf_quant_config.json"])
def test_quantized_checkpoints_are_refused_before_the_model_is_built(tmp_path, tokenizer_dir, where):
    """Found by a hunt: a compressed-tensors checkpoint naming its scheme in ``compression_config``, a
    composite model's ``text_config.quantization_config`` (vLLM 0.32 reads both) and a quantizer's own
    file beside the config were refused only by a weight name, after the model was built (or not at all)."""
    from transformers import Gemma3Config, SiglipVisionConfig

    from conftest import _CONFIGS

    fp8 = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    if where == "text_config":
        text = _CONFIGS["gemma3"]().to_dict()
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        path = str(tmp_path / "gemma3_mm")
        Gemma3Config(text_config={**text, "quantization_config": fp8}, vision_config=vision.to_dict()).save_pretrained(path)
        message = r"quantized checkpoint \(text_config.quantization_config: compressed-tensors\)"
    elif where == "compression_config":
        path = _edited_checkpoint(tmp_path, tokenizer_dir, "llama", compression_config=fp8)
        message = r"quantized checkpoint \(compression_config: compressed-tensors\)"
    else:
        path = _edited_checkpoint(tmp_path, tokenizer_dir, "llama")
        with open(os.path.join(path, where), "w") as f:
            json.dump({"bits": 4, "group_size": 128}, f)
        message = rf"quantized checkpoint \({where} beside its config\)"
    with pytest.raises(ValueError, match=message):
        LLM(path, dtype="float32")
    if where == "compression_config":  # one whose entries are all null quantizes nothing (a review)
        path = _edited_checkpoint(tmp_path / "none", tokenizer_dir, "llama",
                                  compression_config={"quantization_config": None, "sparsity_config": None})
        LLM(path, dtype="float32", num_kv_blocks=8).close()


@pytest.mark.parametrize("arch,field,value,message", [
    ("llama", "hidden_act", "gelu", r"hidden_act 'gelu' is not supported for this architecture; supported: 'silu' "
                                    r"\('swish'\)"),
    ("gemma", "hidden_act", "relu", r"Gemma's hidden_act 'relu' is not supported; supported: \('gelu_pytorch_tanh'"),
    ("qwen2_swa", "layer_types", ["full_attention", "chunked_attention"],
     r"layer_types\[1\] = 'chunked_attention' is not supported"),
    ("llama", "rope_parameters", {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
     r"rope_type 'dynamic' .* not supported"),
    # Found by a hunt: an fp8 checkpoint failed on its first weight_scale tensor, naming no quantization.
    ("llama", "quantization_config", {"quant_method": "fp8", "activation_scheme": "dynamic"},
     r"is a quantized checkpoint \(quantization_config: fp8\); pagedlm runs checkpoints in float32"),
    # Found by a hunt: transformers cannot build a sliding layer's mask without a window (pagedlm
    # attended fully).
    ("qwen2_swa", "sliding_window", None, r"layer_types\[1\] is 'sliding_attention' but sliding_window is None"),
    # Found by a hunt: a soft cap of 0 ran uncapped (transformers divides by it), a negative window
    # failed only in the first step's kernel.
    ("gemma2", "attn_logit_softcapping", 0.0, r"attn_logit_softcapping must be a positive number or null"),
    ("gemma2", "final_logit_softcapping", 0.0, r"final_logit_softcapping must be a positive number or null"),
    ("mistral_swa", "sliding_window", -5, r"sliding_window must be a number of tokens >= 0 or null"),
    ("gemma2", "attn_logit_softcapping", float("inf"), r"attn_logit_softcapping must be a positive number or null"),
    # Found by a hunt: a Granite attention_multiplier of 0 ran at the default scale (transformers:
    # uniform attention); the kernels take positive scales only. A zero query_pre_attn_scalar raised
    # ZeroDivisionError, a negative one a complex scale; a zero logits_scaling gave infinite logits.
    ("granite", "attention_multiplier", 0.0, r"attention_multiplier \(the softmax scale\) must be a positive number"),
    ("granite", "attention_multiplier", -0.2, r"attention_multiplier \(the softmax scale\) must be a positive number"),
    ("gemma2", "query_pre_attn_scalar", 0, r"query_pre_attn_scalar \(the softmax scale is its \*\* -0.5\) must be a "),
    ("gemma3", "query_pre_attn_scalar", -4, r"query_pre_attn_scalar .* must be a positive number, got -4"),
    # Found by a hunt: 0 layers failed after the weights loaded (ZeroDivisionError), -1 with a KV
    # cache of negative bytes; heads that are no multiple of the KV heads in the first step's kernel.
    ("llama", "num_hidden_layers", 0, r"the config's num_hidden_layers must be a positive integer, got 0"),
    ("llama", "num_hidden_layers", -1, r"num_hidden_layers must be a positive integer, got -1"),
    ("qwen3", "head_dim", 0, r"the config's head_dim must be a positive integer, got 0"),
    ("llama", "num_key_value_heads", 3, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    # transformers' own check of a field's type, a StrictDataclassError, is no ValueError.
    ("gemma2", "query_pre_attn_scalar", 0.5, r"its config does not validate: .*query_pre_attn_scalar"),
    ("granite", "logits_scaling", 0.0, r"logits_scaling \(the logits are divided by it\) must be a finite number "),
    # Found by a hunt: a TypeError and an IndexError.
    ("ministral3", "rope_parameters", {"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.2},
     r"set llama_4_scaling_beta, whose temperature steps every original_max_position_embeddings positions"),
    ("smollm3", "no_rope_layers", [1], r"no_rope_layers holds 1 entries for 3 layers"),
    # Found by a hunt: a Qwen2 checkpoint (biases) labelled LlamaForCausalLM named only the weight.
    ("qwen2", "architectures", ["LlamaForCausalLM"],
     r"Unexpected weight '.*self_attn.[qkv]_proj.bias' in .*: LlamaForCausalLM, the model of the config's architectures"),
])
def test_unsupported_config_fields_are_refused(tmp_path, tokenizer_dir, arch, field, value, message):
    """A config field the native model would not honour is refused, never run as something else."""
    path = _edited_checkpoint(tmp_path, tokenizer_dir, arch, **{field: value})
    with pytest.raises(ValueError, match=message):
        LLM(path, dtype="float32")


def test_an_unsupported_architecture_is_named_before_its_config_s_fields(tmp_path, tokenizer_dir):
    """Found by a review: the size checks ran before the architecture's, so a GPT-2 checkpoint (no
    intermediate_size) was refused as a config field instead of as an architecture."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = str(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB_SIZE)).save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        os.symlink(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    with pytest.raises(ValueError, match=r"Model architectures \['GPT2LMHeadModel'\] \(model_type 'gpt2'\) are not "
                                         r"supported; supported architectures: LlamaForCausalLM"):
        LLM(path, dtype="float32")


def test_a_swish_llama_runs_as_transformers_silu(tmp_path, tokenizer_dir):
    """transformers maps hidden_act "swish" to SiLU (found by a hunt: refused)."""
    path = _edited_checkpoint(tmp_path, tokenizer_dir, "llama", hidden_act="swish")
    prompts = _prompts(13, [20, 35])
    assert _generate(LLM(path, dtype="float32"), prompts, 8) == hf_greedy(path, prompts, 8)


def test_a_rope_override_per_layer_type_keeps_what_it_leaves_out(tmp_path, tokenizer_dir):
    """hf_overrides' rope_parameters on a model with a RoPE per layer type (Gemma 3): a layer type
    the override names is replaced (keeping its rope_theta), one it leaves out keeps the model's;
    a flat override, or one without its rope_type, is refused (found by a hunt: both ran the
    layers at theta 10,000)."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
    path = _edited_checkpoint(tmp_path, tokenizer_dir, "gemma3", rope_parameters=rope)
    yarn = {"rope_type": "yarn", "factor": 4.0}
    llm = LLM(path, dtype="float32", hf_overrides={"rope_parameters": {"full_attention": yarn}})
    expected = {**rope, "full_attention": {**yarn, "rope_theta": 1000000.0,
                                           "original_max_position_embeddings": llm.model_config.max_model_len}}
    assert llm.model_config.hf_config.rope_parameters == expected
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, rope_parameters=expected).eval()
    errors = prompt_logprob_errors(llm, path, _prompts(15, [40, 25]), hf)
    assert errors.max() <= 2e-4, f"prompt log-probabilities differ from HF's by up to {errors.max():.2e}"
    for override, message in [({"rope_type": "linear", "factor": 2.0}, r"a RoPE per layer type \(.*sliding_attention"),
                              ({"full_attention": {"factor": 3.0}}, r"rope_parameters\['full_attention'\] must be a "
                                                                    r"dict naming its rope_type")]:
        with pytest.raises(ValueError, match=message):
            LLM(path, dtype="float32", hf_overrides={"rope_parameters": override})


def test_overrides_of_what_transformers_builds_the_config_from(tmp_path, tokenizer_dir):
    """Found by a hunt: hf_overrides' original_max_position_embeddings on a LongRoPE model set the
    top-level field only, while the RoPE reads rope_parameters' copy (prompt logprobs off by 5.4);
    it is set there too, as transformers' from_pretrained(**fields) has it. A field transformers
    reads only while building the config (use_sliding_window into layer_types) changed nothing:
    refused, naming what to override instead."""
    path = _edited_checkpoint(tmp_path, tokenizer_dir, "phi3_longrope")
    llm = LLM(path, dtype="float32", hf_overrides={"original_max_position_embeddings": 32})
    assert llm.model_config.hf_config.rope_parameters["original_max_position_embeddings"] == 32
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, original_max_position_embeddings=32).eval()
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 32
    errors = prompt_logprob_errors(llm, path, _prompts(15, [40]), hf)
    assert errors.max() <= 2e-4, f"prompt log-probabilities differ from HF's by up to {errors.max():.2e}"
    swa = _edited_checkpoint(tmp_path, tokenizer_dir, "qwen2_swa")
    for field in ("use_sliding_window", "max_window_layers"):
        with pytest.raises(ValueError, match=f"'{field}' is read only while transformers builds the config, into "
                                             "layer_types, .* override layer_types instead"):
            LLM(swa, dtype="float32", hf_overrides={field: 0 if field == "max_window_layers" else False})


def test_fewer_layers_by_hf_overrides_load_the_first_ones(llama_dir, caplog):
    """hf_overrides={"num_hidden_layers": 1} (a quick test of a large checkpoint) runs the first
    layer, as transformers' from_pretrained(num_hidden_layers=1) does (found by a hunt: the second
    layer's weights were refused as not the architecture's)."""
    import logging

    with caplog.at_level(logging.INFO, logger="pagedlm"):
        llm = LLM(llama_dir, dtype="float32", hf_overrides={"num_hidden_layers": 1})
    assert "The checkpoint's layers 1-1 are not loaded: the model has 1 (num_hidden_layers)." in caplog.text
    prompts = _prompts(17, [20, 9])
    assert _generate(llm, prompts, 6) == hf_greedy(llama_dir, prompts, 6, num_hidden_layers=1)


def test_linear_rope_scaling_lengthens_the_model_as_vllm_reads_it(tmp_path, tokenizer_dir):
    """A linear factor's checkpoint was tuned at max_position_embeddings x factor (vicuna-v1.5-16k):
    that is max_model_len (vLLM's reading; it was capped at max_position_embeddings), and a prompt
    past max_position_embeddings gives transformers' tokens."""
    path = _edited_checkpoint(tmp_path, tokenizer_dir, "llama", max_position_embeddings=128,
                              rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    llm = LLM(path, dtype="float32")
    assert llm.llm_engine.model_config.max_model_len == 512
    prompts = _prompts(13, [300, 40])
    assert _generate(llm, prompts, 8) == hf_greedy(path, prompts, 8)
    with pytest.raises(ValueError, match=r"max_model_len must be an int in \[1, 512\]"):
        LLM(path, max_model_len=513)


_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}


@pytest.mark.parametrize("arch,rope", [
    ("llama", _YARN),
    ("qwen3", {**_YARN, "beta_fast": 16, "beta_slow": 2, "truncate": False}),
    ("qwen2", {**_YARN, "mscale": 0.8, "mscale_all_dim": 0.5}),
    ("mistral", {**_YARN, "attention_factor": 0.9, "factor": None}),  # the factor from the two lengths
    ("gemma", {**_YARN, "factor": 1.0}),  # no scaling, no attention factor
    # A RoPE per layer type: transformers reads "truncate" from the top level only (so True here).
    ("gemma3", {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {**_YARN, "truncate": False, "beta_fast": 8}}),
])
def test_yarn_rope_scaling_matches_transformers(tmp_path, tokenizer_dir, arch, rope):
    """YaRN ("rope_type": "yarn", what Qwen2.5's and Qwen3's model cards add for long contexts),
    across the original length of 64: every prompt position's log-probabilities and greedy tokens."""
    path = _edited_checkpoint(tmp_path, tokenizer_dir, arch, max_position_embeddings=256, rope_parameters=rope)
    llm = LLM(path, dtype="float32")
    assert llm.llm_engine.model_config.max_model_len == 256  # vLLM's: YaRN does not lengthen max_position_embeddings
    prompts = _prompts(15, [150, 40])
    assert_prompt_logprobs_match_hf(llm, path, prompts)
    assert _generate(llm, prompts, 12) == hf_greedy(path, prompts, 12)


_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
             "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 2.5 * i for i in range(8)]}


@pytest.mark.parametrize("arch,rope", [
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "rope_theta": 500000.0}),
    ("qwen2", {k: v for k, v in _YARN.items() if k != "original_max_position_embeddings"}),
    ("qwen2", {**_YARN, "original_max_position_embeddings": 100}),
    ("llama", _LONGROPE),
])
def test_a_top_level_original_max_position_embeddings_wins_as_in_transformers(tmp_path, tokenizer_dir, arch, rope):
    """Found by a hunt: a config's own original_max_position_embeddings beside a llama3, yarn or
    longrope RoPE without it, or with another value in it, was not read (transformers' model
    gives it priority, as Phi-3 keeps it there): other logits from the second position on."""
    path = _edited_checkpoint(tmp_path, tokenizer_dir, arch, max_position_embeddings=256,
                              original_max_position_embeddings=32, rope_parameters=rope)
    llm = LLM(path, dtype="float32")
    prompts = _prompts(16, [150, 40])
    assert_prompt_logprobs_match_hf(llm, path, prompts)
    assert _generate(llm, prompts, 8) == hf_greedy(path, prompts, 8)


@pytest.mark.parametrize("arch,fields", [
    ("llama", {"sliding_window": 8, "use_sliding_window": False, "max_window_layers": 2}),  # a "llamafied" Qwen2's
    ("llama", {"partial_rotary_factor": 0.5}),
    ("llama", {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8}),
    ("granite", {"sliding_window": 8}),
    ("llama", {"embedding_multiplier": 3.0, "logits_scaling": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.1}),
    ("mistral_swa", {"attention_bias": True, "mlp_bias": True}),
    ("mistral_swa", {"layer_types": ["full_attention", "sliding_attention"]}),  # transformers reads it as Ministral's
    # Its layer_types still say "sliding_attention": transformers' mask windows those layers anyway.
    ("smollm3", {"use_sliding_window": False}),
    ("gemma", {"sliding_window": 8, "mlp_bias": True}),
    # Found by a hunt: no dimension rotated, not all of them.
    ("phi3", {"partial_rotary_factor": 0.0,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.0}}),
])
def test_config_fields_count_where_transformers_model_reads_them(tmp_path, tokenizer_dir, arch, fields):
    """Found by a checkpoint hunt: keys that transformers' model of an architecture never reads
    (Llama's and Granite's sliding window, Llama's partial rotary factor, Granite's multipliers on
    a Llama, Mistral's biases) were applied anyway. A checkpoint gives the log-probabilities of its
    transformers model, whatever else it carries."""
    path = _edited_checkpoint(tmp_path, tokenizer_dir, arch, **fields)
    assert_prompt_logprobs_match_hf(LLM(path, dtype="float32"), path, _prompts(12, [100, 47]))


@pytest.mark.parametrize("arch,biased", [
    ("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("smollm3", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("gemma", ("q_proj", "k_proj", "v_proj", "o_proj")),  # attention_bias only: Gemma's MLP has none
    ("olmo2", ("q_proj", "k_proj", "v_proj", "o_proj")),
])
def test_attention_and_mlp_biases_where_the_config_sets_them(tmp_path, tokenizer_dir, arch, biased):
    """attention_bias (and mlp_bias where transformers' model reads it) with random biases saved
    beside the weights, as transformers loads them; the norms' weights random too (transformers
    initialises them to 1 or 0, where some of a norm's arithmetic cannot show)."""
    from safetensors.torch import load_file, save_file

    path = _edited_checkpoint(tmp_path, tokenizer_dir, arch, attention_bias=True, mlp_bias=True)
    weights_path = os.path.join(path, "model.safetensors")
    weights = load_file(weights_path)
    torch.manual_seed(1)
    for name in [n for n in weights if n.endswith(".weight") and n.split(".")[-2] in biased]:
        weights[name.removesuffix("weight") + "bias"] = torch.randn(weights[name].shape[0]) * 0.5
    for name in [n for n in weights if n.endswith("norm.weight")]:
        weights[name] = weights[name] + torch.randn_like(weights[name]) * 0.3
    save_file(weights, weights_path, metadata={"format": "pt"})
    assert_prompt_logprobs_match_hf(LLM(path, dtype="float32"), path, _prompts(14, [60, 20]))


def test_a_saved_head_unlike_the_tied_embeddings_is_used_as_transformers_does(tmp_path, tokenizer_dir):
    """tie_word_embeddings with an lm_head.weight in the file that differs from the embeddings:
    transformers runs the saved head ("will NOT tie them"); an equal one stays tied."""
    from safetensors.torch import load_file, save_file

    from conftest import make_checkpoint

    path = make_checkpoint(str(tmp_path / "granite"), "granite", tokenizer_dir)
    weights_path = os.path.join(path, "model.safetensors")
    weights = load_file(weights_path)
    for head in (weights["model.embed_tokens.weight"].clone(), torch.randn_like(weights["model.embed_tokens.weight"])):
        save_file({**weights, "lm_head.weight": head}, weights_path, metadata={"format": "pt"})
        assert_prompt_logprobs_match_hf(LLM(path, dtype="float32"), path, _prompts(13, [30, 20]))
    # The head alone, without the embeddings: it is both, as transformers ties it (found by a hunt: refused).
    head_only = {k: v for k, v in weights.items() if k != "model.embed_tokens.weight"}
    save_file({**head_only, "lm_head.weight": weights["model.embed_tokens.weight"]}, weights_path,
              metadata={"format": "pt"})
    assert_prompt_logprobs_match_hf(LLM(path, dtype="float32"), path, _prompts(13, [30, 20]))


def test_missing_weights_are_named_as_the_checkpoint_names_them(tmp_path, tokenizer_dir):
    """Found by a hunt: a missing k_proj was reported as "layers.1.self_attn.qkv_proj.weight:k"."""
    from safetensors.torch import load_file, save_file

    from conftest import make_checkpoint

    path = make_checkpoint(str(tmp_path / "llama"), "llama", tokenizer_dir)
    weights_path = os.path.join(path, "model.safetensors")
    weights = load_file(weights_path)
    gone = {"model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    save_file({k: v for k, v in weights.items() if k not in gone}, weights_path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 2 weight\(s\) the model needs: layers.0.mlp.up_proj.weight, "
                                         r"layers.1.self_attn.k_proj.weight \(named without"):
        LLM(path, dtype="float32")
    save_file({k: v for k, v in weights.items() if ".layers." not in k}, weights_path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 18 weight\(s\) .*layers.0.self_attn.q_proj.weight and 10 more"):
        LLM(path, dtype="float32")


def test_gemma3_attn_logit_softcapping_is_not_applied(tmp_path, tokenizer_dir):
    """transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it; a
    checkpoint that sets it gives transformers' log-probabilities (greedy tokens alone do not notice)."""
    import conftest

    config = conftest._CONFIGS["gemma3"]()
    config.attn_logit_softcapping = 1.0
    conftest._CONFIGS["gemma3_capped"] = lambda: config
    path = conftest.make_checkpoint(str(tmp_path / "gemma3_capped"), "gemma3_capped", tokenizer_dir)
    assert_prompt_logprobs_match_hf(LLM(path, dtype="float32"), path, _prompts(12, [5, 60, 130]))


def test_the_files_the_index_names_are_loaded_and_no_others(tmp_path, tokenizer_dir):
    """Found by a checkpoint hunt: Mistral's repos ship ``consolidated.safetensors`` (the same
    weights, under Mistral's names) beside transformers' shards, which were all read; the index
    names the files (vLLM's rule)."""
    from safetensors.torch import load_file, save_file

    path = _edited_checkpoint(tmp_path, tokenizer_dir, "mistral_swa")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    os.remove(os.path.join(path, "model.safetensors"))
    model.save_pretrained(path, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    weights = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(path, name)))
    save_file({k.replace("model.", "").replace("self_attn.q_proj", "attention.wq"): v for k, v in weights.items()},
              os.path.join(path, "consolidated.safetensors"))
    assert_prompt_logprobs_match_hf(LLM(path, dtype="float32"), path, _prompts(14, [60, 20]))


def test_a_config_without_architectures_is_read_by_its_model_type(tmp_path, tokenizer_dir):
    """As ``AutoModelForCausalLM`` reads it (found by a checkpoint hunt: it was refused)."""
    path = _edited_checkpoint(tmp_path, tokenizer_dir, "mistral_swa", architectures=None)
    assert_prompt_logprobs_match_hf(LLM(path, dtype="float32"), path, _prompts(14, [60, 20]))
