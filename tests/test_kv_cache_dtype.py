"""The fp8 KV cache (``kv_cache_dtype``): prompt log-probabilities against Hugging Face with the
same fp8 rounding of every key and value attention reads, checkpoint scales, refusals."""

import logging
import os
import weakref

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import prompt_logprob_errors
from pagedlm import LLM, SamplingParams
from pagedlm.engine.llm_engine import LLMEngine
from pagedlm.model_executor.layers.attention import Attention
from pagedlm.ops.reference import _to_cache
from pagedlm.worker.model_runner import ModelRunner
from test_parity import _prompts

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def hf_with_fp8_kv(path: str, fp8_dtype: torch.dtype, k_scale: float, v_scale: float, monkeypatch):
    """Hugging Face's Llama in float32 whose attention sees each key (after RoPE, as the cache stores
    it) and value rounded through the fp8 cache format: entry = x / scale in fp8, read as entry * scale."""
    import transformers.models.llama.modeling_llama as modeling

    def through_cache(x, scale):
        return _to_cache(x, fp8_dtype, scale).float() * scale

    rotate = modeling.apply_rotary_pos_emb

    def rotate_then_cache(q, k, *args, **kwargs):
        q, k = rotate(q, k, *args, **kwargs)
        return q, through_cache(k, k_scale)

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", rotate_then_cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for layer in model.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda module, args, out: through_cache(out, v_scale))
    return model


def with_kv_scales(llama_dir: str, tmp_path, scales: dict[str, torch.Tensor]) -> str:
    """The checkpoint plus a safetensors file of KV-cache scales (as llm-compressor saves them)."""
    tmp_path.mkdir(exist_ok=True)
    for name in os.listdir(llama_dir):
        os.symlink(os.path.join(llama_dir, name), tmp_path / name)
    save_file(scales, tmp_path / "kv_scales.safetensors")
    return str(tmp_path)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_prompt_logprobs_match_hf_through_fp8(llama_dir, tmp_path, monkeypatch, kv_cache_dtype):
    """Every prompt position, prefilled in 64-token chunks (later chunks read earlier chunks' keys and
    values from the cache): fp32 model, fp8 cache, checkpoint scales far from 1."""
    num_layers = AutoModelForCausalLM.from_pretrained(llama_dir).config.num_hidden_layers
    k_scale, v_scale = 2**-8, 3 * 2**-10  # exact in the checkpoint's fp32
    scales = {f"model.layers.{i}.self_attn.{kind}_scale": torch.tensor(s) for i in range(num_layers)
              for kind, s in (("k", k_scale), ("v", v_scale))}
    path = with_kv_scales(llama_dir, tmp_path, scales)
    llm = LLM(path, dtype="float32", kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=64, max_num_seqs=2)
    cache = llm.llm_engine.model_runner.cache_engine.key_caches[0]
    assert cache.dtype == FP8[kv_cache_dtype]
    attention = [m for m in llm.llm_engine.model_runner.model.modules() if isinstance(m, Attention)]
    assert attention and all((m.k_scale, m.v_scale) == (k_scale, v_scale) for m in attention)
    prompts = _prompts(21, [300, 130, 47])
    through_fp8 = prompt_logprob_errors(llm, path, prompts, hf_with_fp8_kv(path, FP8[kv_cache_dtype], k_scale, v_scale,
                                                                          monkeypatch))
    monkeypatch.undo()
    plain = prompt_logprob_errors(llm, path, prompts)
    # Typical positions agree to fp32 rounding. Not all: where HF's fp32 key or value lies within an
    # ulp of an fp8 rounding boundary, the two round it apart, and later positions of that prompt
    # differ by up to ~1e-2 (seen with e4m3). Against HF without the rounding, every position is off.
    assert through_fp8.median() < 1e-5 and through_fp8.mean() < plain.mean() / 50, (
        f"median {through_fp8.median():.1e}, mean {through_fp8.mean():.1e} vs {plain.mean():.1e} without fp8")


def test_calculate_kv_scales(llama_dir, monkeypatch):
    """vLLM's rule over a seeded prefill of random tokens: k_scale = max|k| / 200 (keys after RoPE),
    v_scale = max|v| / 100, per layer, checked against the same tokens through Hugging Face."""
    import random

    import transformers.models.llama.modeling_llama as modeling

    llm = LLM(llama_dir, dtype="float32", kv_cache_dtype="fp8", calculate_kv_scales=True)
    engine = llm.llm_engine
    # The same scales again, and with another step budget (found by a hunt: the prompt was one
    # step's budget long, so the scales and every result after depended on it).
    for budget in (2048, 64):
        assert engine.model_runner.kv_cache_scales() == LLM(
            llama_dir, dtype="float32", kv_cache_dtype="fp8", calculate_kv_scales=True, max_num_batched_tokens=budget,
            max_num_seqs=64).llm_engine.model_runner.kv_cache_scales()
    assert engine.scheduler_config.max_num_batched_tokens == 2048
    length = min(engine.model_config.max_model_len - 1, 1024)
    rng = random.Random(0)
    tokens = [rng.randrange(engine.vocab_size) for _ in range(length)]
    largest_k, largest_v = [], []
    rotate = modeling.apply_rotary_pos_emb

    def rotate_and_record(q, k, *args, **kwargs):
        q, k = rotate(q, k, *args, **kwargs)
        largest_k.append(float(k.abs().max()))
        return q, k

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", rotate_and_record)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    for layer in hf.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda m, args, out: largest_v.append(float(out.abs().max())))
    with torch.no_grad():
        hf(torch.tensor([tokens]))
    expected = [scale for k, v in zip(largest_k, largest_v) for scale in (k / 200, v / 100)]
    got = [scale for pair in engine.model_runner.kv_cache_scales() for scale in pair]
    # Layer 0 exactly; later layers' inputs went through the earlier layers' fp8 caches in our pass.
    assert got[:2] == pytest.approx(expected[:2], rel=1e-6) and got == pytest.approx(expected, rel=1e-2)
    stats = engine.get_stats()  # nothing left behind, and the statistics are the user's alone
    assert stats["num_free_kv_blocks"] == engine.block_manager.num_kv_blocks
    assert stats["prefix_cache_queried_tokens"] == stats["peak_kv_blocks_in_use"] == 0
    with pytest.raises(ValueError, match="calculate_kv_scales=True .* needs kv_cache_dtype"):
        LLM(llama_dir, calculate_kv_scales=True)
    with pytest.raises(ValueError, match="calculate_kv_scales=True .* needs max_model_len of at least 2, got 1"):
        LLM(llama_dir, kv_cache_dtype="fp8", calculate_kv_scales=True, max_model_len=1)  # was an empty prompt's error


def test_calculate_kv_scales_leaves_the_seeded_draws_alone(llama_dir, tmp_path):
    """Found by a hunt: the calibration request sampled its one token at temperature 1.0 from the
    generator LLM(seed=) seeds, so sampled completions differed from those of the same model with
    the same scales loaded from its checkpoint."""
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10]]
    calibrated = LLM(llama_dir, dtype="float32", kv_cache_dtype="fp8", calculate_kv_scales=True, seed=0)
    scales = {f"model.layers.{i}.self_attn.{name}": torch.tensor(value, dtype=torch.float64)
              for i, pair in enumerate(calibrated.llm_engine.model_runner.kv_cache_scales())
              for name, value in zip(("k_scale", "v_scale"), pair)}
    loaded = LLM(with_kv_scales(llama_dir, tmp_path / "scaled", scales), dtype="float32", kv_cache_dtype="fp8", seed=0)
    assert loaded.llm_engine.model_runner.kv_cache_scales() == calibrated.llm_engine.model_runner.kv_cache_scales()
    assert [o.outputs[0].token_ids for o in calibrated.generate(prompts, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in loaded.generate(prompts, params, use_tqdm=False)]


def test_fp8_cache_holds_more_tokens(llama_dir):
    memory = 8 << 20
    blocks = {kv: LLM(llama_dir, dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory_bytes=memory).llm_engine.block_manager
              .num_kv_blocks for kv in ("auto", "fp8")}
    assert blocks["fp8"] == 2 * blocks["auto"]


@pytest.mark.parametrize("scale", [0.5, 0.0, float("nan")])
def test_auto_cache_does_not_use_checkpoint_scales(llama_dir, tmp_path, caplog, scale):
    """A cache in the model's dtype leaves the checkpoint's scales unread, whatever they hold (found by
    a hunt: a zero or NaN one refused the checkpoint, which vLLM runs)."""
    path = with_kv_scales(llama_dir, tmp_path, {"model.layers.0.self_attn.k_scale": torch.tensor(scale)})
    with caplog.at_level(logging.INFO, logger="pagedlm"):
        llm = LLM(path, dtype="float32")
    assert "does not use them" in caplog.text
    assert all((m.k_scale, m.v_scale) == (1.0, 1.0) for m in llm.llm_engine.model_runner.model.modules()
               if isinstance(m, Attention))


def test_calculate_kv_scales_do_not_depend_on_the_cache_size(llama_dir, monkeypatch):
    """Found by a batch-invariance hunt: the calibration prompt was cut to what the engine's cache
    held, so a small cache (or a resumed job's other cache size) changed the scales and every result."""
    scales = LLM(llama_dir, dtype="float32", kv_cache_dtype="fp8", calculate_kv_scales=True).llm_engine.model_runner \
        .kv_cache_scales()
    caches, init_cache = [], ModelRunner.init_cache

    def recorded(runner, num_kv_blocks):  # (blocks, any earlier cache alive when this one is made)
        alive = any(ref() is not None for _, _, ref in caches)
        init_cache(runner, num_kv_blocks)
        caches.append((num_kv_blocks, alive, weakref.ref(runner.cache_engine.kv_caches[0][0])))

    monkeypatch.setattr(ModelRunner, "init_cache", recorded)
    llm = LLM(llama_dir, dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=4, calculate_kv_scales=True)
    assert llm.llm_engine.model_runner.kv_cache_scales() == scales
    assert llm.llm_engine.block_manager.num_kv_blocks == 4 and llm.get_stats()["num_free_kv_blocks"] == 4
    # The calibration's cache (its prompt and one token) is freed before the engine's is made (a
    # review: it was held while the engine's was sized and allocated); a size that cannot be is
    # refused before the calibration runs.
    tokens = min(llm.llm_engine.model_config.max_model_len - 1, 1024) + 1
    assert [(n, alive) for n, alive, _ in caches] == [(-(-tokens // 16), False), (4, False)]
    calibrated = []
    monkeypatch.setattr(LLMEngine, "_calculate_kv_scales", lambda engine: calibrated.append(engine))
    with pytest.raises(ValueError, match="holds no KV block"):
        LLM(llama_dir, dtype="float32", kv_cache_dtype="fp8", kv_cache_memory_bytes=1, calculate_kv_scales=True)
    assert calibrated == []
    assert len(llm.generate("hello", SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_scales_under_each_name_vllm_reads_and_one_given_for_both(llama_dir, tmp_path):
    """Found by a hunt against vLLM 0.32's loader: ModelOpt's "k_proj.k_scale" was refused as a
    layer it did not find, the older "kv_scale" as no parameter, and a layer with only its k_scale
    kept v_scale at 1.0 (vLLM's BaseKVCacheMethod takes the one given for both)."""
    cases = {"modelopt": ({"model.layers.0.self_attn.k_proj.k_scale": 0.5, "model.layers.0.self_attn.v_proj.v_scale": 0.25},
                          (0.5, 0.25)),
             "kv": ({"model.layers.0.self_attn.kv_scale": 0.5}, (0.5, 0.5)),
             "k only": ({"model.layers.0.self_attn.k_scale": 0.5}, (0.5, 0.5)),
             "v only": ({"model.layers.0.self_attn.v_proj.output_scale": 0.25}, (0.25, 0.25)),
             # Found by a hunt: vLLM's cache scale mapper reads these too (a fused projection's, and
             # the cache's own); a query's scale (vLLM's attn.q_scale) is for fp8 queries alone.
             "qkv_proj": ({"model.layers.0.self_attn.qkv_proj.k_scale": 0.5,
                           "model.layers.0.self_attn.qkv_proj.v_scale": 0.25}, (0.5, 0.25)),
             # vLLM reads any [kv]_proj.[kv]_scale by its own letter (a hunt: k_proj.v_scale refused).
             "crossed": ({"model.layers.0.self_attn.k_proj.v_scale": 0.25, "model.layers.0.self_attn.v_proj.k_scale": 0.5},
                         (0.5, 0.25)),
             "cache": ({"model.layers.0.self_attn.k_cache.scale": 0.5, "model.layers.0.self_attn.v_cache.scale": 0.125},
                       (0.5, 0.125)),
             "query": ({"model.layers.0.self_attn.q_scale": 0.5, "model.layers.0.self_attn.q_proj.output_scale": 0.5,
                        "model.layers.0.self_attn.prob_output_scale": 0.5, "model.layers.0.self_attn.k_scale": 0.25},
                       (0.25, 0.25))}
    for i, (name, (scales, expected)) in enumerate(cases.items()):
        path = with_kv_scales(llama_dir, tmp_path / str(i), {k: torch.tensor(v) for k, v in scales.items()})
        llm = LLM(path, dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=8)
        layers = [m for m in llm.llm_engine.model_runner.model.modules() if isinstance(m, Attention)]
        assert ((layers[0].k_scale, layers[0].v_scale), (layers[1].k_scale, layers[1].v_scale)) == (expected, (1.0, 1.0)), name
        llm.close()


def test_refusals(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be 'auto' \(or the model's dtype, 'bfloat16' or "
                                         r"'float16'\), 'fp8', 'fp8_e4m3', 'fp8_e5m2', got 'int8'"):
        LLM(llama_dir, kv_cache_dtype="int8")
    for bad in (None, ["fp8"]):
        with pytest.raises(ValueError, match="kv_cache_dtype must be"):
            LLM(llama_dir, kv_cache_dtype=bad)
    # vLLM's names of a cache in the model's own dtype (found by a hunt: refused); another dtype is refused.
    llm = LLM(llama_dir, dtype="bfloat16", kv_cache_dtype="bfloat16", num_kv_blocks=8)
    assert llm.llm_engine.model_runner.cache_engine.kv_caches[0][0].dtype == torch.bfloat16
    llm.close()
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'float16' needs a model run in float16 .* runs in float32"):
        LLM(llama_dir, dtype="float32", kv_cache_dtype="float16")
    with pytest.raises(ValueError, match=r"calculate_kv_scales=True .* kv_cache_dtype 'bfloat16' is the model's own"):
        LLM(llama_dir, dtype="bfloat16", kv_cache_dtype="bfloat16", calculate_kv_scales=True)
    cases = [
        ("model.layers.0.self_attn.v_scale", torch.ones(2), r"holds 2 KV-cache scales; .* \(per-head scales are not supported\)"),
        ("model.norm.k_scale", torch.tensor(0.5), "Unexpected weight .* no attention layer 'norm'"),
    ] + [("model.layers.1.self_attn.k_proj.output_scale", torch.tensor(bad), "is a KV-cache scale of .* positive and finite")
         for bad in (0.0, -0.5, float("nan"), float("inf"), 1e-40)]
    for i, (name, value, message) in enumerate(cases):
        path = with_kv_scales(llama_dir, tmp_path / str(i), {name: value})
        with pytest.raises(ValueError, match=message):
            LLM(path, kv_cache_dtype="fp8")


def test_job_flags(llama_dir, tmp_path, caplog):
    from pagedlm.entrypoints.cli import run_main

    rows = tmp_path / "in.jsonl"
    rows.write_text('{"id": 1, "prompt": "hello"}\n')
    with caplog.at_level(logging.INFO, logger="pagedlm"):
        assert run_main(["--model", llama_dir, "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                         "--max-tokens", "4", "--kv-cache-dtype", "fp8_e5m2", "--calculate-kv-scales"]) == 0
    assert "float8_e5m2" in caplog.text and "KV-cache scales from" in caplog.text
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 1
