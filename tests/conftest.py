"""Fixtures: tiny random-weight checkpoints of each supported architecture, saved with
transformers, plus tokenizers built here with ``tokenizers``: a byte-level BPE (the default), a
Llama-2-style SentencePiece BPE with byte fallback, and a WordPiece one."""

import json
import os

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    Olmo2Config,
    Olmo3Config,
    GenerationConfig,
    LlamaConfig,
    Ministral3Config,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

os.environ.setdefault("PAGEDLM_LOGGING_LEVEL", "WARNING")

VOCAB_SIZE = 384
BOS, EOS = 1, 2

import pagedlm.ops  # noqa: E402, F401  (registers the extension's kernels, if built)

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "pagedlm::paged_attention", "CUDA"
)
# A test's "cuda" parameter: marked, and skipped without a GPU and the extension's CUDA kernels.
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and CUDA kernels")],
)
CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Continuous batching packs many sequences into each model iteration.",
    "A paged KV cache stores keys and values in fixed-size blocks with a block table.",
    "Hello, my name is pagedlm and I generate text; 12 + 30 = 42. Ünïcödé ✓ 日本語.",
]


def _save_fast(tok: Tokenizer, path: str) -> None:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def _build_tokenizer(path: str) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    # Add the BOS the way Llama tokenizers do, so tests can check it is added exactly once.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    _save_fast(tok, path)


_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    max_position_embeddings=1024, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2,
)
_CONFIGS = {
    "llama": lambda: LlamaConfig(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
        architectures=["LlamaForCausalLM"], **_COMMON,
    ),
    "llama3": lambda: LlamaConfig(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, head_dim=32,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0, architectures=["LlamaForCausalLM"], **_COMMON,
    ),
    "mistral": lambda: MistralConfig(
        num_attention_heads=4, num_key_value_heads=4, sliding_window=None, architectures=["MistralForCausalLM"],
        **_COMMON,
    ),
    "qwen2": lambda: Qwen2Config(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"],
        **_COMMON,
    ),
    "granite": lambda: GraniteConfig(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, embedding_multiplier=3.0,
        attention_multiplier=0.1, residual_multiplier=0.4, logits_scaling=2.5, architectures=["GraniteForCausalLM"],
        **_COMMON,
    ),
    "phi3": lambda: Phi3Config(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False,
        architectures=["Phi3ForCausalLM"], pad_token_id=0, **_COMMON,
    ),
    # Phi-4-mini's shape of RoPE: LongRoPE with short/long factors switching at 64 tokens (so prompts and
    # generations cross it) on the first 3/4 of each head.
    "phi3_longrope": lambda: Phi3Config(
        num_attention_heads=2, num_key_value_heads=1, sliding_window=None, tie_word_embeddings=True,
        original_max_position_embeddings=64, partial_rotary_factor=0.75,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "original_max_position_embeddings": 64,
                         "short_factor": [1.0 + 0.1 * i for i in range(12)],
                         "long_factor": [1.0 + 2.5 * i for i in range(12)]},
        architectures=["Phi3ForCausalLM"], pad_token_id=0, **_COMMON,
    ),
    # LongRoPE on a Llama: transformers keeps the keys computed with the short factors when a
    # sequence crosses the threshold while generating (Phi-3 recomputes them).
    "llama_longrope": lambda: LlamaConfig(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [1.0 + 2.5 * i for i in range(8)]},
        architectures=["LlamaForCausalLM"], **_COMMON,
    ),
    # head_dim 36 with 3/4 of it rotary: 27 dimensions by the config, 28 rotated (transformers' cos
    # has one column per frequency pair).
    "phi3_odd_rotary": lambda: Phi3Config(
        num_attention_heads=2, num_key_value_heads=1, sliding_window=None, tie_word_embeddings=True,
        partial_rotary_factor=0.75, architectures=["Phi3ForCausalLM"], pad_token_id=0,
        **{**_COMMON, "hidden_size": 72},
    ),
    # head_dim 32 is not hidden / heads (16): Qwen3 sets it explicitly.
    "qwen3": lambda: Qwen3Config(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        architectures=["Qwen3ForCausalLM"], **_COMMON,
    ),
    # Sliding windows shorter than most test prompts: Mistral's on every layer, Qwen2's on the layers
    # from max_window_layers on.
    "mistral_swa": lambda: MistralConfig(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=48, architectures=["MistralForCausalLM"],
        **_COMMON,
    ),
    # Ministral 3: YaRN, and an attention temperature on q from position 128 on (the longer prompts cross it).
    "ministral3": lambda: Ministral3Config(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 8.0,
                         "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
        architectures=["Ministral3ForCausalLM"], pad_token_id=0, **_COMMON,
    ),
    "qwen2_swa": lambda: Qwen2Config(
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=40,
        max_window_layers=1, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"], **_COMMON,
    ),
    # Gemma (1): one KV head (gemma-2b's MQA), head_dim 32 not hidden / heads, GeGLU, (1 + w) norms.
    "gemma": lambda: GemmaConfig(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, architectures=["GemmaForCausalLM"],
        pad_token_id=0, **_COMMON,
    ),
    # SmolLM3: every third layer without RoPE (the checkpoints' fourth), and those layers windowed, as
    # its config makes them with use_sliding_window.
    "smollm3": lambda: SmolLM3Config(
        num_attention_heads=4, num_key_value_heads=2, no_rope_layer_interval=3, use_sliding_window=True,
        sliding_window=40, architectures=["SmolLM3ForCausalLM"], pad_token_id=0,
        **{**_COMMON, "num_hidden_layers": 3},
    ),
    # OLMo 2: post-norm layers, q and k normalised over all their heads.
    "olmo2": lambda: Olmo2Config(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, architectures=["Olmo2ForCausalLM"],
        pad_token_id=0, **_COMMON,
    ),
    # OLMo 3: a sliding layer and a global one, each with its own RoPE (YaRN on the global one).
    "olmo3": lambda: Olmo3Config(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=40, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "yarn", "factor": 16.0, "rope_theta": 500000.0,
                                            "original_max_position_embeddings": 64}},
        architectures=["Olmo3ForCausalLM"], pad_token_id=0, **_COMMON,
    ),
    # Gemma 2: a sliding layer then a global one, soft-caps small enough to matter with random weights,
    # and head_dim 40 (not a multiple of 16: the kernels' partial-vector path).
    "gemma2": lambda: Gemma2Config(
        num_attention_heads=4, num_key_value_heads=2, head_dim=40, query_pre_attn_scalar=32, sliding_window=48,
        attn_logit_softcapping=5.0, final_logit_softcapping=8.0, architectures=["Gemma2ForCausalLM"],
        pad_token_id=0, **_COMMON,
    ),
    # Gemma 3: q/k norms, a RoPE base per layer type (and linear scaling on the global layers).
    "gemma3": lambda: Gemma3TextConfig(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
        architectures=["Gemma3ForCausalLM"], pad_token_id=0, **_COMMON,
    ),
}


def make_checkpoint(path: str, arch: str, tokenizer_dir: str, vocab_size: int = VOCAB_SIZE) -> str:
    """Save a tiny random-weight ``arch`` model with the tokenizer in ``tokenizer_dir`` into ``path``."""
    torch.manual_seed(0)
    config = _CONFIGS[arch]()
    config.vocab_size = vocab_size
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS).save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(path, name), "wb") as dst:
            dst.write(src.read())
    return path


def _build_sentencepiece_tokenizer(path: str) -> int:
    """A Llama-2-layout tokenizer: words carry a leading ``▁``, bytes outside the vocabulary fall
    back to ``<0xNN>`` tokens, BOS is prepended. Returns its vocabulary size."""
    corpus = ["banana a cat", "a cat and a banana", "The cat ate a banana.", "the quick brown fox"] * 20
    specials = ["<unk>", "<s>", "</s>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    model = json.loads(trained.to_str())["model"]
    vocab = model["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    _save_fast(tok, path)
    return len(vocab)


def _build_wordpiece_tokenizer(path: str) -> int:
    """A tokenizer whose decoder puts a space between tokens (WordPiece), with two extra special
    tokens ``<x>`` and ``<y>``. Returns its vocabulary size."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "cat", "dog", "##s", "<x>", "<y>"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ["<unk>", "<s>", "</s>", "<x>", "<y>"]])
    _save_fast(tok, path)
    return len(vocab)


@pytest.fixture(scope="session")
def sentencepiece_llama_dir(tmp_path_factory) -> str:
    tokenizer_dir = str(tmp_path_factory.mktemp("spm_tokenizer"))
    vocab_size = _build_sentencepiece_tokenizer(tokenizer_dir)
    return make_checkpoint(str(tmp_path_factory.mktemp("spm_llama")), "llama", tokenizer_dir, vocab_size)


@pytest.fixture(scope="session")
def wordpiece_llama_dir(tmp_path_factory) -> str:
    tokenizer_dir = str(tmp_path_factory.mktemp("wordpiece_tokenizer"))
    vocab_size = _build_wordpiece_tokenizer(tokenizer_dir)
    return make_checkpoint(str(tmp_path_factory.mktemp("wordpiece_llama")), "llama", tokenizer_dir, vocab_size)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    _build_tokenizer(path)
    return path


@pytest.fixture(scope="session", params=list(_CONFIGS))
def model_dir(request, tmp_path_factory, tokenizer_dir) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp(request.param)), request.param, tokenizer_dir)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("llama_main")), "llama", tokenizer_dir)


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def chat_llama_dir(llama_dir, tmp_path_factory) -> str:
    """The tiny Llama checkpoint with CHAT_TEMPLATE as its tokenizer's chat template."""
    path = tmp_path_factory.mktemp("chat_llama")
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    for name in os.listdir(llama_dir):
        if not os.path.exists(path / name):
            os.symlink(os.path.join(llama_dir, name), path / name)
    return str(path)


def hf_greedy(
    model_dir: str, prompts: list[list[int]], max_new_tokens: int, dtype=torch.float32, device: str = "cpu",
    **config_fields,
) -> list[list[int]]:
    """Hugging Face ``generate`` one prompt at a time: the generated ids (EOS kept, then cut);
    ``config_fields`` set on the config as ``from_pretrained`` takes them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **config_fields).to(device).eval()
    outputs = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
            )
        generated = out[0, len(ids):].tolist()
        if EOS in generated:
            generated = generated[: generated.index(EOS) + 1]
        outputs.append(generated)
    return outputs


def assert_first_tokens_match_hf_bf16(path: str, prompts: list[list[int]], got: list[int]) -> None:
    """Each prompt's first greedy token in bfloat16 is Hugging Face's bfloat16 one, or within two
    bfloat16 steps (ulps) of its best logit there: transformers' bf16 attention rounds its scores
    and probabilities to bf16, pagedlm's keeps them in fp32 and rounds its output once, so a logit
    may land a step or two apart (on the tiny models, prompt log-probabilities against HF's bf16
    ones differ by up to 0.05-0.08, about two steps at these logits; with an attention that rounds
    as pagedlm's, they agree to 5e-7), and a near-tie then goes the other way."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    for prompt, token in zip(prompts, got):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1].float()
        best = logits.max()
        ulp = 2.0 ** (torch.floor(torch.log2(best.abs())) - 7)
        assert best - logits[token] <= 2 * ulp, f"first token {token}: logit {logits[token]} vs HF's best {best}"


def prompt_logprob_errors(llm, path: str, prompts: list[list[int]], hf=None) -> torch.Tensor:
    """|engine - reference| of every prompt position's log-probability (after the first; all prompts
    concatenated), the reference being one forward pass of ``hf`` (default: the Hugging Face model of
    ``path`` in float32)."""
    from pagedlm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    hf = hf or AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    errors = []
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
        got = torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i])
        errors.append((got - expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]).abs())
    return torch.cat(errors)


def assert_prompt_logprobs_match_hf(llm, path: str, prompts: list[list[int]]) -> None:
    errors = prompt_logprob_errors(llm, path, prompts)
    assert errors.max() <= 2e-4, f"prompt log-probabilities differ from HF's by up to {errors.max():.2e}"
