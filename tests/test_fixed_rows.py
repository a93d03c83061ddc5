"""What CUDA runs for batch invariance, checked on CPU for its arithmetic (on CUDA the point is the
bits; the ``cuda``-marked tests check those): ``call_in_fixed_row_chunks`` (the linears with
``batch_invariant``, and ``sample``) and ``top_logprobs`` and ``sample`` with ``argmax_logprob``'s
log-sum (``pagedlm/ops/sampling.py``)."""

import pytest
import torch

from pagedlm import ops
from pagedlm.ops import reference, sampling
from pagedlm.ops.fixed_rows import call_in_fixed_row_chunks


@pytest.mark.parametrize("m", [0, 1, 3, 4, 9])
def test_chunks_write_every_row_and_only_the_written_args(m):
    x = torch.arange(m * 3, dtype=torch.float32).view(m, 3)
    out = torch.full((m, 3), float("nan"))
    calls = []

    def op(a, b):
        assert a.shape == (4, 3) and a.is_contiguous()
        calls.append(a.clone())
        b.copy_(2 * a)

    call_in_fixed_row_chunks(op, 4, (x, out), written=(1,))
    assert len(calls) == -(-m // 4)
    assert torch.equal(out, 2 * x)
    assert torch.equal(x, torch.arange(m * 3, dtype=torch.float32).view(m, 3))  # inputs are not written
    if m % 4:
        assert torch.equal(calls[-1][m % 4:], x[-1:].expand(4 - m % 4, 3))  # padded with the last row


def _logits(n: int, vocab: int) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(n)) * 3


def _formula(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The contract's ``(x[t] - max) + -log(sum(exp(x - max)))`` with the kernel's log-sum."""
    argmax, neg_log_sum = torch.empty(len(ids), dtype=torch.int64), torch.empty(len(ids))
    ops.argmax_logprob(logits, argmax, neg_log_sum)
    return (logits.gather(1, ids[:, None])[:, 0] - logits.gather(1, argmax[:, None])[:, 0]) + neg_log_sum


def test_top_logprobs_on_cuda_is_the_reference_with_the_kernels_log_sum():
    n, vocab, k = 70, 501, 4  # 70 rows: more than one chunk of SAMPLER_ROWS; an odd vocabulary
    logits = _logits(n, vocab)
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))
    got = (torch.empty(n), torch.empty(n, dtype=torch.int64), torch.empty(n, k), torch.empty(n, k, dtype=torch.int64))
    want = tuple(torch.empty_like(t) for t in got)
    sampling.top_logprobs_on_cuda(logits, ids, *got)
    reference.top_logprobs(logits, ids, *want)
    assert torch.equal(got[0], _formula(logits, ids))
    assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 501\)"):
        sampling.top_logprobs_on_cuda(logits, ids + vocab, *got)


def test_sample_on_cuda_picks_the_references_tokens_in_chunks():
    n, vocab = 2 * sampling.SAMPLER_ROWS + 5, 300
    gen = torch.Generator().manual_seed(4)
    logits = _logits(n, vocab)
    temperatures = torch.where(torch.arange(n) % 5 == 0, 0.0, torch.rand(n, generator=gen) + 0.3)
    rest = (torch.randint(1, 400, (n,), generator=gen), torch.rand(n, generator=gen) * 0.5 + 0.5,
            torch.rand(n, generator=gen) * 0.05, torch.rand(n, generator=gen))
    got = (torch.empty(n, dtype=torch.int64), torch.empty(n))
    want = (torch.empty(n, dtype=torch.int64), torch.empty(n))
    sampling.sample_on_cuda(logits, temperatures, *rest, *got)
    reference.sample(logits, temperatures, *rest, *want)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], _formula(logits, got[0]))
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_log_softmax_is_the_formula_for_every_token():
    logits = _logits(5, 257)
    ids = torch.arange(257).repeat(5, 1)
    assert torch.equal(sampling.log_softmax(logits), torch.stack([_formula(logits, ids[:, t]) for t in range(257)], 1))
    torch.testing.assert_close(sampling.log_softmax(logits), torch.log_softmax(logits, -1), rtol=1e-5, atol=1e-5)


def test_rows_without_a_softmax_take_the_kernels_token_and_nan_log_softmax():
    """A NaN row is greedy in sample; torch.argmax takes the NaN for its maximum, argmax_logprob
    never does, and sample_on_cuda answers with the kernel's (the plain-greedy path's) token. Beam
    search's log-softmax of such a row is all NaN, as torch.log_softmax's."""
    logits = _logits(4, 40)
    logits[1, 5] = float("nan")
    logits[2] = float("nan")
    logits[3, 7] = float("inf")
    n = logits.shape[0]
    kernel_ids, kernel_lps = torch.empty(n, dtype=torch.int64), torch.empty(n)
    ops.argmax_logprob(logits, kernel_ids, kernel_lps)
    ids, lps = torch.empty(n, dtype=torch.int64), torch.empty(n)
    sampling.sample_on_cuda(logits, torch.full((n,), 0.7), torch.full((n,), 40), torch.ones(n), torch.zeros(n),
                            torch.full((n,), 0.5), ids, lps)
    assert torch.equal(ids[1:], kernel_ids[1:])
    rows = sampling.log_softmax(logits)
    assert rows[1:].isnan().all() and not rows[0].isnan().any()
