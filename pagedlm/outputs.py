"""What ``LLM.generate`` returns (vLLM's ``RequestOutput``, ``CompletionOutput``, ``Logprob``)."""

from dataclasses import dataclass


@dataclass
class Logprob:
    """A token's log-probability under the model, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the top-k tokens plus the chosen one).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One generated completion of a request.

    ``finish_reason`` is ``"stop"`` (EOS, a stop token or string) or ``"length"`` (``max_tokens``
    or the model's context length); ``stop_reason`` is the stop token id or stop string that ended
    it, else ``None``.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one prompt: its completions, in ``outputs``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
