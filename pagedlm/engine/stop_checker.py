"""When a sequence stops (vLLM's ``StopChecker``): the one place that knows which tokens end it.

A sequence stops on an EOS id (from ``generation_config.json`` and the tokenizer) unless
``ignore_eos``, on one of ``stop_token_ids``, or when its new text completes a stop string; none
of these before ``min_tokens`` tokens, before which no EOS id (``ignore_eos`` or not) nor stop
token id is sampled. It is cut at ``max_tokens`` and at its request's
``max_seq_len`` (``max_model_len``, or less where the KV cache cannot hold more), and past
``min_tokens`` where its ``repetition_detection`` finds its output repeating a pattern.
"""

from collections.abc import Collection

from pagedlm.engine.sequence import Sequence, SequenceStatus
from pagedlm.sampling_params import SamplingParams


class StopChecker:
    """``eos_token_ids``: every EOS id; ``primary_eos_token_id``: the tokenizer's, the one whose
    stop reports no ``stop_reason`` (vLLM adds the others to ``stop_token_ids``)."""

    def __init__(self, eos_token_ids: Collection[int], primary_eos_token_id: int | None = None) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.primary_eos_token_id = primary_eos_token_id

    def is_stop_token(self, params: SamplingParams, token_id: int) -> bool:
        """The rule: every id of ``stop_token_ids``, and the EOS ids unless ``ignore_eos``."""
        return token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos)

    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        """Every token id that ends a sequence under ``params``."""
        return frozenset(t for t in (*params.stop_token_ids, *self.eos_token_ids) if self.is_stop_token(params, t))

    def all_stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        """vLLM's ``all_stop_token_ids``: ``stop_token_ids`` and every EOS id, with ``ignore_eos`` too,
        the ids ``min_tokens`` keeps from being sampled (vLLM adds the EOS ids "to support min_tokens
        processing"; transformers' ``min_new_tokens`` bans EOS whatever stops the generation)."""
        return frozenset((*params.stop_token_ids, *self.eos_token_ids))

    def banned_token_ids(self, params: SamplingParams, num_output_tokens: int) -> tuple[int, ...]:
        """The ids sampling must avoid while fewer than ``min_tokens`` are generated."""
        if num_output_tokens >= params.min_tokens:
            return ()
        return tuple(sorted(self.all_stop_token_ids(params)))

    def stop_reason(self, params: SamplingParams, token_id: int) -> int | None:
        """vLLM's ``stop_reason`` for a sequence ended by ``token_id``: ``None`` for the tokenizer's
        EOS, else the id (another EOS id of ``generation_config.json`` included)."""
        return None if token_id == self.primary_eos_token_id and not params.ignore_eos else token_id

    def check_stop_token(self, seq: Sequence, params: SamplingParams) -> bool:
        """Whether ``seq``'s newest token stops it; sets ``seq.stop_reason`` if so. Checked before
        the token is detokenized, because a stop token's text is left out of the output."""
        token_id = seq.output_token_ids[-1]
        if len(seq.output_token_ids) < params.min_tokens or not self.is_stop_token(params, token_id):
            return False
        seq.stop_reason = self.stop_reason(params, token_id)
        return True

    def check_stop_strings(self, seq: Sequence, params: SamplingParams, num_new_chars: int) -> bool:
        """Whether ``seq``'s newest text (``num_new_chars`` characters) completes a stop string;
        if so, cuts the text there and sets ``seq.stop_reason`` to it. vLLM checks a stop token's
        own text too, where ``include_stop_str_in_output`` adds it (``stop=["ar"]`` and a stop
        token " Paris" give " Par", stop reason "ar")."""
        # vLLM's rule: the text of the first min_tokens tokens cannot complete a stop string.
        return (len(seq.output_token_ids) > params.min_tokens and bool(params.stop) and num_new_chars > 0
                and _cut_at_stop_string(seq, params, num_new_chars))

    def check(self, seq: Sequence, params: SamplingParams, max_seq_len: int, num_new_chars: int) -> SequenceStatus | None:
        """After ``check_stop_token``: the status ``seq`` ends with once its newest token's text
        (``num_new_chars`` characters) is added, or ``None``; cuts the text at a stop string."""
        num_out = len(seq.output_token_ids)
        if self.check_stop_strings(seq, params, num_new_chars):
            return SequenceStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH_CAPPED
        if seq.num_tokens >= max_seq_len:
            return SequenceStatus.FINISHED_LENGTH_CAPPED
        if params.repetition_detection and num_out >= params.min_tokens \
                and params.repetition_detection.detects(seq.output_token_ids):
            seq.stop_reason = "repetition_detected"
            return SequenceStatus.FINISHED_REPETITION
        return None


def _cut_at_stop_string(seq: Sequence, params: SamplingParams, num_new_chars: int) -> bool:
    """Find the stop string that the new text completes first (ties: the first in ``stop``); cut
    the text there. So the stop is the one text arriving a character at a time would hit, whatever
    the tokens (``stop=["the", "th"]`` on a token " the": "th"), as vLLM 0.32's
    ``check_stop_strings`` picks it."""
    text = seq.output_text
    hits = []
    for order, stop in enumerate(params.stop):
        # A match must end inside the new text, so start looking len(stop) - 1 chars before it.
        index = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if index >= 0:
            hits.append((index + len(stop), order, index, stop))
    if not hits:
        return False
    _, _, index, stop = min(hits)
    seq.output_text = text[: index + len(stop)] if params.include_stop_str_in_output else text[:index]
    seq.stop_reason = stop
    return True
