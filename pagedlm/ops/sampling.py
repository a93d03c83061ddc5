"""Log-probabilities with the ``argmax_logprob`` kernel's log-sum, and ``top_logprobs`` and ``sample``
as CUDA runs them.

The sampling ops' contract (``pagedlm/ops/__init__.py``) gives a token's log-probability as
``(x[t] - max) + -log(sum(exp(x - max)))``, one formula for the three ops, so a row gets the same
bits whichever op the rest of the batch sends it through. On CUDA ``argmax_logprob`` is a kernel,
whose log-sum is a block reduction of fixed shape per row, but ``top_logprobs`` and ``sample`` run
the torch reference, whose sums torch launches by the number of rows and the rows' alignment. So on
CUDA both take the log-sum from the kernel, and ``sample`` (whose top-p mass and inverse CDF are
``cumsum``s over a row) runs in calls of ``SAMPLER_ROWS`` rows (``call_in_fixed_row_chunks``).
"""

import torch

from pagedlm.ops import reference
from pagedlm.ops.fixed_rows import call_in_fixed_row_chunks

SAMPLER_ROWS = 64


def argmax_and_neg_log_sum(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``ops.argmax_logprob`` over ``logits`` ``[rows, vocab]`` (any float dtype): each row's
    first maximum (int64 ``[rows]``), its value as float32 and ``-log(sum(exp(x - max)))``
    (float32 ``[rows, 1]`` each)."""
    from pagedlm import ops  # this module is imported while pagedlm.ops is

    argmax = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    neg_log_sum = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    ops.argmax_logprob(logits, argmax, neg_log_sum)
    return argmax, logits.gather(1, argmax[:, None]).float(), neg_log_sum[:, None]


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top: torch.Tensor,
                   neg_log_sum: torch.Tensor) -> torch.Tensor:
    """``(x[t] - max) + neg_log_sum`` for each row's ``token_ids`` (int64 ``[rows]``, or
    ``[rows, k]`` for ``k`` a row), given ``argmax_and_neg_log_sum``'s ``top`` and
    ``neg_log_sum``: float32 of ``token_ids``' shape."""
    ids = token_ids if token_ids.dim() == 2 else token_ids[:, None]
    values = (logits.gather(1, ids).float() - top) + neg_log_sum
    return values if token_ids.dim() == 2 else values[:, 0]


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the rows of ``logits`` ``[rows, vocab]`` (any float dtype) in the ops'
    formula; float32 ``[rows, vocab]``, all NaN in a row with no softmax (a NaN, or an infinite
    maximum), as ``torch.log_softmax`` gives."""
    _, top, neg_log_sum = argmax_and_neg_log_sum(logits)
    return ((logits.float() - top) + neg_log_sum).masked_fill(reference.no_softmax(top, neg_log_sum), float("nan"))


def top_logprobs_on_cuda(logits: torch.Tensor, token_ids: torch.Tensor, logprobs: torch.Tensor, ranks: torch.Tensor,
                         top_logprobs: torch.Tensor, top_ids: torch.Tensor) -> None:
    """``top_logprobs`` (the reference, past its log-sum: max, gathers, comparisons and counts, exact
    whatever the launch shape)."""
    _, top, neg_log_sum = argmax_and_neg_log_sum(logits)
    reference.top_logprobs_from_log_sum(logits.float(), top, neg_log_sum, token_ids, logprobs, ranks, top_logprobs,
                                        top_ids)


def sample_on_cuda(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                   min_ps: torch.Tensor, uniforms: torch.Tensor, token_ids: torch.Tensor,
                   logprobs: torch.Tensor | None = None) -> None:
    """``sample``: the reference picks the tokens in calls of ``SAMPLER_ROWS`` rows, but greedy rows
    (temperature 0, or no softmax) take the kernel's argmax (``torch.argmax`` takes a NaN for the
    maximum, the kernel never does); the log-probabilities take the kernel's log-sum."""
    call_in_fixed_row_chunks(reference.sample, SAMPLER_ROWS,
                             (logits, temperatures, top_ks, top_ps, min_ps, uniforms, token_ids), written=(6,))
    argmax, top, neg_log_sum = argmax_and_neg_log_sum(logits)
    greedy = (temperatures == 0) | reference.no_softmax(top, neg_log_sum)[:, 0]
    token_ids.copy_(torch.where(greedy, argmax, token_ids))
    if logprobs is not None:
        logprobs.copy_(token_logprobs(logits, token_ids, top, neg_log_sum))
