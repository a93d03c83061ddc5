import json
import os
import struct

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pagedlm import LLM, SamplingParams
from pagedlm.transformers_utils.gguf import convert_gguf, resolve_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + ["Hi"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's q/k row permutation (HF rotate-half -> GGML interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TOKENS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500000.0,
        max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms init to 1; randomise so a misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_gguf(model, path: str, arch: str = "llama", rope_scaling: tuple | None = None,
               rope_freqs: np.ndarray | None = None, rms_eps: bool = True,
               down_type: gguf.GGMLQuantizationType | None = None, rope_dims: int | None = None,
               eot: int | None = None, split_max_tensors: int = 0, specials: list[str] = SPECIALS,
               add_bos: bool | None = False, leave_out: str | None = None, head_count_kv: int | None = None,
               tokenizer_model: str = "gpt2", named_templates: tuple = (), block_count: int | None = None,
               expert_count: int = 0, pre: str | None = None, bos_id: int = 1, merges: bool = True) -> None:
    """What llama.cpp's convert_hf_to_gguf.py writes for a Llama, Qwen3 or Gemma 2 model: q/k rows
    permuted for Llama only, Gemma's norm weights stored as 1 + w; Llama 3's RoPE scaling as the
    ``rope_freqs`` tensor. ``rms_eps=False`` leaves out the RMSNorm epsilon; ``down_type`` writes
    the down projections as zero blocks of that quantized type; ``rope_dims`` a RoPE dimension
    count, ``eot`` an end-of-turn token, ``split_max_tensors`` files of that many tensors each
    (llama.cpp's split GGUF); ``specials`` the three control tokens, ``leave_out`` an HF tensor
    not written, ``head_count_kv`` another KV head count than the tensors', ``tokenizer_model``
    the tokenizer's kind, ``block_count`` another layer count than the tensors', ``expert_count``
    a Mixtral's metadata and router tensors, ``pre`` another tokenizer.ggml.pre ("": none),
    ``bos_id`` the BOS token's id, ``merges=False`` no merges."""
    c = model.config
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_block_count(c.num_hidden_layers if block_count is None else block_count)
    if expert_count:
        writer.add_expert_count(expert_count)
        writer.add_expert_used_count(2)
        for i in range(c.num_hidden_layers):
            writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.zeros((expert_count, c.hidden_size), np.float32))
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads if head_count_kv is None else head_count_kv)
    if arch != "llama":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # Gemma 3: the global layers' base
    writer.add_rope_freq_base(rope["rope_theta"])
    if rms_eps:
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch in ("gemma2", "gemma3", "phi3"):
        writer.add_sliding_window(c.sliding_window or 0)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma3":  # llama.cpp records the global layers' linear scaling
        rope_scaling = (gguf.RopeScalingType.LINEAR, c.rope_parameters["full_attention"]["factor"])
    if rope_scaling is not None:  # (type or None, factor or None[, the factor's key if not scaling.factor])
        if rope_scaling[0] is not None:
            writer.add_rope_scaling_type(rope_scaling[0])
        if rope_scaling[1] is not None:
            writer.add_float32(f"{arch}.rope.{rope_scaling[2] if len(rope_scaling) > 2 else 'scaling.factor'}",
                               rope_scaling[1])
    if arch == "phi3":
        writer.add_rope_dimension_count(int(head_dim * c.rope_parameters["partial_rotary_factor"]))
    elif rope_dims is not None:
        writer.add_rope_dimension_count(rope_dims)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model(tokenizer_model)
    if pre != "":  # "": none, as files written before llama.cpp recorded it
        writer.add_tokenizer_pre(pre or ("smollm" if arch == "llama" else "qwen2"))
    writer.add_token_list(specials + TOKENS[len(SPECIALS):])
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(TOKENS) - 3))
    if merges:
        writer.add_token_merges(["H i"])
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if add_bos is not None:  # None: no key, as files written before llama.cpp recorded it
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template([{"name": "default", "template": CHAT_TEMPLATE}, *named_templates])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings or hf_name == leave_out:
            continue
        w = tensor.numpy()
        if arch == "llama" and "q_proj" in hf_name:
            w = llama_cpp_permute(w, c.num_attention_heads)
        elif arch == "llama" and "k_proj" in hf_name:
            w = llama_cpp_permute(w, c.num_key_value_heads)
        elif arch in ("gemma2", "gemma3") and "norm" in hf_name:
            w = w + 1
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if down_type is not None and "down_proj" in hf_name:
            block, size = gguf.GGML_QUANT_SIZES[down_type]
            raw = np.zeros((w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=down_type)
            continue
        writer.add_tensor(name, np.ascontiguousarray(w))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [True, False])
def test_convert_roundtrip(tmp_path, tied):
    model = tiny_model(tied)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(model, path)
    out = convert_gguf(path, str(tmp_path / "ckpt"))

    weights = load_file(os.path.join(out, "model.safetensors"))
    expected = {k: v.numpy() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert weights.keys() == expected.keys()
    for name, w in expected.items():
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], w, err_msg=name)

    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tied
    assert config["rope_theta"] == 500000.0
    assert config["rms_norm_eps"] == 1e-6
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert (config["max_position_embeddings"], config["vocab_size"]) == (128, len(TOKENS))
    # EOS, then <|endoftext|> (0), on which llama.cpp ends generation too
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, [2, 0], "bfloat16")
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [2, 0]

    loaded = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 77, 200, 3, 259, 100]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hi").input_ids == [TOKENS.index("Hi")]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temp dir left behind"


@pytest.mark.parametrize("rope", ["llama3", "linear", "linear-untyped", "scale_linear"])
def test_llama_gguf_rope_scaling(tmp_path, rope):
    """Found by a checkpoint hunt: Llama 3.1/3.2 GGUFs (llama.cpp stores their "llama3" scaling as
    per-frequency divisors in ``rope_freqs.weight``) and linear scaling were refused. Found by a
    GGUF hunt: a factor without a scaling type, or under the older rope.scale_linear key (llama.cpp
    reads both as linear), was ignored."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    torch.manual_seed(0)
    scaling = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32} if rope == "llama3" else {"rope_type": "linear", "factor": 4.0})
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         rope_parameters={"rope_theta": 10000.0, **scaling}, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    path = str(tmp_path / "tiny.gguf")
    if rope == "llama3":  # as llama.cpp computes it: theta_i / factor_i
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        base = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))
        assert 1.0 < (base / scaled).max() and len(set((base / scaled).tolist())) > 2  # some dims in each band
        write_gguf(model, path, rope_freqs=(base / scaled).numpy())
    else:
        write_gguf(model, path, rope_scaling={"linear": (gguf.RopeScalingType.LINEAR, 4.0), "linear-untyped": (None, 4.0),
                                              "scale_linear": (None, 4.0, "scale_linear")}[rope])
    out_dir = convert_gguf(path, str(tmp_path / "ckpt"))
    llm = LLM(out_dir, dtype="float32", num_kv_blocks=32)
    loaded = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    prompts = [[1, 40, 77, 200, 3, 259, 100] * 6, [1, 5, 9]]
    for prompt in prompts:  # positions past the original 32 tokens, where the scaling matters
        with torch.no_grad():
            ids = torch.tensor([prompt])
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected


def test_gguf_rope_scaling_other_than_linear_is_refused(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    path = str(tmp_path / "yarn.gguf")
    write_gguf(model, path, "qwen3", rope_scaling=(gguf.RopeScalingType.YARN, 4.0))
    with pytest.raises(ValueError, match=r"GGUF rope scaling 'yarn' \(qwen3.rope.scaling.type\) is not supported"):
        convert_gguf(path, str(tmp_path / "out"))


def test_a_gguf_missing_what_the_model_needs_is_refused_by_name(tmp_path):
    """A missing RMSNorm epsilon became NaN (every output wrong, silently); a tensor type the gguf
    package cannot dequantize raised its NotImplementedError, naming no tensor."""
    path = str(tmp_path / "no_eps.gguf")
    write_gguf(tiny_model(tied=True), path, rms_eps=False)
    with pytest.raises(ValueError, match="the GGUF file has no 'llama.attention.layer_norm_rms_epsilon'"):
        convert_gguf(path, str(tmp_path / "out"))
    path = str(tmp_path / "q8_1.gguf")
    write_gguf(tiny_model(tied=True), path, down_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ValueError, match=r"GGUF tensor 'blk.[01].ffn_down.weight' is Q8_1, which pagedlm cannot read"):
        convert_gguf(path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_gguf_pagedlm_would_misread_is_refused(tmp_path):
    """Found by a hunt: the first file of a split GGUF converted alone (every other weight left at
    transformers' random init, silently); a Llama's RoPE over part of a head ran over all of it; a
    linear scaling without its factor wrote a NaN factor."""
    model = tiny_model(tied=True)
    cases = [({"split_max_tensors": 8}, "part 1 of a GGUF split into [0-9]+ files; pagedlm reads one file: merge them"),
             ({"rope_dims": 4}, r"llama.rope.dimension_count \(4\) differs from the head size \(8\)"),
             ({"rope_scaling": (gguf.RopeScalingType.LINEAR, None)},
              "sets llama.rope.scaling.type 'linear' but has no llama.rope.scaling.factor")]
    for i, (kwargs, message) in enumerate(cases):
        path = str(tmp_path / f"case{i}.gguf")
        write_gguf(model, path, **kwargs)
        first = path if os.path.exists(path) else sorted(str(p) for p in tmp_path.glob(f"case{i}-*.gguf"))[0]
        with pytest.raises(ValueError, match=message):
            convert_gguf(first, str(tmp_path / f"out{i}"))
        assert not os.path.exists(tmp_path / f"out{i}")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_an_end_of_turn_token_stops_as_eos_in_every_architecture(tmp_path, arch):
    """llama.cpp stops on a GGUF's EOT token; the Llama path took it, the transformers path did not."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = tiny_model(tied=True) if arch == "llama" else Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(TOKENS), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)).eval()
    path = str(tmp_path / f"{arch}.gguf")
    write_gguf(model, path, arch, eot=3)
    out = convert_gguf(path, str(tmp_path / "out"))
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [2, 3, 0]


def _qwen2(layers: int = 1):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1)).eval()


def test_control_tokens_outside_the_byte_alphabet_keep_their_ids(tmp_path):
    """Found by a hunt: transformers' reader cut DeepSeek's <｜User｜> into bytes and gave BOS and
    EOS new ids past the vocabulary, so add_bos_token refused every prompt."""
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>"]
    path = str(tmp_path / "deepseek.gguf")
    write_gguf(_qwen2(), path, "qwen2", specials=specials, add_bos=True)
    tokenizer = AutoTokenizer.from_pretrained(convert_gguf(path, str(tmp_path / "out")))
    assert len(tokenizer) == len(TOKENS) and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer("<｜User｜>Hi").input_ids == [1, 2, TOKENS.index("Hi")]  # BOS is token 1 in write_gguf
    assert tokenizer.decode([2, TOKENS.index("Hi")]) == "<｜User｜>Hi"


def test_a_gemma_vocabulary_with_a_user_defined_whitespace_token_converts(tmp_path):
    """A review: putting user-defined tokens back at their ids dropped Gemma's "▁▁" (which llama.cpp
    writes as two spaces, and transformers' reader spells as the vocabulary does) while a merge
    still made it: the tokenizer no longer loaded. Only control tokens are put back."""
    from pagedlm.transformers_utils.gguf import _write_tokenizer

    pieces = ["▁", "H", "i", "▁H", "▁Hi", "Hi"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *pieces, "  ", "<start_of_turn>"] + [f"<0x{b:02X}>" for b in range(256)]
    kinds = ([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + [gguf.TokenType.NORMAL] * len(pieces)
             + [gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256)
    path = str(tmp_path / "gemma.gguf")
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.makedirs(tmp_path / "out")
    _write_tokenizer(gguf.GGUFReader(path), path, str(tmp_path / "out"), 128, True, False)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tokenizer("<start_of_turn>Hi").input_ids == [2, tokens.index("<start_of_turn>"), tokens.index("Hi")]


def test_a_sentencepiece_vocabulary_without_special_ids_takes_llama_cpps(tmp_path):
    """Found by a hunt: a SentencePiece file without bos/eos/unk ids got no BOS and never stopped on
    EOS; llama.cpp takes 1, 2 and 0 for them (llama-vocab.cpp)."""
    from pagedlm.transformers_utils.gguf import _adds_bos, _eos_token_ids, _special_id, _write_tokenizer

    pieces = ["▁", "H", "i", "▁H", "▁Hi", "Hi"]
    tokens = ["<unk>", "<s>", "</s>", *pieces] + [f"<0x{b:02X}>" for b in range(256)]
    kinds = ([gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * len(pieces)
             + [gguf.TokenType.BYTE] * 256)
    path = str(tmp_path / "spm.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(len(pieces))] + [-1000.0] * 256)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    assert (_special_id(reader, "bos"), _eos_token_ids(reader), _special_id(reader, "unknown")) == (1, 2, 0)
    assert _adds_bos(reader)  # llama.cpp's default for SentencePiece where the file does not say
    os.makedirs(tmp_path / "out")
    _write_tokenizer(reader, path, str(tmp_path / "out"), 128, _adds_bos(reader), False)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer("Hi").input_ids == [1, tokens.index("▁Hi")]


def test_an_end_of_turn_id_outside_the_vocabulary_is_left_out_as_llama_cpp_does(tmp_path, caplog):
    """A review: refusing it (as an out-of-range BOS is, which transformers' reader indexes) turned
    away files llama.cpp loads, warning."""
    path = str(tmp_path / "m.gguf")
    write_gguf(tiny_model(tied=True), path, eot=len(TOKENS) + 5)
    out = convert_gguf(path, str(tmp_path / "out"))
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [2, 0]
    assert f"tokenizer.ggml.eot_token_id {len(TOKENS) + 5} is outside its vocabulary" in caplog.text


@pytest.mark.parametrize("pre, add_bos, bos_added", [("llama-bpe", None, True), ("tekken", None, True),
                                                     ("llama-bpe", False, False), ("smollm", None, False),
                                                     ("qwen2", None, False)])
def test_a_llama3_vocabulary_reads_as_llama_cpp_reads_it(tmp_path, pre, add_bos, bos_added):
    """Found by a hunt: llama.cpp adds BOS for Llama 3's pre-tokenizer group where the file does not
    say (files written before the key existed got none here), and takes a word its vocabulary holds
    as one token whatever the merges say (ignore_merges, which Llama 3's tokenizer.json sets too)."""
    path = str(tmp_path / "m.gguf")
    write_gguf(tiny_model(tied=True), path, pre=pre, add_bos=add_bos)
    out = convert_gguf(path, str(tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hi").input_ids == [1] * bos_added + [TOKENS.index("Hi")]
    with open(os.path.join(out, "tokenizer.json")) as f:
        spec = json.load(f)
    spec["model"]["merges"] = []  # "Hi" then is a vocabulary word no merge reaches
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    tokens = AutoTokenizer.from_pretrained(out).tokenize("Hi")
    assert tokens == (["Hi"] if pre in ("llama-bpe", "tekken") else ["H", "i"])


@pytest.mark.parametrize("pre, tokens", [("smollm", ["1", "2", "Ġ", "7"]), ("gpt-2", ["12", "Ġ7"]),
                                         ("mellum", ["12", "Ġ7"]), ("llama-bpe", ["12", "Ġ", "7"]), ("", ["12", "Ġ7"])])
def test_a_byte_level_vocabulary_splits_text_as_its_pre_tokenizer_type_says(tmp_path, caplog, pre, tokens):
    """Found by a hunt: tokenizer.ggml.pre types transformers' reader does not know were split as
    GPT-2 splits: SmolLM's (the embedded model's) digits one by one in llama.cpp and in its
    tokenizer.json, and types pagedlm does not reproduce were accepted. llama.cpp's other names of
    GPT-2's split ("mellum": a review) convert; a file without the key is split so, with a warning."""
    path = str(tmp_path / f"{pre}.gguf")
    model = tiny_model(tied=True)
    write_gguf(model, path, pre=pre)
    out = convert_gguf(path, str(tmp_path / "out"))
    assert ("has no tokenizer.ggml.pre" in caplog.text) == (pre == "")
    # write_gguf's vocabulary has no "12" or "Ġ7": add them, with their merges, to the converted one.
    with open(os.path.join(out, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    vocab.update({"12": len(vocab), "Ġ7": len(vocab) + 1})
    spec["model"]["merges"] += [["1", "2"], ["Ġ", "7"]]
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(tokenizer("12 7", add_special_tokens=False).input_ids) == tokens
    path = str(tmp_path / "coder.gguf")
    write_gguf(model, path, pre="deepseek-coder")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'deepseek-coder', a split of text before the merges "
                                         "that pagedlm does not reproduce"):
        resolve_model(path)


@pytest.mark.parametrize("damage, message", [
    ({"leave_out": "model.layers.1.self_attn.v_proj.weight"},
     r"lacks the tensors of qwen2 weights \['model.layers.1.self_attn.v_proj.weight'\]"),
    ({"rms_eps": False}, "has no 'qwen2.attention.layer_norm_rms_epsilon', which a qwen2 model needs"),
    # found by a hunt: transformers 5's RuntimeError ("ignore_mismatched_sizes"), not ours
    ({"head_count_kv": 2}, "qwen2 tensors have other shapes than its metadata gives them"),
])
def test_a_transformers_architecture_file_missing_a_tensor_or_metadata_is_refused(tmp_path, damage, message):
    """Found by a hunt: transformers' reader filled a missing tensor with random values, and a
    missing RMSNorm epsilon with its default (llama.cpp and the Llama path refuse both)."""
    path = str(tmp_path / "qwen2.gguf")
    write_gguf(_qwen2(layers=2), path, "qwen2", **damage)
    with pytest.raises(ValueError, match=message):
        convert_gguf(path, str(tmp_path / "out"))


def test_a_gguf_pagedlm_cannot_convert_is_refused_before_any_heavy_work(tmp_path, monkeypatch):
    """Found by a hunt: a tokenizer transformers cannot build ("bert") was refused after every weight
    was converted, in transformers' words; an unsupported architecture or a split file after a
    sha256 of the whole file (the conversion cache's record), on every try."""
    from pagedlm.transformers_utils import conversion_cache
    from pagedlm.transformers_utils import gguf as pagedlm_gguf

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work before the refusal")

    monkeypatch.setenv("PAGEDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(conversion_cache, "_sha256", heavy)
    monkeypatch.setattr(pagedlm_gguf, "save_file", heavy)
    path = str(tmp_path / "bert.gguf")
    write_gguf(tiny_model(tied=True), path, tokenizer_model="bert")
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'bert'; pagedlm builds a tokenizer of 'llama' or "
                                         "'gpt2'"):
        resolve_model(path)
    path = str(tmp_path / "split.gguf")
    write_gguf(tiny_model(tied=True), path, split_max_tensors=4)
    first = sorted(p for p in os.listdir(tmp_path) if p.startswith("split"))[0]
    with pytest.raises(ValueError, match="of a GGUF split into"):
        resolve_model(str(tmp_path / first))
    # A hunt: no embedding raised a bare StopIteration; a block count below the layers' dropped layers
    # behind a warning; a Mixtral, a biased Llama or a missing layer tensor were refused (or cached)
    # only after the file was hashed and read.
    biased = tiny_model(tied=True)
    biased.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(32))
    cases = [(tiny_model(tied=True), {"leave_out": "model.embed_tokens.weight"}, "has no token_embd.weight"),
             (tiny_model(tied=True), {"block_count": 1}, r"llama.block_count is 1, but its tensors are of 2 layers"),
             (_qwen2(layers=2), {"arch": "qwen2", "block_count": 3}, r"qwen2.block_count is 3, but its tensors are of 2"),
             (tiny_model(tied=True), {"expert_count": 4}, r"mixture-of-experts Llama \(llama.expert_count 4"),
             (biased, {}, r"holds tensor\(s\) blk.0.attn_q.bias, which pagedlm's Llama converter does not read"),
             (tiny_model(tied=False), {"leave_out": "model.layers.1.self_attn.v_proj.weight"},
              r"lacks tensor\(s\) blk.1.attn_v.weight, which a Llama model needs"),
             # A GGUF hunt: transformers' reader's IndexError and KeyError 'scores'.
             (tiny_model(tied=True), {"bos_id": 100000}, "tokenizer.ggml.bos_token_id is 100000, outside its vocabulary"),
             (tiny_model(tied=True), {"head_count_kv": 3},
              r"blk.0.attn_k.weight has 16 rows, which its llama.attention.head_count_kv \(3\) does not split"),
             (tiny_model(tied=True), {"head_count_kv": 0}, "llama.attention.head_count_kv is 0; it must be a positive"),
             (tiny_model(tied=True), {"tokenizer_model": "llama", "merges": False},
              "SentencePiece vocabulary has neither tokenizer.ggml.scores nor tokenizer.ggml.merges")]
    for i, (model, kwargs, message) in enumerate(cases):
        path = str(tmp_path / f"case{i}.gguf")
        write_gguf(model, path, **kwargs)
        with pytest.raises(ValueError, match=message):
            resolve_model(path)


def test_a_gguf_s_named_chat_templates_are_kept(tmp_path, monkeypatch):
    """Found by a hunt: llama.cpp's tokenizer.chat_template.<name> (Hermes 2 Pro's tool_use) was
    left out, so a chat with tools was refused (the default template reads none); transformers
    picks tool_use where tools are given."""
    monkeypatch.setenv("PAGEDLM_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "named.gguf")
    tool_use = "TOOLS{{ tools | length }}:{% for m in messages %}{{ m['content'] }}{% endfor %}"
    write_gguf(tiny_model(tied=True), path, named_templates=({"name": "tool_use", "template": tool_use},))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(path))
    assert tokenizer.chat_template == {"default": CHAT_TEMPLATE, "tool_use": tool_use}
    hi = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(hi, tools=[{"type": "function", "function": {"name": "f"}}],
                                         tokenize=False) == "TOOLS1:Hi"
    assert tokenizer.apply_chat_template(hi, tokenize=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_a_damaged_gguf_or_per_layer_head_counts_are_refused_by_name(tmp_path):
    """Found by a hunt: a truncated or damaged file raised the gguf package's numpy errors (a
    reshape, an index) naming no file, and per-layer head counts (a list) a TypeError."""
    path = str(tmp_path / "tiny.gguf")
    write_gguf(tiny_model(tied=True), path)
    data = open(path, "rb").read()
    for name, content in (("cut.gguf", data[: len(data) - 100]), ("header.gguf", data[:40]), ("empty.gguf", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}' is not a readable GGUF file \(truncated or damaged\?\)"):
            convert_gguf(str(tmp_path / name), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    # Found by a hunt: an array count past the file's end (2**40 token types) made the gguf package's
    # reader loop without end, its memory growing; strings' too (the tokens).
    for key, name in ((b"tokenizer.ggml.token_type", "count.gguf"), (b"tokenizer.ggml.tokens", "strings.gguf")):
        damaged = bytearray(data)
        struct.pack_into("<Q", damaged, damaged.index(key) + len(key) + 8, 2 ** 40)
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"{name}' is not a readable GGUF file \(truncated or damaged\?\): "
                                             rf"ValueError: the 1099511627776 elements of {key.decode()} would run past"):
            convert_gguf(str(tmp_path / name), str(tmp_path / "out"))
    model = tiny_model(tied=True)
    write_gguf(model, path, head_count_kv=[model.config.num_key_value_heads] * model.config.num_hidden_layers)
    with pytest.raises(ValueError, match="llama.attention.head_count_kv is a list, one count per layer"):
        convert_gguf(path, str(tmp_path / "out"))


def test_a_vocabulary_longer_than_the_embedding_is_refused(tmp_path):
    """Found by a hunt: it loaded, and prompts failed later with ids past the vocabulary."""
    model = tiny_model(tied=True)
    model.resize_token_embeddings(len(TOKENS) - 1)
    path = str(tmp_path / "short.gguf")
    write_gguf(model, path)
    with pytest.raises(ValueError, match=f"has {len(TOKENS)} tokens, but token_embd.weight {len(TOKENS) - 1} rows"):
        convert_gguf(path, str(tmp_path / "out"))


def test_resolve_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLM_CACHE", str(tmp_path / "cache"))
    path = str(tmp_path / "tiny.gguf")
    write_gguf(tiny_model(tied=True), path)

    out = resolve_model(path)
    assert out.startswith(str(tmp_path / "cache" / "gguf" / "tiny-"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    # Readable by every user of a shared cache (safetensors wrote the weights owner-only).
    assert all(os.stat(os.path.join(out, name)).st_mode & 0o444 == 0o444 for name in os.listdir(out))
    mtime = os.stat(os.path.join(out, "config.json")).st_mtime_ns
    assert resolve_model(path) == out
    assert os.stat(os.path.join(out, "config.json")).st_mtime_ns == mtime
    assert resolve_model(out) == out
    with pytest.raises(ValueError):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileExistsError):
        convert_gguf(path, out)
    # A hunt: an upper-case suffix was no GGUF, a directory of them met transformers' config error
    os.rename(path, str(tmp_path / "tiny.GGUF"))
    assert resolve_model(str(tmp_path / "tiny.GGUF")).startswith(str(tmp_path / "cache" / "gguf" / "tiny-"))
    with pytest.raises(ValueError, match=r"is a directory of GGUF files \(tiny.GGUF\) without a config.json: pass"):
        resolve_model(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")  # a tokenizer= directory beside its GGUF (a review)
    assert resolve_model(str(tmp_path), "tokenizer") == str(tmp_path)


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3", "phi3"])
def test_gguf_of_other_architectures(tmp_path, monkeypatch, arch):
    """GGUFs written as llama.cpp writes them load through transformers' GGUF reader plus the fields
    it skips, and generate what the original weights generate in Hugging Face: Qwen3 (head_dim !=
    hidden / heads), Gemma 2 (soft-caps, sliding window), Gemma 3 (linear RoPE scaling on the global
    layers), Phi-3 (sliding window, partial rotary)."""
    from transformers import (
        Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, Phi3Config, Phi3ForCausalLM,
        Qwen3Config, Qwen3ForCausalLM,
    )

    from pagedlm import LLM, SamplingParams

    monkeypatch.setenv("PAGEDLM_CACHE", str(tmp_path / "cache"))
    common = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    # query_pre_attn_scalar = head_dim: what llama.cpp (and so the converter) assumes for Gemma below 27B.
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, query_pre_attn_scalar=32, sliding_window=16,
                                               attn_logit_softcapping=5.0, final_logit_softcapping=8.0))
    elif arch == "gemma3":
        # Six layers: GGUF does not record Gemma 3's five-sliding-to-one-global pattern, llama.cpp assumes it.
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **{**common, "num_hidden_layers": 6}, query_pre_attn_scalar=32, sliding_window=16,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}))
    else:
        phi3 = {k: v for k, v in common.items() if k != "head_dim"}  # Phi-3 derives it: 64 / 4 = 16
        model = Phi3ForCausalLM(Phi3Config(**phi3, sliding_window=20, pad_token_id=0,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "partial_rotary_factor": 0.75}))
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if arch.startswith("gemma") else p.uniform_(0.5, 1.5)
    path = str(tmp_path / f"{arch}.gguf")
    write_gguf(model, path, arch)
    prompts = [[1, 40, 77, 200, 3, 259, 100] * (n // 7 + 1) for n in (7, 40, 90)]
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(ids):].tolist())
    llm = LLM(path, dtype="float32")
    config = llm.llm_engine.model_config.hf_config
    # dtype "auto" is bfloat16, as on the Llama path (a hunt: these ran in float32)
    assert config.dtype == torch.bfloat16
    if arch == "phi3":
        assert (config.sliding_window, config.rope_parameters["partial_rotary_factor"]) == (20, 0.75)
    if arch == "gemma3":
        assert config.rope_parameters["full_attention"]["rope_type"] == "linear"
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=12,
                                                                                   ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
