"""Token ids to text: incremental detokenization (O(1) decode work per token) and the text a single
token adds in its context (the ``decoded_token`` of logprobs)."""

from collections.abc import MutableSequence, Sequence
from dataclasses import replace
from itertools import chain

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from pagedlm.logprobs import Logprob
from pagedlm.sampling_params import SamplingParams

# Tokens fed to the decoder as context, so a token decodes with the spacing it has after them:
# at least this many, and more (up to _MAX_CONTEXT_TOKENS) where the first of them begin inside a
# character (vLLM's fast detokenizer looks for a prompt suffix that decodes without "\ufffd").
_CONTEXT_TOKENS = 6
_MAX_CONTEXT_TOKENS = 24
# What decoders make of bytes that do not (yet) form a whole UTF-8 character.
_INCOMPLETE = "\ufffd"
_INVALID_PREFIX = "Invalid prefix encountered"


class IncrementalDetokenizer:
    """The text of one completion, a token at a time, as ``tokenizer.decode`` of the whole gives it
    (except where a byte-fallback tokenizer produced bytes that are not UTF-8: a full decode turns
    neighbouring valid bytes into ``�`` too, text already returned keeps them).

    ``spaces_between_special_tokens=False`` (with ``skip_special_tokens=False``) follows vLLM's
    fast detokenizer: a special (added) token right after another one adds its bare content,
    without the space that some decoders (WordPiece, for one) put between tokens.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Primed by stepping through the context (as vLLM's fast detokenizer does), not with
        # ``DecodeStream(ids=...)``: that one returns the context's text along with the first
        # character an output token completes when the context ends inside a character.
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._context, context_text = context_tokens(self._backend, prompt_token_ids, skip_special_tokens)
        primed = [self._step_stream(token_id) for token_id in self._context]
        # A context that ends inside a character leaves the stream holding the text since its last
        # emitted token, whole characters of the prompt among it, which the token completing the
        # character would emit with its own: that prompt text is dropped from it (_held).
        emitted = "".join(chunk for chunk in primed if chunk is not None)
        self._held = context_text.rstrip(_INCOMPLETE)[len(emitted):] if primed and primed[-1] is None else ""
        self._num_fed = 0  # output tokens stepped through so far
        self._num_pending = 0  # tokens that so far end in an incomplete character
        self._added_tokens: dict[int, str] | None = None
        if not skip_special_tokens and not spaces_between_special_tokens:
            self._added_tokens = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self._last_added = False

    def _step_stream(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as exc:
            # Byte-fallback tokenizers: a valid byte followed by a byte that cannot start a
            # character makes the whole decode change its mind about text already returned, which
            # DecodeStream refuses. As vLLM does, go on with a fresh stream from this token.
            if not str(exc).startswith(_INVALID_PREFIX):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._backend, token_id)

    def step(self, token_id: int) -> str:
        """The text that ``token_id`` adds (empty while it completes only part of a character)."""
        text = self._step_stream(token_id)
        if text is not None and self._held:
            text = text.removeprefix(self._held)
            self._held = ""
        self._num_fed += 1
        self._num_pending = 0 if text is not None else self._num_pending + 1
        if self._added_tokens is not None:
            content = self._added_tokens.get(token_id)
            if content is not None and self._last_added and text is not None:
                text = content
            self._last_added = content is not None
        return text or ""

    def flush(self, output_token_ids: list[int]) -> str:
        """At the end of a sequence, the text its pending tokens make, incomplete characters
        included, as a full decode of the tokens stepped through would give it."""
        if not self._num_pending:
            return ""
        token_ids = self._context + output_token_ids[: self._num_fed]
        split = len(token_ids) - self._num_pending
        context, before = context_tokens(self._backend, token_ids[:split], self._skip_special_tokens)
        text = self._backend.decode(context + token_ids[split:], skip_special_tokens=self._skip_special_tokens)
        # What follows the last point where the context's text is final (``step``'s rule): the end
        # of the text returned so far, or inside the prompt when it ends inside a character.
        shorter = (self._backend.decode(context[:end], skip_special_tokens=self._skip_special_tokens)
                   for end in range(len(context) - 1, 0, -1))
        for before in chain([before], shorter):
            if text.startswith(before):
                text = text[len(before):]
                break
        return text.removeprefix(self._held)  # the prompt's own characters, if no step emitted them


def context_tokens(backend, token_ids: list[int], skip_special_tokens: bool) -> tuple[list[int], str]:
    """The last ``_CONTEXT_TOKENS`` of ``token_ids``, or the shortest longer suffix (up to
    ``_MAX_CONTEXT_TOKENS``) that does not begin inside a character, and its text: a byte-fallback
    decoder turns such a start into ``\ufffd`` characters that later tokens can change, which would
    then show in the text they add."""
    for n in range(_CONTEXT_TOKENS, min(len(token_ids), _MAX_CONTEXT_TOKENS) + 1):
        text = backend.decode(token_ids[-n:], skip_special_tokens=skip_special_tokens)
        if not text.startswith(_INCOMPLETE):
            return list(token_ids[-n:]), text
    context = list(token_ids[-_CONTEXT_TOKENS:])
    return context, backend.decode(context, skip_special_tokens=skip_special_tokens)


def decode_completion(
    tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], token_ids: list[int], params: SamplingParams
) -> tuple[str, str]:
    """A whole completion's text, exactly as the incremental detokenizer would have made it: what
    its tokens add one by one, and what its end adds (``IncrementalDetokenizer.flush``: the ``�`` of
    a character its last tokens leave incomplete)."""
    detokenizer = IncrementalDetokenizer(
        tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
    )
    text = "".join(detokenizer.step(t) for t in token_ids)
    return text, detokenizer.flush(token_ids)


def with_end_text(logprobs: MutableSequence[dict[int, Logprob]], token_ids: list[int], text: str,
                  end: str) -> MutableSequence[dict[int, Logprob]]:
    """A finished completion's ``logprobs`` (a list or ``FlatLogprobs``, one position per token of
    ``token_ids``, its output tokens; none without logprobs) with ``end``, the text its end adds
    (``flush``), added to the last token's ``decoded_token`` where the tokens' texts fall short of
    ``text`` by exactly ``end``: so the taken tokens' texts still add up to the completion's. Where
    a stop token ends it, its own ``decoded_token`` shows the unfinished bytes before it already
    (``decode_in_context``) and nothing changes."""
    if not end or not logprobs or \
            "".join(logprobs[i][t].decoded_token or "" for i, t in enumerate(token_ids)) + end != text:
        return logprobs
    last = len(token_ids) - 1
    position = dict(logprobs[last])
    entry = position[token_ids[last]]
    position[token_ids[last]] = replace(entry, decoded_token=(entry.decoded_token or "") + end)
    out = logprobs[:last]
    out.append(position)
    out.extend(logprobs[last + 1:])
    return out


def decode_in_context(tokenizer: PreTrainedTokenizerBase, context_ids: list[int], token_ids: Sequence[int]) -> list[str]:
    """The text each of ``token_ids`` adds right after ``context_ids`` (vLLM's ``decoded_token``).

    A token keeps the space it stands for in context (SentencePiece's ``▁a`` is ``" a"``, not
    ``"a"``); a token that completes a character begun by the context gives the whole character,
    and one that leaves a character incomplete adds nothing yet. Special tokens are shown.

    ``token_ids[0]`` is the token the sequence took: its text is exactly what it adds, so the taken
    tokens' texts add up to the completion's (as OpenAI's ``text_offset`` needs). Where the context
    ends inside a character, the others (alternatives) that do not complete it give their own text,
    without the ``�`` that the unfinished bytes become beside them (vLLM shows ``-``, not ``�-``).
    """
    backend = tokenizer.backend_tokenizer
    window, context_text = context_tokens(backend, context_ids, skip_special_tokens=False)
    prefix = context_text.rstrip(_INCOMPLETE)
    broken = _INCOMPLETE * (len(context_text) - len(prefix))  # the context's unfinished character, if any
    texts = []
    for token_id, full in zip(token_ids, backend.decode_batch([window + [t] for t in token_ids], skip_special_tokens=False)):
        full = full.rstrip(_INCOMPLETE)
        if not full.startswith(prefix):
            texts.append(backend.decode([token_id], skip_special_tokens=False))
            continue
        added = full[len(prefix):]
        texts.append(added[len(broken):] if texts and broken and added.startswith(broken) else added)
    return texts
