"""Requests with more completions than the engine runs at once (vLLM's parallel sampling).

The engine runs a request's sequences together, so ``n`` is bounded by ``max_num_seqs`` there.
``LLM`` runs a request with ``n`` above it as child requests of at most ``max_num_seqs``
completions each, as vLLM's ``ParentRequest`` fans ``n`` out, and returns one ``RequestOutput``
once every child has finished. The children share the prompt's blocks through the prefix cache.
"""

from dataclasses import dataclass, field, replace

from pagedlm.outputs import RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.utils import FieldError


def needs_children(params: SamplingParams, max_num_seqs: int) -> bool:
    """Whether ``params`` asks for more completions than one request may run: ``n`` above
    ``max_num_seqs`` with ``best_of == n`` (a larger ``best_of`` picks among all the completions,
    and beam search among all the beams, so neither splits)."""
    return params.n > max_num_seqs and params.best_of == params.n and not params.use_beam_search


def child_params(params: SamplingParams, max_num_seqs: int) -> list[tuple[int, SamplingParams]]:
    """``(offset, params)`` of each child: child completion ``i`` is the request's completion
    ``offset + i``, seeded with ``seed + offset + i`` as one request would seed it. Only the first
    child computes ``prompt_logprobs`` (and ``prompt_logprob_token_ids``' scores); the others read the prompt's blocks from the prefix cache.

    Raises:
        FieldError: a child's seed would be -1, which ``SamplingParams`` reads as no seed.
    """
    children = []
    for offset in range(0, params.n, max_num_seqs):
        n = min(max_num_seqs, params.n - offset)
        changes = {"n": n, "best_of": n}
        if params.seed is not None:
            changes["seed"] = _child_seed(params.seed, offset)
        if offset:
            changes.update(prompt_logprobs=None, prompt_logprob_token_ids=None, prompt_logprob_start=None)
        children.append((offset, params.clone(**changes)))
    return children


def _child_seed(seed: int, offset: int) -> int:
    """``seed + offset`` within int64 (what ``SamplingParams`` holds), wrapped as torch wraps a
    generator's seed (modulo 2**64), so that the child's generators are the ones ``seed + offset + i``
    gives."""
    wrapped = (seed + offset + 2**63) % 2**64 - 2**63
    if wrapped == -1:
        raise FieldError(f"seed {seed} gives completion {offset} the seed -1, which SamplingParams reads as no seed "
                         f"(this n runs as several requests); pick another seed", "seed")
    return wrapped


@dataclass(slots=True)
class ParentRequest:
    """The children of one request that are still running, and the outputs of those that finished."""

    request_id: str
    offsets: dict[str, int]  # child request id -> its first completion's index in the request
    finished: list[tuple[int, RequestOutput]] = field(default_factory=list)

    def add(self, request_id: str, output: RequestOutput) -> RequestOutput | None:
        """Take a finished child's output; once all are in, the request's output (completions in
        index order, the first child's prompt logprobs and prefix-cache hits), else None."""
        self.finished.append((self.offsets.pop(request_id), output))
        if self.offsets:
            return None
        self.finished.sort(key=lambda item: item[0])
        first = self.finished[0][1]
        outputs = [replace(c, index=offset + c.index) for offset, out in self.finished for c in out.outputs]
        return replace(first, request_id=self.request_id, outputs=outputs)
