"""What one model step passes between the engine and the worker (vLLM's ``SequenceGroupMetadata``
and ``SamplerOutput``).

The engine owns all request state; for each step it hands the worker plain data: per scheduled
sequence, the tokens to compute, where they start, its block table and how many tokens its last row
samples (and with which generators). The worker returns plain results in the same order. Both
import this module; the worker imports nothing of the engine's.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pagedlm.sampling_params import SamplingParams


def token_range(prompt_token_ids: list[int], output_token_ids: list[int], start: int, end: int) -> list[int]:
    """Token ids at positions ``start:end`` of prompt + output, without copying the rest."""
    num_prompt = len(prompt_token_ids)
    if end <= num_prompt:
        return prompt_token_ids[start:end]
    if start >= num_prompt:
        return output_token_ids[start - num_prompt : end - num_prompt]
    return prompt_token_ids[start:] + output_token_ids[: end - num_prompt]


# Bit b of byte value v, for every v: unpacks a token bitmask one byte (8 tokens) per lookup.
_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab_size] bool from int32 [rows, ceil(vocab_size / 32)] words (``token_bitmask``
    rows: token t is bit t % 32 of word t // 32, as xgrammar fills them; bytes read little-endian)."""
    table = _BYTE_BITS.to(bitmask.device)
    as_bytes = bitmask.contiguous().view(torch.uint8).reshape(-1).int()
    return torch.index_select(table, 0, as_bytes).view(bitmask.shape[0], -1)[:, :vocab_size]


@dataclass(slots=True)
class SequenceData:
    """One sequence's share of a step.

    The step computes positions ``[num_computed_tokens, num_computed_tokens + token_chunk_size)``.
    ``prompt_token_ids`` and ``output_token_ids`` are the engine's lists, read-only here (the
    sampler's penalties and logits processors read them).
    """

    seq_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int
    token_chunk_size: int
    block_table: list[int]  # physical block of each of the sequence's logical blocks
    # Tokens sampled from the chunk's last row: 0 while the chunk ends before the sequence does; 1;
    # ``best_of`` when a group samples the first tokens of all its completions from one prompt.
    num_samples: int = 0
    generators: list[torch.Generator] | None = None  # one per sample, for seeded requests
    banned_token_ids: Sequence[int] = ()  # may not be sampled now (``min_tokens``, ``bad_words``)
    # Structured outputs: int32 [ceil(vocab / 32)], bit t % 32 of word t // 32 set = token t allowed.
    token_bitmask: torch.Tensor | None = None
    # The token the sample must be (thinking_token_budget), whatever the processed logits say.
    forced_token_id: int | None = None
    # Prompt positions [first, end) in this chunk whose next-token log-probabilities are returned
    # (prompt_logprobs), and those that score prompt_logprob_token_ids.
    prompt_logprob_span: tuple[int, int] | None = None
    prompt_token_id_span: tuple[int, int] | None = None

    @property
    def end(self) -> int:
        """One past the last position computed this step."""
        return self.num_computed_tokens + self.token_chunk_size

    def token_id(self, position: int) -> int:
        num_prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < num_prompt else self.output_token_ids[position - num_prompt]

    def chunk_token_ids(self) -> list[int]:
        return token_range(self.prompt_token_ids, self.output_token_ids, self.num_computed_tokens, self.end)


@dataclass(slots=True)
class SequenceGroupMetadata:
    """One request's share of a step: its sampling parameters and its scheduled sequences."""

    request_id: str
    sampling_params: SamplingParams
    seq_data: list[SequenceData]


@dataclass(slots=True)
class TopLogprobs:
    """The chosen token's rank and the top-k (ids, log-probabilities) at one position, or a
    request's ``logprob_token_ids`` with theirs and their ``ranks``."""

    rank: int
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int] | None = None  # None: the top-k's ranks are their positions


@dataclass(slots=True)
class SequenceOutput:
    """One sampled token. A sequence that samples ``k`` tokens gets ``k`` of these, in order."""

    parent_seq_id: int
    token_id: int  # meaningless where ``no_token``
    logprob: float | None  # under the model's raw logits; None where no row of the step reports it
    top_logprobs: TopLogprobs | None
    no_token: bool = False  # penalties, processors or bans left every token at -inf


@dataclass(slots=True)
class PromptLogprob:
    token_id: int  # the prompt token at this position
    logprob: float
    top_logprobs: TopLogprobs


@dataclass
class SequenceGroupOutput:
    """The worker's result for one ``SequenceGroupMetadata``, at the same index."""

    samples: list[SequenceOutput] = field(default_factory=list)  # in ``seq_data`` order
    # Beam search, [len(samples), vocab] with rows in ``samples`` order: log-probabilities after
    # logits processing (beams are ranked by them) and the model's own (the reported ones).
    beam_logprobs: torch.Tensor | None = None
    beam_raw_logprobs: torch.Tensor | None = None
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    # float32 [span rows, num_ids] on CPU: the prompt_token_id_span's scores of prompt_logprob_token_ids.
    prompt_token_id_logprobs: torch.Tensor | None = None
