"""Incremental detokenization: each new token costs O(1) decode work, not a re-decode of the text."""

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

# Prompt tokens fed to the stream as context, so the first output token decodes with the spacing
# it has after the prompt.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(ids=prompt_token_ids[-_CONTEXT_TOKENS:], skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """The text that ``token_id`` adds (empty while it completes only part of a character)."""
        return self._stream.step(self._backend, token_id) or ""
