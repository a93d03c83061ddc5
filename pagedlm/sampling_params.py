"""Sampling parameters for text generation (vLLM's ``SamplingParams``)."""

import math
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    allowed = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt.

    Args:
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: keep the smallest set of tokens whose probability adds up to ``top_p``, in (0, 1].
        top_k: keep the ``top_k`` most likely tokens; 0 or -1 turns it off.
        min_p: drop tokens less likely than ``min_p`` times the most likely one, in [0, 1].
        seed: per-request random seed: the same seed gives the same completion whatever else runs
            in the batch.
        max_tokens: most tokens to generate. ``None`` (the default) generates until an end-of-
            sequence or stop token, or until the context reaches the engine's ``max_model_len``;
            nothing is cut at an arbitrary small length.
        min_tokens: generate at least this many tokens before EOS or stop tokens may end the
            completion.
        ignore_eos: keep generating after the end-of-sequence token.
        stop_token_ids: token ids that end the completion (the token is kept in ``token_ids``).
        skip_special_tokens: leave special tokens out of the output text.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}.")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        _check_number("top_k", self.top_k, integer=True)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive int, got {self.top_k}.")
        if self.top_k == -1:
            self.top_k = 0
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None:
            _check_number("seed", self.seed, integer=True)
        if self.max_tokens is not None:
            _check_number("max_tokens", self.max_tokens, integer=True)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be None or at least 1, got {self.max_tokens}.")
        _check_number("min_tokens", self.min_tokens, integer=True)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens}).")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}.")
        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be a bool, got {self.skip_special_tokens!r}.")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}.")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS
