"""vLLM's ``SamplingParams.bad_words``: words a completion may not generate.

Each word is tokenized as it stands and with a leading space (the form it takes after another
word), keeping the second form only when it is a different token sequence of the same length, as
vLLM's ``SamplingParams.update_from_tokenizer`` does. A one-token word's token is never sampled; a
longer word's last token is not sampled right after the completion's output ends with the rest of
the word (vLLM's bad-words logits processor, over output tokens only).
"""

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from pagedlm.utils import FieldError


def bad_words_token_ids(tokenizer: PreTrainedTokenizerBase, bad_words: Sequence[str]) -> list[list[int]]:
    """The token sequences that spell each of ``bad_words``.

    Raises:
        FieldError: ("bad_words") a word the tokenizer encodes as no token (its normalizer drops
            it, e.g. a lone combining accent under an accent-stripping one), which would ban
            nothing; vLLM's ``update_from_tokenizer`` refuses it too.
    """
    sequences: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise FieldError(f"bad_words entry {word!r} tokenizes to no token (the tokenizer's normalizer drops it), "
                             "so it could ban nothing; every entry must tokenize to at least one token", "bad_words")
        sequences.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return sequences


def banned_by_bad_words(sequences: list[list[int]], output_token_ids: Sequence[int]) -> set[int]:
    """The tokens that would complete one of ``sequences`` as the next output token."""
    banned = set()
    for ids in sequences:
        prefix = ids[:-1]
        if len(prefix) <= len(output_token_ids) and list(output_token_ids[len(output_token_ids) - len(prefix):]) == prefix:
            banned.add(ids[-1])
    return banned
