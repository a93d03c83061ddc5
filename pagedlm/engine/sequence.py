"""Sequences and sequence groups: the engine's unit of state (vLLM v0's ``sequence.py``)."""

import copy
import enum
from collections.abc import Hashable
from dataclasses import replace
from itertools import count
from typing import Any

import numpy as np
import torch

from pagedlm.engine.reasoning_gate import ReasoningGate
from pagedlm.engine.thinking_budget import ThinkingBudget
from pagedlm.logprobs import PromptLogprobs, SampleLogprobs, create_prompt_logprobs, create_sample_logprobs
from pagedlm.sampling_params import SamplingParams
from pagedlm.step import token_range
from pagedlm.utils import cdiv

# A full KV block's prefix-cache key: (hash of the parent block's key, the block's token ids); the
# first block's parent is the sequence's cache salt.
BlockKey = tuple[int | str | None, tuple[int, ...]]


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()  # a beam that lost its place; a sequence left with no allowed token
    FINISHED_REPETITION = enum.auto()  # its repetition_detection found a repeating pattern

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
                   SequenceStatus.FINISHED_ABORTED: "abort", SequenceStatus.FINISHED_REPETITION: "repetition"}
_FINISHED = frozenset(_FINISH_REASONS)


class Sequence:
    """The token ids of one completion and how many of them are already in the KV cache.

    ``num_computed_tokens`` is the one counter behind prefill, chunked prefill, decode and
    recompute after preemption: a step computes the next tokens after it, and a sequence samples
    once every token it holds is computed.
    """

    _ids = count()

    def __init__(self, index: int, prompt_token_ids: list[int], block_size: int, cache_salt: Hashable | None = None) -> None:
        self.seq_id = next(Sequence._ids)
        # Blocks are shared through the prefix cache only between sequences with the same salt: the
        # request's cache_salt, and whether its K/V depend on more than the tokens (a LongRoPE
        # prompt longer than the threshold).
        self.cache_salt = cache_salt
        self.index = index  # position among the group's completions
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.block_size = block_size
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.cumulative_logprob: float | None = 0.0  # None where its request does not report it
        self.output_text = ""
        self.stop_reason: int | str | None = None
        self.logprobs: SampleLogprobs = []
        # How much of output_token_ids (and logprobs) and output_text earlier DELTA outputs returned,
        # and whether one returned its finish (it is not returned again, as in vLLM).
        self.num_returned_tokens = 0
        self.num_returned_chars = 0
        self.finish_returned = False
        self._block_keys: list[BlockKey] = []
        # (sequence, tokens): after a preempted group is re-admitted, this sequence's first blocks
        # are another one's, which must compute that many tokens before this one may run.
        self.waits_for: tuple["Sequence", int] | None = None
        self.grammar_matcher: Any = None  # xgrammar's GrammarMatcher, under structured outputs
        self.thinking: ThinkingBudget | None = None  # under thinking_token_budget
        # Under structured outputs with a reasoning parser, until the reasoning ends: the grammar waits.
        self.reasoning_gate: ReasoningGate | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_logical_blocks(self) -> int:
        """Blocks its tokens occupy."""
        return cdiv(self.num_tokens, self.block_size)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids at positions ``start:end`` of prompt + output, without copying the rest."""
        return token_range(self.prompt_token_ids, self.output_token_ids, start, end)

    def block_key(self, i: int) -> BlockKey:
        """The prefix-cache key of full block ``i``; each key is computed once, from its parent's."""
        while len(self._block_keys) <= i:
            j = len(self._block_keys)
            parent = hash(self._block_keys[-1]) if j else self.cache_salt
            self._block_keys.append((parent, tuple(self.token_ids(j * self.block_size, (j + 1) * self.block_size))))
        return self._block_keys[i]

    def prefix_ready(self) -> bool:
        """Whether the blocks it shares with another sequence of its group are written."""
        if self.waits_for is None:
            return True
        owner, num_tokens = self.waits_for
        if owner.waits_for is None and owner.num_computed_tokens >= num_tokens:
            self.waits_for = None
            return True
        return False

    def append_token(self, token_id: int, logprob: float | None) -> None:
        self.output_token_ids.append(token_id)
        if self.cumulative_logprob is not None:
            self.cumulative_logprob += logprob

    def fork(self, index: int) -> "Sequence":
        """A new sequence with this one's tokens and cache state (its blocks are shared by the
        block manager's ``fork``)."""
        child = Sequence(index, self.prompt_token_ids, self.block_size, self.cache_salt)
        child.output_token_ids = list(self.output_token_ids)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.cumulative_logprob = self.cumulative_logprob
        child.output_text = self.output_text
        child.logprobs = self.logprobs[:]
        child.num_returned_tokens, child.num_returned_chars = self.num_returned_tokens, self.num_returned_chars
        child._block_keys = list(self._block_keys)
        if self.grammar_matcher is not None:
            child.grammar_matcher = self.grammar_matcher.fork()
        if self.thinking is not None:
            child.thinking = replace(self.thinking)
        if self.reasoning_gate is not None:
            child.reasoning_gate = copy.copy(self.reasoning_gate)
        return child

    def set_cache_salt(self, cache_salt: Hashable | None) -> None:
        """A new salt for the sequence's blocks from now on (keys computed so far are dropped)."""
        self.cache_salt = cache_salt
        self._block_keys = []

    def reset_for_recompute(self) -> None:
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.waits_for = None


class SequenceGroup:
    """All sequences generated from one prompt (one request).

    A group starts with one sequence; it prefills the prompt once and forks into ``best_of``
    sequences sharing the prompt's blocks when it samples its first tokens.
    """

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        block_size: int,
        arrival_time: float,
        generators: list[torch.Generator] | None = None,
        cache_salt: Hashable | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = arrival_time
        self.seqs = [Sequence(0, self.prompt_token_ids, block_size, cache_salt)]
        self.seqs[0].logprobs = create_sample_logprobs(sampling_params.flat_logprobs)
        if not sampling_params.reports_cumulative_logprob:
            self.seqs[0].cumulative_logprob = None
        self.generators = generators  # one per completion index, for seeded requests
        self.prompt_logprobs: PromptLogprobs | None = (
            None if sampling_params.prompt_logprobs is None else create_prompt_logprobs(sampling_params.flat_logprobs))
        self.num_returned_prompt_logprobs = 0  # by earlier DELTA outputs
        # prompt_logprob_token_ids' scores, float32 [rows, num_ids], filled as the prompt's chunks run.
        rows = sampling_params.prompt_logprob_token_ids
        self.prompt_token_id_logprobs = None if rows is None else np.empty((len(rows), len(rows[0])), np.float32)
        self.prompt_logprob_start = sampling_params.prompt_logprob_start or 0
        self.num_scored_prompt_rows = 0
        self.prompt_token_id_logprobs_returned = False  # by an earlier DELTA output
        self.stream_interval = 1  # set by the engine: tokens between two outputs of ``LLMEngine.step``
        # The longest completion's tokens, and the finished completions, when the last one was returned.
        self.num_streamed_tokens = self.num_streamed_finished = 0
        self.beam = None  # BeamSearchState under beam search
        self.max_seq_len = 0  # set by the engine: the longest each sequence may grow (stop checker)
        self.num_cached_tokens: int | None = None  # prefix-cache hits when first admitted (scheduler)
        self.num_cache_creation_tokens: int | None = None  # and the prompt tokens it then writes into the cache
        self.bad_words_token_ids: list[list[int]] = []  # set by the engine (engine.bad_words)

    def get_seqs(self, status: SequenceStatus | None = None) -> list[Sequence]:
        return self.seqs if status is None else [s for s in self.seqs if s.status == status]

    def get_seq(self, seq_id: int) -> Sequence:
        for seq in self.seqs:
            if seq.seq_id == seq_id:
                return seq
        raise KeyError(f"sequence {seq_id} is not in request {self.request_id!r}")

    def fans_out(self) -> bool:
        """True while the group is one sequence that has not sampled yet and samples the first
        tokens of all ``best_of`` completions from its prompt (beam search grows its beams itself)."""
        params = self.sampling_params
        return len(self.seqs) == 1 and not self.seqs[0].output_token_ids and params.best_of > 1 and not params.use_beam_search

    def prompt_logprob_span(self, start: int, end: int) -> tuple[int, int] | None:
        """Prompt positions ``[first, last)`` of a chunk ``[start, end)`` whose next-token
        log-probabilities are still missing (a recompute after preemption does not produce them
        twice), or ``None``."""
        if self.prompt_logprobs is None:
            return None
        return self._missing_span(len(self.prompt_logprobs) - 1, start, end)

    def prompt_token_id_span(self, start: int, end: int) -> tuple[int, int] | None:
        """As ``prompt_logprob_span``, for the rows ``prompt_logprob_token_ids`` scores."""
        if self.prompt_token_id_logprobs is None:
            return None
        return self._missing_span(self.prompt_logprob_start + self.num_scored_prompt_rows, start, end)

    def _missing_span(self, first: int, start: int, end: int) -> tuple[int, int] | None:
        last = min(end, len(self.prompt_token_ids) - 1)  # the last prompt position predicts an output token
        return (first, last) if start <= first < last else None

    def add_prompt_token_id_logprobs(self, scores: np.ndarray) -> None:
        """The next rows of ``prompt_token_id_logprobs``, float32 ``[rows, num_ids]``."""
        done = self.num_scored_prompt_rows
        self.prompt_token_id_logprobs[done : done + len(scores)] = scores
        self.num_scored_prompt_rows += len(scores)

    def is_finished(self) -> bool:
        for seq in self.seqs:
            if seq.status not in _FINISHED:
                return False
        return True
