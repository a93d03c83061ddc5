"""Log-probabilities in outputs (vLLM's ``vllm.logprobs``)."""

from collections.abc import Iterable, Iterator, MutableSequence
from dataclasses import dataclass, field
from typing import overload


@dataclass
class Logprob:
    """A token's log-probability under the model, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


LogprobsOnePosition = dict[int, Logprob]


@dataclass
class FlatLogprobs(MutableSequence[LogprobsOnePosition]):
    """The logprobs of many positions in six flat lists (vLLM's, ``SamplingParams.flat_logprobs``):
    a constant number of Python objects whatever the length and ``logprobs`` count, where a list
    of dicts holds two objects per entry for the garbage collector to walk.

    Reads like ``list[dict[int, Logprob]]``: ``len``, iteration and ``flat[i]`` build position
    ``i``'s dict on demand, and a slice is a ``FlatLogprobs``. Position ``i``'s entries are
    ``token_ids[start_indices[i]:end_indices[i]]`` and the same range of ``logprobs``, ``ranks`` and
    ``decoded_tokens``. A position without logprobs (the first prompt token's ``None``) reads as
    ``{}``, as vLLM's does. Only ``append`` and ``extend`` change it (setting, deleting or inserting a
    position raises ``TypeError``, as in vLLM).
    """

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, position: LogprobsOnePosition | None) -> None:
        self.start_indices.append(len(self.token_ids))
        for token_id, entry in (position or {}).items():
            self.token_ids.append(token_id)
            self.logprobs.append(entry.logprob)
            self.ranks.append(entry.rank)
            self.decoded_tokens.append(entry.decoded_token)
        self.end_indices.append(len(self.token_ids))

    def extend(self, positions: Iterable[LogprobsOnePosition | None]) -> None:
        for position in positions:
            self.append(position)

    def __len__(self) -> int:
        return len(self.start_indices)

    @overload
    def __getitem__(self, index: int) -> LogprobsOnePosition: ...

    @overload
    def __getitem__(self, index: slice) -> "FlatLogprobs": ...

    def __getitem__(self, index: int | slice) -> "LogprobsOnePosition | FlatLogprobs":
        if isinstance(index, slice):
            starts, ends = self.start_indices[index], self.end_indices[index]
            if index.step not in (None, 1):
                return FlatLogprobs.of(self[i] for i in range(len(self))[index])
            if not starts:
                return FlatLogprobs()
            lo, hi = starts[0], ends[-1]
            return FlatLogprobs([s - lo for s in starts], [e - lo for e in ends], self.token_ids[lo:hi],
                                self.logprobs[lo:hi], self.ranks[lo:hi], self.decoded_tokens[lo:hi])
        return {self.token_ids[j]: Logprob(self.logprobs[j], self.ranks[j], self.decoded_tokens[j])
                for j in range(self.start_indices[index], self.end_indices[index])}

    def __setitem__(self, index: int | slice, value: object) -> None:
        raise TypeError("FlatLogprobs positions cannot be set")

    def __delitem__(self, index: int | slice) -> None:
        raise TypeError("FlatLogprobs positions cannot be deleted")

    def insert(self, index: int, value: object) -> None:
        raise TypeError("FlatLogprobs positions cannot be inserted; append adds the next one")

    def __iter__(self) -> Iterator[LogprobsOnePosition]:
        return (self[i] for i in range(len(self)))

    @staticmethod
    def of(positions: Iterable[LogprobsOnePosition | None]) -> "FlatLogprobs":
        """The positions of a list of dicts, flat."""
        flat = FlatLogprobs()
        flat.extend(positions)
        return flat


# One dict per position: token id -> Logprob (the top-k tokens plus the chosen one); flat with
# ``SamplingParams.flat_logprobs``.
SampleLogprobs = FlatLogprobs | list[LogprobsOnePosition]
PromptLogprobs = FlatLogprobs | list[LogprobsOnePosition | None]


def create_sample_logprobs(flat_logprobs: bool) -> SampleLogprobs:
    """An empty container for a completion's logprobs (vLLM's)."""
    return FlatLogprobs() if flat_logprobs else []


def create_prompt_logprobs(flat_logprobs: bool) -> PromptLogprobs:
    """A container for a prompt's logprobs, holding the first token's (none: nothing precedes it)."""
    logprobs = create_sample_logprobs(flat_logprobs)
    logprobs.append(None)
    return logprobs
