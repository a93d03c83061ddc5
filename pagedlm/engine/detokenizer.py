"""Token ids to text: incremental detokenization (O(1) decode work per token) and the text a single
token adds in its context (the ``decoded_token`` of logprobs)."""

import re
from collections.abc import MutableSequence, Sequence
from dataclasses import replace

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from pagedlm.logprobs import Logprob
from pagedlm.sampling_params import SamplingParams

# Tokens fed to the decoder as context, so a token decodes with the spacing it has after them:
# at least this many, and more (up to MAX_CONTEXT_TOKENS) where the first of them begin inside a
# character (vLLM's fast detokenizer looks for a prompt suffix that decodes without "\ufffd").
_CONTEXT_TOKENS = 6
MAX_CONTEXT_TOKENS = 24
# What decoders make of bytes that do not (yet) form a whole UTF-8 character.
_INCOMPLETE = "\ufffd"
_INVALID_PREFIX = "Invalid prefix encountered"
_MAX_CHARACTER_BYTES = 4  # UTF-8
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback tokenizer's byte tokens


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
        self._unemitted: list[int] = []  # tokens stepped through since the stream last emitted text
        primed = [self._step_stream(token_id) for token_id in self._context]
        # A context that ends inside a character leaves the stream holding the text since its last
        # emitted token, whole characters of the prompt among it, which the next token to emit text
        # emits with its own: that prompt text is dropped from it (_held), and so are the "\ufffd"
        # that stand for the prompt's unfinished character where that token does not finish it
        # (_held_incomplete: as the held tokens decode, since a byte-fallback decode of the whole
        # context turns the whole run of byte tokens into "\ufffd"; where the token finishes the
        # character, only those of bytes before it that no character takes are left to drop).
        emitted = "".join(chunk for chunk in primed if chunk is not None)
        ends_inside = bool(primed) and primed[-1] is None
        self._held = context_text.rstrip(_INCOMPLETE)[len(emitted):] if ends_inside else ""
        tail = self._backend.decode(self._unemitted, skip_special_tokens=skip_special_tokens) if ends_inside else ""
        self._held_incomplete = tail[len(tail.rstrip(_INCOMPLETE)):]
        self._num_fed = 0  # output tokens stepped through so far
        self._num_pending = 0  # tokens that so far end in an incomplete character
        self._added_tokens: dict[int, str] | None = None
        if not skip_special_tokens and not spaces_between_special_tokens:
            self._added_tokens = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self._last_added = False

    def _step_stream(self, token_id: int) -> str | None:
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception as exc:
            # Byte-fallback tokenizers: bytes that are not UTF-8 make a decode turn the whole run of
            # byte tokens into "�", characters already returned included, which DecodeStream
            # refuses. As vLLM does, go on with a fresh stream, but from the tokens not yet shown
            # (their "�" and a SentencePiece space after them would be lost from this token).
            if not str(exc).startswith(_INVALID_PREFIX):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            chunks = [self._stream.step(self._backend, t) for t in (*self._unemitted, token_id)]
            text = None if chunks[-1] is None else "".join(chunk for chunk in chunks if chunk is not None)
        if text is None:
            self._unemitted.append(token_id)
        else:
            self._unemitted.clear()
        return text

    def step(self, token_id: int) -> str:
        """The text that ``token_id`` adds (empty while it completes only part of a character)."""
        text = self._step_stream(token_id)
        if text is not None and (self._held or self._held_incomplete):
            text = _strip_incomplete(text.removeprefix(self._held), len(self._held_incomplete))
            self._held = self._held_incomplete = ""
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
        window, before = context_tokens(self._backend, token_ids[:split], self._skip_special_tokens)
        # What follows the last point where the text is final (``step``'s rule): the end of the
        # text returned so far, or inside the prompt when it ends inside a character.
        pending = token_ids[split:]
        text = self._backend.decode(window + pending, skip_special_tokens=self._skip_special_tokens)
        if text.startswith(before):  # the pending tokens change none of the text before them
            return text[len(before):]
        stable, tail, _ = _stable_text(self._backend, window, before, self._skip_special_tokens, len(window))
        if text.startswith(stable):
            return text[len(stable):]
        return _tail_text(self._backend, tail, pending, self._skip_special_tokens)


def _strip_incomplete(text: str, n: int) -> str:
    """``text`` without the ``\ufffd`` it begins with, at most ``n`` of them."""
    k = 0
    while k < min(n, len(text)) and text[k] == _INCOMPLETE:
        k += 1
    return text[k:]


def context_tokens(backend, token_ids: list[int], skip_special_tokens: bool) -> tuple[list[int], str]:
    """The last ``_CONTEXT_TOKENS`` of ``token_ids``, or the shortest longer suffix (up to
    ``MAX_CONTEXT_TOKENS``) that does not begin inside a character, and its text: a byte-fallback
    decoder turns such a start into ``\ufffd`` characters that later tokens can change, which would
    then show in the text they add."""
    for n in range(_CONTEXT_TOKENS, min(len(token_ids), MAX_CONTEXT_TOKENS) + 1):
        text = backend.decode(token_ids[-n:], skip_special_tokens=skip_special_tokens)
        # A window of special tokens that skip_special_tokens leaves out gives no spacing either.
        if (text or n == len(token_ids)) and (not text.startswith(_INCOMPLETE) or _begins_whole(backend, token_ids[-n:])):
            return list(token_ids[-n:]), text
    context = list(token_ids[-_CONTEXT_TOKENS:])
    return context, backend.decode(context, skip_special_tokens=skip_special_tokens)


def _byte_token(backend, token_id: int) -> int | None:
    """The byte a byte-fallback tokenizer's byte token (``<0xNN>``) stands for, else None."""
    byte = _BYTE_TOKEN.fullmatch(backend.id_to_token(token_id) or "")
    return None if byte is None else int(byte.group(1), 16)


def _begins_whole(backend, window: list[int]) -> bool:
    """Whether ``window``, whose text begins with ``\ufffd``, begins with a whole character all the
    same: a byte-fallback decoder turns a whole run of byte tokens into ``\ufffd`` when the run ends
    inside a character, so it is read from the first token, a byte token that is no UTF-8
    continuation byte (``10xxxxxx``)."""
    byte = _byte_token(backend, window[0])
    return byte is not None and not 0x80 <= byte < 0xC0


def _stable_text(backend, window: list[int], text: str, skip_special_tokens: bool,
                 first_held: int) -> tuple[str, list[int], str]:
    """``text``, the decode of ``window``, as far as it is shown before a later token completes its
    unfinished character; the tokens of ``window`` after that point; and their text (none where
    ``text`` ends in a whole character).

    Byte-level decoders: the point is the last token boundary from ``first_held`` on (the
    completion's tokens: the detokenizer emits a token's text, a space or whole characters before
    the bytes included, once the text ends in a whole character, however many tokens that takes)
    where the text ends in a whole character; where there is none, the whole characters of the
    tokens before ``first_held`` (a prompt's text is the prompt's). A byte-fallback decoder turns
    a whole run of byte tokens into ``\ufffd`` when it ends inside a character, characters the run
    completed before included: those are read from the window without its unfinished tokens.
    """
    stable = text.rstrip(_INCOMPLETE)
    if len(stable) == len(text):
        return stable, [], ""
    if _byte_token(backend, window[-1]) is None:
        for end in range(len(window) - 1, first_held - 1, -1):
            before = backend.decode(window[:end], skip_special_tokens=skip_special_tokens)
            if not before.endswith(_INCOMPLETE):
                return before, window[end:], text[len(before):]
        before = backend.decode(window[:first_held], skip_special_tokens=skip_special_tokens).rstrip(_INCOMPLETE)
        return before, window[first_held:], text[len(before):]
    # An unfinished character is at most 3 bytes, so tokens; further back the run holds bytes
    # that are not UTF-8, and the whole window is taken back.
    for end in range(len(window) - 1, max(len(window) - _MAX_CHARACTER_BYTES, 0), -1):
        before = backend.decode(window[:end], skip_special_tokens=skip_special_tokens)
        if not before.endswith(_INCOMPLETE):
            tail = backend.decode(window[end:], skip_special_tokens=skip_special_tokens)
            return max(stable, before, key=len), window[end:], tail[len(tail.rstrip(_INCOMPLETE)):]
    return stable, list(window), text[len(stable):]


def _tail_text(backend, tail: list[int], token_ids: list[int], skip_special_tokens: bool) -> str:
    """What ``token_ids`` add after ``tail``, a window's tokens after its last whole character, read
    without the window before it: where they change how a byte-fallback decoder reads the run of
    byte tokens before them (a byte that cannot continue it turns the run into ``\ufffd``), the text
    already shown stands and these tokens add their own, with the ``\ufffd`` of the bytes that
    were left unfinished."""
    text = backend.decode(tail + token_ids, skip_special_tokens=skip_special_tokens)
    shown = backend.decode(tail, skip_special_tokens=skip_special_tokens).rstrip(_INCOMPLETE)
    return text.removeprefix(shown)


def decode_completion(
    tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], token_ids: list[int], params: SamplingParams
) -> tuple[list[str], str]:
    """A whole completion's text, exactly as the incremental detokenizer would have made it: what
    each of its tokens adds, and what its end adds (``IncrementalDetokenizer.flush``: the ``�`` of a
    character its last tokens leave incomplete)."""
    detokenizer = IncrementalDetokenizer(
        tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
    )
    texts = [detokenizer.step(t) for t in token_ids]
    return texts, detokenizer.flush(token_ids)


def with_taken_texts(logprobs: MutableSequence[dict[int, Logprob]], token_ids: list[int], text: str, end: str,
                  token_texts: Sequence[str | None] = ()) -> MutableSequence[dict[int, Logprob]]:
    """A finished completion's ``logprobs`` (a list or ``FlatLogprobs``, one position per token of
    ``token_ids``, its output tokens; none without logprobs) with the taken tokens' ``decoded_token``
    made to add up to ``text``, the completion's: ``token_texts[i]``, where given and not None, is
    the text token ``i`` added (a completion decoded whole, as beam search's are), and what their
    texts fall short of ``text`` by once its end added ``end`` (``flush``: the ``\ufffd`` of a
    character its last tokens leave incomplete) goes to the last token's. Where a stop token ends
    it, its own ``decoded_token`` shows the unfinished bytes before it already, and where the
    tokens' texts are not the start of ``text`` (a special token that ``skip_special_tokens`` leaves
    out of it) nothing is added."""
    if not logprobs:
        return logprobs
    changed = {i: t for i, t in enumerate(token_texts) if t is not None}
    shown = "".join(changed.get(i, logprobs[i][t].decoded_token) or "" for i, t in enumerate(token_ids))
    if end and len(shown) < len(text) and text.startswith(shown):
        last = len(token_ids) - 1
        changed[last] = (changed.get(last, logprobs[last][token_ids[last]].decoded_token) or "") + text[len(shown):]
    if not changed:
        return logprobs
    out = logprobs[:0]
    for i, position in enumerate(logprobs):
        if i in changed:
            position = dict(position)
            position[token_ids[i]] = replace(position[token_ids[i]], decoded_token=changed[i])
        out.append(position)
    return out


def decode_in_context(tokenizer: PreTrainedTokenizerBase, context_ids: list[int], token_ids: Sequence[int],
                      spaces_between_special_tokens: bool = True, taken_text: str | None = None,
                      num_output_tokens: int | None = None) -> list[str]:
    """The text each of ``token_ids`` adds right after ``context_ids`` (vLLM's ``decoded_token``).

    A token keeps the space it stands for in context (SentencePiece's ``▁a`` is ``" a"``, not
    ``"a"``); a token that leaves a character incomplete adds nothing yet, and the one that
    completes it gives what the detokenizer would: the whole character, and the text of the
    completion's tokens that began it (their space; a prompt's whole characters are the prompt's,
    and so is the ``�`` of a character the prompt leaves unfinished and the token does not finish).
    ``num_output_tokens``: how many of ``context_ids``' last tokens are a completion's; None at a
    prompt's positions (prompt logprobs), whose tokens are each read as a completion's would be:
    a token that leaves a character incomplete adds nothing, the one completing it the rest. Special
    tokens are shown.

    ``token_ids[0]`` is the token the sequence took: its text is ``taken_text`` where the caller has
    it (what the detokenizer gave it, so the taken tokens' texts add up to the completion's, as
    OpenAI's ``text_offset`` needs), else exactly what it adds here. Where the context ends inside a
    character, the others (alternatives) that do not complete it give their own text, without the
    ``�`` that the unfinished bytes become beside them (vLLM shows ``-``, not ``�-``).
    ``spaces_between_special_tokens=False``: an added token right after another adds its bare
    content, as in the text (``IncrementalDetokenizer``).
    """
    backend = tokenizer.backend_tokenizer
    window, context_text = context_tokens(backend, context_ids, skip_special_tokens=False)
    first_held = 0 if num_output_tokens is None else max(len(window) - num_output_tokens, 0)
    stable, tail, broken = _stable_text(backend, window, context_text, False, first_held)
    # Where the prompt ends inside a character and no completion token has shown text yet, the
    # "\ufffd" its unfinished bytes become are the prompt's (IncrementalDetokenizer._held_incomplete).
    prompt_unfinished = ""
    if 0 < first_held and tail == window[first_held:] and _byte_token(backend, window[-1]) is None:
        prompt_text = backend.decode(window[:first_held], skip_special_tokens=False)
        prompt_unfinished = prompt_text[len(prompt_text.rstrip(_INCOMPLETE)):]
    broken = _strip_incomplete(broken, len(prompt_unfinished))
    given = [] if taken_text is None else [taken_text]
    texts = list(given)
    for token_id in token_ids[len(given):]:
        # One decode at a time: decode_batch's thread pool costs more than the decodes (3x for 6).
        full = backend.decode(window + [token_id], skip_special_tokens=False)
        if full.endswith(_INCOMPLETE):  # its text waits for the token that completes the character
            texts.append("")
            continue
        added = full[len(stable):] if full.startswith(stable) else \
            _tail_text(backend, tail, [token_id], skip_special_tokens=False)
        added = _strip_incomplete(added, len(prompt_unfinished))
        texts.append(added[len(broken):] if texts and broken and added.startswith(broken) else added)
    if not spaces_between_special_tokens and context_ids:
        added_tokens = tokenizer.added_tokens_decoder
        if context_ids[-1] in added_tokens:
            texts[len(given):] = [added_tokens[t].content if t in added_tokens else text
                                  for t, text in zip(token_ids[len(given):], texts[len(given):])]
    return texts
