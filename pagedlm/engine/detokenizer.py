"""Incremental detokenization: each new token costs O(1) decode work, not a re-decode of the text."""

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

# Tokens fed to the decoder as context, so a token decodes with the spacing it has after them.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(ids=prompt_token_ids[-_CONTEXT_TOKENS:], skip_special_tokens=skip_special_tokens)
        self._num_fed = 0  # output tokens stepped through so far
        self._num_pending = 0  # tokens that so far end in an incomplete character

    def step(self, token_id: int) -> str:
        """The text that ``token_id`` adds (empty while it completes only part of a character)."""
        text = self._stream.step(self._backend, token_id)
        self._num_fed += 1
        self._num_pending = 0 if text is not None else self._num_pending + 1
        return text or ""

    def flush(self, prompt_token_ids: list[int], output_token_ids: list[int]) -> str:
        """At the end of a sequence, the text its pending tokens make, incomplete characters
        included, as a full decode of the tokens stepped through would give it."""
        if not self._num_pending:
            return ""
        token_ids = prompt_token_ids[-_CONTEXT_TOKENS:] + output_token_ids[: self._num_fed]
        window = token_ids[-(self._num_pending + _CONTEXT_TOKENS):]
        context = self._backend.decode(window[: -self._num_pending], skip_special_tokens=self._skip_special_tokens)
        return self._backend.decode(window, skip_special_tokens=self._skip_special_tokens)[len(context):]


def decode_completion(tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], token_ids: list[int], params) -> str:
    """A whole completion's text, decoded after a few prompt tokens so its first token keeps its spacing."""
    context = prompt_token_ids[-_CONTEXT_TOKENS:]
    skip = params.skip_special_tokens
    return tokenizer.decode(context + token_ids, skip_special_tokens=skip)[len(tokenizer.decode(context, skip_special_tokens=skip)):]
