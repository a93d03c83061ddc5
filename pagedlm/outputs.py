"""What ``LLM.generate`` returns (vLLM's ``RequestOutput``, ``CompletionOutput``; ``Logprob`` is in
``pagedlm.logprobs``, as vLLM's is in ``vllm.logprobs``)."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pagedlm.logprobs import PromptLogprobs, SampleLogprobs
from pagedlm.sampling_params import RequestOutputKind

if TYPE_CHECKING:  # the engine's state types import this module's
    from pagedlm.engine.sequence import SequenceGroup


@dataclass
class CompletionOutput:
    """One generated completion of a request.

    ``finish_reason`` is ``None`` while unfinished, then ``"stop"`` (EOS, a stop token or string,
    or a structured-outputs grammar that accepted a stop token), ``"length"`` (``max_tokens`` or the
    model's context length), ``"repetition"`` (its ``repetition_detection`` found a repeating
    pattern; ``stop_reason`` ``"repetition_detected"``) or ``"abort"`` (penalties, logits processors, ``allowed_token_ids``
    or bans left no token to sample, or none its structured-outputs grammar allows; the completion
    ends before that step, with a warning logged). ``stop_reason`` is
    the stop token id or stop string that ended it, else ``None``. ``cumulative_logprob`` is the
    sum of the model's own log-probabilities of ``token_ids`` (log-softmax of its logits, before
    penalties, processors or bans), for sampling and beam search alike; beam search ranks its beams
    by the processed ones. It is ``None`` without ``SamplingParams.logprobs`` or
    ``logprob_token_ids`` (vLLM's rule), except with ``best_of > n`` and under beam search.
    ``logprobs`` (with ``SamplingParams.logprobs`` or ``logprob_token_ids``, else ``None``) has one
    entry per token of ``token_ids``: a dict from token id to ``Logprob`` holding the top
    ``logprobs`` tokens, the ``logprob_token_ids`` given, and the sampled one (natural-log
    probabilities under the model's own logits), or the same as a ``FlatLogprobs`` with
    ``flat_logprobs``.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None = None
    routed_experts: None = None  # vLLM's fields, in its order; None here: pagedlm runs no mixture of experts,
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: None = None  # no adapters,
    sampling_mask: None = None  # returns no sampling masks (LLM(return_sampling_mask=False)),
    spec_decode_metrics: None = None  # runs no speculative decoding
    weight_versions: None = None  # and no weight updates

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)  # vLLM's is a plain class: equal only to itself, hashable (a dict key, a set member)
class RequestOutput:
    """The result of one prompt: its completions, in ``outputs``.

    While ``finished`` is False it is a snapshot of a request in progress (lists are copies), or
    under ``RequestOutputKind.DELTA`` what is new since the request's previous output.
    ``prompt`` is the prompt's text (a chat's rendered text), ``None`` for a prompt given as token
    ids without one. ``prompt_logprobs`` (with ``SamplingParams.prompt_logprobs``, else ``None``)
    has one entry per prompt token: ``None`` for the first (nothing precedes it), then a dict from
    token id to ``Logprob`` (the top ``prompt_logprobs`` tokens and the prompt's own), or a
    ``FlatLogprobs`` with ``flat_logprobs``. ``prompt_token_id_logprobs`` (with
    ``SamplingParams.prompt_logprob_token_ids``, once the whole prompt has run; else ``None``) is a
    float32 array ``[len(prompt_token_ids) - 1 - prompt_logprob_start, num_ids]``: row ``i`` the
    natural-log probabilities of that row's ids as prompt token ``prompt_logprob_start + i + 1``,
    -inf where the row was padded with -1 (vLLM's; a ``DELTA`` request gets it once).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    # vLLM's fields, in its order; always None here: its offline LLM keeps no per-request metrics
    # either, and pagedlm runs no adapters and no encoder-decoder models.
    metrics: None = None
    lora_request: None = None
    encoder_prompt: None = None
    encoder_prompt_token_ids: None = None
    # Prompt tokens served from the prefix cache when the request was first admitted, and those its
    # prefill wrote into it (vLLM's fields; None before that).
    num_cached_tokens: int | None = None
    num_cache_creation_tokens: int | None = None
    prompt_token_id_logprobs: np.ndarray | None = None
    kv_transfer_params: None = None  # vLLM's; None here: pagedlm moves no KV cache between engines
    ec_transfer_params: None = None

    def add(self, next_output: "RequestOutput", aggregate: bool) -> None:
        """Merge a later output of the same request into this one (vLLM's): each of its
        completions is appended to this one's of the same ``index`` where ``aggregate`` (text,
        token ids and logprobs; its cumulative logprob and finish replace this one's), or replaces
        it; a completion of a new ``index`` is added. ``finished`` becomes True once either is."""
        self.finished |= next_output.finished
        for new in next_output.outputs:
            old = next((i for i, c in enumerate(self.outputs) if c.index == new.index), None)
            if old is None:
                self.outputs.append(new)
            elif not aggregate:
                self.outputs[old] = new
            else:
                completion = self.outputs[old]
                completion.text += new.text
                completion.token_ids = [*completion.token_ids, *new.token_ids]
                if new.logprobs:
                    completion.logprobs.extend(new.logprobs)
                completion.cumulative_logprob = new.cumulative_logprob
                completion.finish_reason, completion.stop_reason = new.finish_reason, new.stop_reason

    @classmethod
    def from_seq_group(cls, seq_group: "SequenceGroup") -> "RequestOutput | None":
        """The request as its ``output_kind`` returns it after a step, or ``None`` (``FINAL_ONLY``
        before it finishes): ``n`` completions. With ``best_of > n`` the ``n`` of highest
        cumulative log-probability; under beam search the ``n`` best beams, best first. A
        ``DELTA`` output moves the sequences' returned offsets on, and leaves out a completion whose
        finish an earlier one returned (vLLM's ``ParentRequest.get_outputs``)."""
        params = seq_group.sampling_params
        finished = seq_group.is_finished()
        if params.output_kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if seq_group.stream_interval > 1 and not finished:
            # The first output, one when a completion finishes, else one every stream_interval tokens.
            num_tokens = max(len(seq.output_token_ids) for seq in seq_group.seqs)
            num_finished = sum(seq.status.finish_reason is not None for seq in seq_group.seqs)
            if (seq_group.num_streamed_tokens and num_finished == seq_group.num_streamed_finished
                    and num_tokens - seq_group.num_streamed_tokens < seq_group.stream_interval):
                return None
            seq_group.num_streamed_tokens, seq_group.num_streamed_finished = num_tokens, num_finished
        delta = params.output_kind is RequestOutputKind.DELTA
        seqs = seq_group.seqs
        if params.use_beam_search:
            seqs = seqs[: params.n]
        elif len(seqs) > 1:
            seqs = sorted(seqs, key=lambda s: s.index)
            if params.best_of > params.n:
                seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: params.n]
        with_logprobs = params.num_logprobs is not None
        held_back = params.output_text_buffer_length
        outputs = []  # positional arguments below: this runs for every scheduled request every step
        for i, seq in enumerate(seqs):
            finish_reason = seq.status.finish_reason
            if delta and seq.finish_returned:
                continue
            text = seq.output_text
            shown = max(len(text) - held_back, 0) if held_back and finish_reason is None else len(text)
            first_token, first_char = (seq.num_returned_tokens, seq.num_returned_chars) if delta else (0, 0)
            if delta:
                seq.num_returned_tokens = len(seq.output_token_ids)
                seq.num_returned_chars = max(first_char, shown)
                seq.finish_returned = finish_reason is not None
            outputs.append(CompletionOutput(
                i if params.use_beam_search else seq.index, text[first_char:shown], seq.output_token_ids[first_token:],
                seq.cumulative_logprob, seq.logprobs[first_token:] if with_logprobs else None, None, finish_reason,
                seq.stop_reason,
            ))
        prompt_logprobs = seq_group.prompt_logprobs
        if prompt_logprobs is not None:
            first = seq_group.num_returned_prompt_logprobs if delta else 0
            prompt_logprobs = prompt_logprobs[first:]
            if delta:
                seq_group.num_returned_prompt_logprobs += len(prompt_logprobs)
        scores = seq_group.prompt_token_id_logprobs
        if scores is not None and (seq_group.num_scored_prompt_rows < len(scores)
                                   or delta and seq_group.prompt_token_id_logprobs_returned):
            scores = None
        elif scores is not None:
            seq_group.prompt_token_id_logprobs_returned = True
            if not finished:  # a snapshot, as the lists are: a later output returns the group's array again
                scores = scores.copy()
        return cls(
            seq_group.request_id, seq_group.prompt, list(seq_group.prompt_token_ids), prompt_logprobs, outputs, finished,
            num_cached_tokens=seq_group.num_cached_tokens, num_cache_creation_tokens=seq_group.num_cache_creation_tokens,
            prompt_token_id_logprobs=scores,
        )


@dataclass
class BeamSearchSequence:
    """One sequence ``LLM.beam_search`` returns (vLLM's): ``tokens`` are the prompt's token ids
    followed by the generated ones, and ``text`` their decode, prompt included (as vLLM's).
    ``logprobs`` has one dict per generated token: the ``2 * beam_width`` most likely tokens and
    the chosen one. ``cum_logprob`` is the model's log-probability of the generated tokens (the
    sum over ``logprobs``' chosen entries); ``finish_reason`` and ``stop_reason`` are as in
    ``CompletionOutput``. ``orig_prompt`` is the prompt as vLLM's engine input holds it
    (``ParsedPrompt.tokens_input``); the fields are in vLLM's order."""

    orig_prompt: dict[str, Any]
    tokens: list[int]
    logprobs: SampleLogprobs
    lora_request: None = None  # no adapters, as RequestOutput's
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def get_prompt(self) -> dict[str, Any]:
        """``orig_prompt`` with this sequence's ``tokens`` as its ``prompt_token_ids``: the input that
        continues the sequence (vLLM's)."""
        return {**self.orig_prompt, "prompt_token_ids": list(self.tokens)}


@dataclass
class BeamSearchOutput:
    """The result of one prompt's beam search: its best sequences, best first."""

    sequences: list[BeamSearchSequence]
