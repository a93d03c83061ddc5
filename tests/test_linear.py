"""The bf16 streaming linear (ops.bf16_blocked_linear) against its reference and against oneDNN.

Its point is to give every row the bits oneDNN's matmul gives it, so the checks are bit for bit:
the CPU kernel against the reference's emulation of the summation order, the kernel on the chunk
ends found for a weight against oneDNN's own rows, and ``Linear`` (which switches kernels by row
count) row by row across row counts.
"""

import pytest
import torch

from pagedlm import ops
from pagedlm.model_executor.layers import linear, onednn_order
from pagedlm.model_executor.layers.linear import Linear
from pagedlm.ops import reference

pytest.importorskip("pagedlm._C", reason="pagedlm._C is not built; run `pip install --no-build-isolation -e .`")
if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
    pytest.skip("oneDNN has no bf16 matmul on this CPU", allow_module_level=True)


def operands(num_rows: int, out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 rows and a blocked weight whose products cancel: half the features are copies of the
    other half (x 64) with negated weights. Partial sums are then large and the totals small, so
    adding in any other order changes ~5% of the outputs' bits, and a wrong order cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    perm = torch.randperm(in_features, generator=gen)
    first, second = perm[: in_features // 2], perm[in_features // 2 : 2 * (in_features // 2)]
    x[:, first] *= 64
    x[:, second] = x[:, first]
    weight[:, second] = -weight[:, first]
    return x.to(torch.bfloat16), torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), 64)


def kernel_or_skip(*args) -> None:
    try:
        torch.ops.pagedlm.bf16_blocked_linear(*args)
    except RuntimeError as exc:
        if "AVX512-BF16" not in str(exc):
            raise
        pytest.skip("pagedlm._C was built without AVX512-BF16")


@pytest.mark.parametrize(
    "out_features,in_features,chunks",
    [(64, 32, []), (100, 50, [32]), (130, 33, []), (200, 96, [32, 64]), (70, 1100, [512, 1024]), (16, 7, [])],
)
@pytest.mark.parametrize("num_rows", [1, 5, 13])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_kernel_equals_reference_bits(out_features, in_features, chunks, num_rows, with_bias):
    dense_x, weight = operands(num_rows, out_features, in_features)
    # Strided rows on both sides: the op only needs each row's features contiguous.
    x = torch.zeros(num_rows, in_features + 3, dtype=torch.bfloat16)[:, 1 : in_features + 1]
    x.copy_(dense_x)
    bias = torch.randn(out_features).to(torch.bfloat16) if with_bias else None
    ends = [*chunks, in_features]
    out = torch.full((num_rows, out_features + 5), float("nan"), dtype=torch.bfloat16)[:, :out_features]
    kernel_or_skip(out, x, weight, bias, ends)
    expected = torch.empty(num_rows, out_features, dtype=torch.bfloat16)
    reference.bf16_blocked_linear(expected, x, weight, bias, ends)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("out_features,in_features", [(960, 576), (576, 1536), (64, 1024), (96, 4864), (130, 33)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_kernel_reproduces_onednn_rows(out_features, in_features, with_bias):
    x, weight = operands(40, out_features, in_features)
    bias = torch.randn(out_features).to(torch.bfloat16) if with_bias else None
    ends = onednn_order.streamed_chunk_ends(weight, bias, 64)
    if ends is None:
        pytest.skip("the streaming kernel does not reproduce oneDNN on this machine (Linear keeps oneDNN)")
    expected = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    for count in (1, 2, 3, 8, 17, 40):
        out = torch.empty(count, out_features, dtype=torch.bfloat16)
        ops.bf16_blocked_linear(out, x[:count], weight, bias, ends)
        assert torch.equal(out, expected[:count]), count


def test_chunk_probe_splits_where_oneDNN_does():
    # A split the probe reports must be real: one chain over all of K then misses oneDNN's bits.
    x, weight = operands(40, 96, 1536)
    ends = onednn_order.streamed_chunk_ends(weight, None, 64)
    if ends is None:
        pytest.skip("the streaming kernel does not reproduce oneDNN on this machine (Linear keeps oneDNN)")
    if ends == [1536]:
        pytest.skip("oneDNN sums K = 1536 in one chain on this machine")
    assert all(e % 32 == 0 for e in ends[:-1])
    expected = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    one_chain = torch.empty(40, 96, dtype=torch.bfloat16)
    ops.bf16_blocked_linear(one_chain, x, weight, None, [1536])
    assert not torch.equal(one_chain, expected)


def test_linear_rows_equal_at_every_row_count():
    x, weight = operands(linear._STREAMED_MAX_ROWS + 40, 300, 1536)
    layer = Linear(1536, 300, bias=True).to(torch.bfloat16)
    layer.weight = torch.nn.Parameter(weight.to_dense(), requires_grad=False)
    layer.process_weights_after_loading()
    if layer.k_chunk_ends is None:
        pytest.skip("the streaming kernel does not reproduce oneDNN on this machine")
    with torch.inference_mode():
        full = layer(x)
        for count in (1, 2, 6, linear._STREAMED_MAX_ROWS, linear._STREAMED_MAX_ROWS + 1):
            assert torch.equal(layer(x[:count]), full[:count]), count


@pytest.mark.parametrize("in_features", [513, 1025, 2049])
def test_linear_rows_equal_with_a_one_feature_last_chunk(in_features):
    # oneDNN sums the last feature apart when in_features is 1 past a chunk boundary; only a
    # subnormal running sum, which vdpbf16ps flushes within a chain, shows it (the bias exposes it).
    layer = Linear(in_features, 64, bias=True).to(torch.bfloat16)
    weight = torch.zeros(64, in_features)
    weight[:, 0], weight[:, in_features - 1] = 1.5e-38, 8e-38
    layer.weight = torch.nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.full((64,), 1.2e-38, dtype=torch.bfloat16), requires_grad=False)
    layer.process_weights_after_loading()
    if layer.k_chunk_ends is None:
        pytest.skip("the streaming kernel does not reproduce oneDNN on this machine")
    x = torch.zeros(linear._STREAMED_MAX_ROWS + 44, in_features)
    x[:, 0], x[:, in_features - 1] = 1.0, -0.125
    x = x.to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(layer(x[:1]), layer(x)[:1])


def test_linear_takes_any_leading_shape_and_strided_features():
    x, weight = operands(12, 200, 576)
    layer = Linear(576, 200, bias=True).to(torch.bfloat16)
    layer.weight = torch.nn.Parameter(weight.to_dense(), requires_grad=False)
    layer.process_weights_after_loading()
    with torch.inference_mode():
        flat = layer(x)
        assert torch.equal(layer(x.view(3, 4, 576)), flat.view(3, 4, 200))
        assert torch.equal(layer(x.t().contiguous().t()), flat)
    with torch.enable_grad():  # the bias no longer needs grad, so oneDNN adds it as the kernel does
        assert torch.equal(layer(x[:1]), layer(torch.cat([x] * 30))[:1])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "k_chunk_ends": [64, 32, 96]}, "k_chunk_ends must increase"),
        (lambda a: {**a, "k_chunk_ends": [33, 96]}, "be even"),
        (lambda a: {**a, "k_chunk_ends": [32, 64]}, "end at in_features = 96"),
        (lambda a: {**a, "weight": torch.zeros(64, 96, dtype=torch.bfloat16)}, "MKLDNN tensor"),
        (lambda a: {**a, "input": a["input"].float()}, "input must be bfloat16"),
        (lambda a: {**a, "out": torch.empty(4, 63, dtype=torch.bfloat16)}, r"out must be bfloat16 \[4, 64\]"),
        (lambda a: {**a, "bias": torch.zeros(65)}, r"bias must be a floating-point CPU tensor \[64\]"),
        (lambda a: {**a, "bias": torch.zeros(64, dtype=torch.int64)}, "bias must be a floating-point"),
    ],
)
def test_bad_arguments_are_named(change, message):
    x, weight = operands(4, 64, 96)
    args = {
        "out": torch.empty(4, 64, dtype=torch.bfloat16),
        "input": x,
        "weight": weight,
        "bias": None,
        "k_chunk_ends": [32, 96],
    }
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pagedlm.bf16_blocked_linear(**change(args))


def test_a_weight_of_another_size_is_refused():
    x, _ = operands(4, 60, 90)
    plain = torch.zeros(60, 90, dtype=torch.bfloat16).to_mkldnn()  # 10,800 bytes; AB16b64a2b pads to 12,288
    with pytest.raises(RuntimeError, match="weight must be in oneDNN's AB16b64a2b layout"):
        torch.ops.pagedlm.bf16_blocked_linear(torch.empty(4, 60, dtype=torch.bfloat16), x, plain, None, [90])
