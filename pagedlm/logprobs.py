"""Log-probabilities in outputs (vLLM's ``vllm.logprobs``)."""

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
