"""``call_in_fixed_row_chunks``, which CUDA runs the linears (batch_invariant), ``top_logprobs`` and
``sample`` through: on CPU, that the chunks, the padding and the written arguments give the results
of one call (on CUDA the point is the bits; the ``cuda``-marked tests check those)."""

import pytest
import torch

from pagedlm.ops import reference
from pagedlm.ops.fixed_rows import call_in_fixed_row_chunks, in_fixed_row_chunks


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


def test_sampler_ops_in_chunks_equal_one_call():
    """The written-argument lists ops/__init__.py registers for CUDA."""
    from pagedlm.ops import _ROW_REDUCING_WRITES

    gen = torch.Generator().manual_seed(3)
    n, vocab, k = 11, 500, 3
    logits = torch.randn(n, vocab, generator=gen) * 3
    sample_args = lambda: (logits, torch.rand(n, generator=gen) + 0.2, torch.randint(1, 600, (n,), generator=gen),  # noqa: E731
                           torch.rand(n, generator=gen) * 0.5 + 0.5, torch.rand(n, generator=gen) * 0.1,
                           torch.rand(n, generator=gen), torch.empty(n, dtype=torch.int64), torch.empty(n))
    top_args = lambda: (logits, torch.randint(0, vocab, (n,), generator=gen), torch.empty(n),  # noqa: E731
                        torch.empty(n, dtype=torch.int64), torch.empty(n, k), torch.empty(n, k, dtype=torch.int64))
    for name, make in (("sample", sample_args), ("top_logprobs", top_args)):
        gen.manual_seed(5)
        whole = make()
        getattr(reference, name)(*whole)
        gen.manual_seed(5)
        chunked = make()
        in_fixed_row_chunks(getattr(reference, name), 4, _ROW_REDUCING_WRITES[name])(*chunked)
        for i in _ROW_REDUCING_WRITES[name]:
            torch.testing.assert_close(chunked[i], whole[i], rtol=1e-6, atol=1e-6)
