"""The checkpoint's tokenizer, and prompt text to token ids."""

import logging

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger("pagedlm")


def get_tokenizer(model_dir: str, trust_remote_code: bool = False, chat_template: str | None = None
                  ) -> PreTrainedTokenizerBase:
    """The checkpoint's fast (Rust) tokenizer; incremental detokenization needs its backend.
    ``chat_template``, when given, replaces its own (every chat rendering goes through it)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_dir!r} has no fast tokenizer (tokenizer.json); pagedlm needs one.")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, with special tokens added as Hugging Face adds them.

    A text that already starts with the BOS token (a chat template rendered with
    ``tokenize=False`` usually does) would get a second BOS from a tokenizer that prepends one;
    the one the tokenizer adds is dropped, and one warning says how many prompts it happened to.
    A tokenizer that adds none (SmolLM2's, whose ``bos_token`` is a chat marker) keeps every token.
    """
    if not texts:
        return []
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
