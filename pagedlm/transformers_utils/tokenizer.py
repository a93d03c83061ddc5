from transformers import AutoTokenizer, PreTrainedTokenizerBase


def get_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    """The checkpoint's fast (Rust) tokenizer; incremental detokenization needs its backend."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_dir!r} has no fast tokenizer (tokenizer.json); pagedlm needs one.")
    return tokenizer
