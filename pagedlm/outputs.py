"""What ``LLM.generate`` returns (vLLM's ``RequestOutput`` and ``CompletionOutput``)."""

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One generated completion of a request.

    ``finish_reason`` is ``"stop"`` (EOS, a stop token) or ``"length"`` (``max_tokens`` or the
    model's context length); ``stop_reason`` is the stop token id that ended it, else ``None``.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
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
    outputs: list[CompletionOutput]
    finished: bool
