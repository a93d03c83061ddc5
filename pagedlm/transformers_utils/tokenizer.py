"""The checkpoint's tokenizer, and prompt text to token ids."""

import glob
import json
import logging
import os
import re
import weakref

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

logger = logging.getLogger("pagedlm")

# The chat template each tokenizer was loaded with in place of its own (get_tokenizer).
_configured_chat_templates: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, str]" = weakref.WeakKeyDictionary()


# The files transformers builds a tokenizer from (besides *.tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")


def get_tokenizer(model_dir: str, trust_remote_code: bool = False, chat_template: str | None = None
                  ) -> PreTrainedTokenizerBase:
    """The checkpoint's fast (Rust) tokenizer; incremental detokenization needs its backend.
    ``chat_template``, when given, is every chat rendering's default template in place of its own
    (``configured_chat_template``); the tokenizer keeps its own, so that a call naming one of its
    named templates still finds it, as in vLLM (found by a hunt: it was overwritten).

    Raises:
        ValueError: ``model_dir`` holds no tokenizer file, or only a slow (Python) tokenizer.
    """
    if os.path.isdir(model_dir) and not any(
            os.path.exists(os.path.join(model_dir, name)) for name in TOKENIZER_FILES) and not glob.glob(
            os.path.join(glob.escape(model_dir), "*.tiktoken")):
        # A hunt: transformers then said to install sentencepiece or tiktoken, which is not the fix.
        raise ValueError(f"{model_dir!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:4])}, ...): pass "
                         "tokenizer= (pagedlm run: --tokenizer) a checkpoint directory or GGUF file that has the "
                         "model's tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_dir!r} has no fast tokenizer (tokenizer.json); pagedlm needs one.")
    if chat_template is not None:
        _configured_chat_templates[tokenizer] = chat_template
    # The engine checks a prompt's length against max_model_len and names it; transformers' warning
    # past the tokenizer's model_max_length ("will result in indexing errors") is not pagedlm's limit.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def configured_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template ``tokenizer`` was loaded with in place of its own (``LLM(chat_template=...)``,
    ``pagedlm run --chat-template``), or None: like a call's ``chat_template``, it wins over a
    ``chat_template_kwargs`` key of that name (vLLM's ``ChatParams``)."""
    return _configured_chat_templates.get(tokenizer)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool = True
                   ) -> list[list[int]]:
    """Token ids of each text, with special tokens added as Hugging Face adds them (none with
    ``add_special_tokens=False``).

    A text that already starts with the BOS token (a chat template rendered with
    ``tokenize=False`` usually does) would get a second BOS from a tokenizer that prepends one;
    the one the tokenizer adds is dropped, and one warning says how many prompts it happened to.
    A tokenizer that adds none (SmolLM2's, whose ``bos_token`` is a chat marker) keeps every token.
    """
    if not texts:
        return []
    if not add_special_tokens:
        return tokenizer(texts, add_special_tokens=False).input_ids
    encoded = tokenizer(texts).input_ids
    bos_id, bos = tokenizer.bos_token_id, tokenizer.bos_token
    if bos_id is None or not bos:
        return encoded
    doubled = [i for i, (text, ids) in enumerate(zip(texts, encoded))
               if len(ids) > 1 and ids[0] == ids[1] == bos_id and text.startswith(bos)]
    # Asked only then: an extra tokenizer call per prompt on the engine's add_request path.
    if not doubled or tokenizer("").input_ids[:1] != [bos_id]:
        return encoded
    for i in doubled:
        encoded[i] = encoded[i][1:]
    logger.warning(
        "%d prompt(s) already started with the BOS token %r, which the tokenizer adds again; "
        "dropped the one it added.", len(doubled), bos,
    )
    return encoded


def num_special_tokens_before_text(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many special tokens (a BOS) the tokenizer puts before a text's own tokens."""
    text = tokenizer("a", add_special_tokens=False).input_ids
    ids = tokenizer("a").input_ids
    return next((i for i in range(len(ids) - len(text) + 1) if ids[i:i + len(text)] == text), 0)


class TokenBytes:
    """The bytes each vocabulary token stands for on its own: OpenAI's logprobs ``bytes``, where a
    token inside a multi-byte UTF-8 character carries only its part of it.

    Read from the vocabulary for the two byte-complete kinds of tokenizer: byte-level BPE (GPT-2's
    byte-to-unicode alphabet, as transformers' ``convert_slow_tokenizer.bytes_to_unicode`` defines
    it) and SentencePiece with byte fallback (``<0xNN>`` is byte NN; the decoder's ``Replace``
    steps, "▁" to a space, apply to the rest). Added tokens give the UTF-8 of their text; other
    tokenizers' tokens (WordPiece's ``##s``) give None: what they stand for depends on their context.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        steps = _decoder_steps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
        kinds = {step.get("type") for step in steps}
        self._byte_level = {char: byte for byte, char in bytes_to_unicode().items()} if "ByteLevel" in kinds else None
        self._byte_fallback = "ByteFallback" in kinds
        self._replacements = [(step["pattern"]["String"], step["content"]) for step in steps
                              if step.get("type") == "Replace" and "String" in (step.get("pattern") or {})]
        # An added token is its text; a non-special one goes through the decoder's replacements too.
        self._added = {i: self._replaced(token.content, token.special).encode("utf-8")
                       for i, token in tokenizer.added_tokens_decoder.items()}

    def __call__(self, token_id: int) -> bytes | None:
        if token_id in self._added:
            return self._added[token_id]
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        if token is None:  # an id past the tokenizer's vocabulary (padded lm_head rows)
            return b""
        if self._byte_level is not None:
            return b"".join(bytes([self._byte_level[c]]) if c in self._byte_level else c.encode("utf-8") for c in token)
        if self._byte_fallback and (byte := _BYTE_FALLBACK.fullmatch(token)):
            return bytes([int(byte.group(1), 16)])
        if self._byte_fallback:
            return self._replaced(token, special=False).encode("utf-8")
        return None

    def _replaced(self, text: str, special: bool) -> str:
        if self._byte_fallback and not special:
            for pattern, content in self._replacements:
                text = text.replace(pattern, content)
        return text


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_steps(decoder: dict | None) -> list[dict]:
    """A tokenizer.json decoder and the steps of its ``Sequence``s, flattened."""
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [step for inner in decoder.get("decoders", []) for step in _decoder_steps(inner)]
    return [decoder]
