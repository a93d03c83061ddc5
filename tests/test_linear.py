"""The CPU linears: the streaming kernel (ops.bf16_blocked_linear) against its reference and against
oneDNN, the packed kernels (ops.bf16_amx_linear, and ops.bf16_fma_linear and ops.fp32_fma_linear for
AVX2 CPUs) against their reference, the kernels' gate_up variants (``*_act_and_mul``) against the linear then the
activation, and ``Linear``'s rows.

The streaming kernel's point is to give every row the bits oneDNN's matmul gives it, so the checks
are bit for bit: the CPU kernel against the reference's emulation of the summation order, the kernel
on the chunk ends found for a weight against oneDNN's own rows. The packed kernels' is that a row's
bits do not depend on the row count. ``Linear`` (whichever kernels it runs) is checked row by row across
row counts.
"""

import os
import subprocess
import sys

import pytest
import torch

from pagedlm import ops
from pagedlm.model_executor.layers import linear, onednn_order
from pagedlm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from conftest import HAS_CUDA_KERNELS
from pagedlm.model_executor.layers.linear import INVARIANT_ROWS, GateUpLinear, Linear, fixed_shape_linear
from pagedlm.ops import reference

pytest.importorskip("pagedlm._C", reason="pagedlm._C is not built; run `pip install --no-build-isolation -e .`")
ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bf16 matmul on this CPU (AVX2)")


def operands(num_rows: int, out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 rows and a weight whose products cancel: half the features are copies of the other half
    (x 64) with negated weights. Partial sums are then large and the totals small, so adding in any
    other order changes ~5% of the outputs' bits, and a wrong order cannot pass. The weight is in
    oneDNN's blocked layout where oneDNN takes bf16, else dense."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    perm = torch.randperm(in_features, generator=gen)
    first, second = perm[: in_features // 2], perm[in_features // 2 : 2 * (in_features // 2)]
    x[:, first] *= 64
    x[:, second] = x[:, first]
    weight[:, second] = -weight[:, first]
    weight = weight.to(torch.bfloat16)
    return x.to(torch.bfloat16), torch.ops.mkldnn._reorder_linear_weight(weight, 64) if ONEDNN_BF16 else weight


def onednn_bf16_or_skip() -> None:
    if not ONEDNN_BF16:
        pytest.skip("oneDNN has no bf16 matmul on this CPU (AVX2): no blocked weights")


def kernel_or_skip(*args) -> None:
    onednn_bf16_or_skip()
    if not onednn_order.reorders_to_ab16b64a2b(64):
        pytest.skip("oneDNN lays bf16 weights out in another layout than AB16b64a2b on this CPU (AMX)")
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
@pytest.mark.parametrize("num_rows", [1, 5, 8, 13, 40])
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


@needs_onednn_bf16
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


@needs_onednn_bf16
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_rows_equal_at_every_row_count(dtype):
    x, weight = operands(300, 300, 1536)
    x = x.to(dtype)
    layer = Linear(1536, 300, bias=True).to(dtype)
    layer.weight = torch.nn.Parameter(weight.to_dense().to(dtype), requires_grad=False)
    layer.process_weights_after_loading()
    if not layer.runs_own_kernel:
        pytest.skip("no kernel of Linear's own runs this dtype on this machine (oneDNN runs every row count)")
    with torch.inference_mode():
        full = layer(x)
        for count in (1, 2, 6, 13, 256, 257):
            assert torch.equal(layer(x[:count]), full[:count]), count
        if layer.k_chunk_ends is not None:  # a prefill's rows: oneDNN's bits, as transformers' F.linear gets
            assert torch.equal(full, onednn_order.onednn_linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_fixed_shape_linear_computes_the_product(with_bias):
    """Its chunking and padding (on CPU: on CUDA the products' bits are what it is for)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2 * INVARIANT_ROWS + 3, 40, generator=gen, dtype=torch.float64)
    weight = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    bias = torch.randn(24, generator=gen, dtype=torch.float64) if with_bias else None
    for m in (0, 1, 5, INVARIANT_ROWS, INVARIANT_ROWS + 1, 2 * INVARIANT_ROWS + 3):
        out = fixed_shape_linear(x[:m], weight, bias)
        assert out.shape == (m, 24) and out.is_contiguous()
        torch.testing.assert_close(out, torch.nn.functional.linear(x[:m], weight, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("out_features,in_features", [(1536, 576), (4096, 4096), (151936, 896)])
def test_cuda_linear_rows_do_not_depend_on_the_row_count(dtype, out_features, in_features):
    """On CUDA ``Linear`` (batch-invariant by default) gives each row the same bits at any row count,
    where one cuBLAS product per call need not."""
    gen = torch.Generator().manual_seed(out_features)
    layer = Linear(in_features, out_features, bias=True)
    layer.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=gen) * in_features**-0.5)
    layer.bias = torch.nn.Parameter(torch.randn(out_features, generator=gen))
    layer = layer.to("cuda", dtype)
    layer.process_weights_after_loading()
    x = torch.randn(700, in_features, generator=gen).to("cuda", dtype)
    picked = list(range(0, 700, 37))
    with torch.inference_mode():
        alone = torch.cat([layer(x[i:i + 1]) for i in picked])
        for count in (1, 2, 3, 8, 64, 127, 128, 129, 256, 300, 700):
            rows = [j for j, i in enumerate(picked) if i < count]
            out = layer(x[:count])
            assert torch.equal(out[[picked[j] for j in rows]], alone[rows]), count


READ_AHEAD_OF_A_DROPPED_WEIGHT = """
import gc, time, torch
torch.set_num_threads(2)
from pagedlm import ops
def blocked(out_features, in_features):
    return torch.ops.mkldnn._reorder_linear_weight(torch.randn(out_features, in_features).to(torch.bfloat16), 64)
x = torch.randn(1, 4096).to(torch.bfloat16)
a, b = blocked(256, 4096), blocked(8192, 4096)  # b: 64 MiB, its own mapping, unmapped when freed
out_a, out_b = torch.empty(1, 256, dtype=torch.bfloat16), torch.empty(1, 8192, dtype=torch.bfloat16)
for _ in range(3):  # the kernels learn that b follows a
    ops.bf16_blocked_linear(out_a, x, a, None, [4096])
    ops.bf16_blocked_linear(out_b, x, b, None, [4096])
first = out_a.clone()
del b
gc.collect()
for _ in range(200):  # each call asks the idle worker to read ahead what followed a last time
    ops.bf16_blocked_linear(out_a, x, a, None, [4096])
    end = time.perf_counter() + 2e-4
    while time.perf_counter() < end:
        pass
    assert torch.equal(out_a, first)
print("ok")
"""


@needs_onednn_bf16
def test_read_ahead_never_reads_a_dropped_weight():
    # The pool's idle workers read ahead the weight that followed this one last time; once that
    # weight is gone they must not read its (unmapped) memory. A fresh interpreter: a crash fails here.
    x, weight = operands(1, 64, 32)
    kernel_or_skip(torch.empty(1, 64, dtype=torch.bfloat16), x, weight, None, [32])
    result = subprocess.run([sys.executable, "-c", READ_AHEAD_OF_A_DROPPED_WEIGHT], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


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
    if not layer.runs_own_kernel:
        pytest.skip("neither bf16 kernel of Linear runs on this machine (oneDNN runs every row count)")
    x = torch.zeros(300, in_features)
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


@needs_onednn_bf16
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


@needs_onednn_bf16
def test_a_weight_of_another_size_is_refused():
    x, _ = operands(4, 60, 90)
    plain = torch.zeros(60, 90, dtype=torch.bfloat16).to_mkldnn()  # 10,800 bytes; AB16b64a2b pads to 12,288
    with pytest.raises(RuntimeError, match="weight must be in oneDNN's AB16b64a2b layout"):
        torch.ops.pagedlm.bf16_blocked_linear(torch.empty(4, 60, dtype=torch.bfloat16), x, plain, None, [90])


PACKED_KERNELS = ["bf16_amx", "bf16_fma", "fp32_fma"]


def packed_ops_or_skip(kernel: str):
    """The linear and gated ops of a kernel, or a skip where it does not run here."""
    if kernel == "bf16_amx" and not linear.amx_linear_available():
        pytest.skip("ops.bf16_amx_linear does not run here (no AMX-BF16 build, CPU or kernel permission)")
    if kernel.endswith("fma") and not linear.fma_linear_available():
        pytest.skip(f"ops.{kernel}_linear does not run here (no AVX2 + FMA build)")
    return getattr(ops, f"{kernel}_linear"), getattr(ops, f"{kernel}_linear_act_and_mul")


def kernel_dtype(kernel: str) -> torch.dtype:
    return torch.float32 if kernel == "fp32_fma" else torch.bfloat16


def pack(kernel: str, weight: torch.Tensor, gate_up: bool = False) -> torch.Tensor:
    """``weight`` in the kernel's layout (fp32_pack_weight's or amx_pack_weight's), gate_up or plain."""
    if kernel == "fp32_fma":
        return (ops.fp32_pack_gate_up_weight if gate_up else ops.fp32_pack_weight)(weight.float())
    return (ops.amx_pack_gate_up_weight if gate_up else ops.amx_pack_weight)(weight)


def exact_operands(num_rows: int, out_features: int, in_features: int,
                   dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integers: every partial sum is exact in fp32, so any summation order gives the
    reference's bits and a misplaced weight or row cannot."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (num_rows, in_features), generator=gen)
    weight = torch.randint(-3, 4, (out_features, in_features), generator=gen)
    return x.to(dtype), weight.to(dtype)


@pytest.mark.parametrize(
    "out_features,in_features",
    [(16, 32), (7, 5), (100, 50), (130, 33), (64, 1100), (200, 96), (33, 576), (90, 40)],  # 1-4 blocks in a unit's last
)
@pytest.mark.parametrize("num_rows", [1, 5, 16, 17, 20, 33, 130, 300])  # 130: panels prefetched; 1-6 rows in a last tile
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kernel", PACKED_KERNELS)
def test_packed_kernel_equals_reference_on_exact_sums(kernel, out_features, in_features, num_rows, with_bias):
    packed_linear, _ = packed_ops_or_skip(kernel)
    dtype = kernel_dtype(kernel)
    dense_x, weight = exact_operands(num_rows, out_features, in_features, dtype)
    x = torch.zeros(num_rows, in_features + 3, dtype=dtype)[:, 1 : in_features + 1]
    x.copy_(dense_x)  # strided rows: the op only needs each row's features contiguous
    bias = torch.randint(-8, 9, (out_features,)).float() if with_bias else None
    packed = pack(kernel, weight)
    out = torch.full((num_rows, out_features + 5), float("nan"), dtype=dtype)[:, :out_features]
    packed_linear(out, x, packed, bias)
    expected = torch.empty(num_rows, out_features, dtype=dtype)
    getattr(reference, f"{kernel}_linear")(expected, x, packed, bias)
    assert torch.equal(out, expected)
    assert torch.equal(expected, (dense_x.float() @ weight.float().T + (0 if bias is None else bias)).to(dtype))


@pytest.mark.parametrize(  # the last unit of 4 column blocks holds 4, 1, 2 and 3
    "out_features,in_features", [(960, 576), (576, 1536), (49, 1100), (4864, 896), (200, 576), (90, 576), (100, 300)]
)
@pytest.mark.parametrize("kernel", PACKED_KERNELS)
def test_packed_kernel_rows_do_not_depend_on_the_row_count(kernel, out_features, in_features):
    # Random operands: sums round, so this fails if a row's sum ever took another order by row count
    # (oneDNN's AMX matmul changes some rows' bits between 32 and 33 rows).
    packed_linear, _ = packed_ops_or_skip(kernel)
    dtype = kernel_dtype(kernel)
    x, weight = operands(600, out_features, in_features)
    x, packed, bias = x.to(dtype), pack(kernel, weight.to_dense()), torch.randn(out_features)
    full = torch.empty(600, out_features, dtype=dtype)
    packed_linear(full, x, packed, bias)
    expected = torch.empty_like(full)
    getattr(reference, f"{kernel}_linear")(expected, x, packed, bias)
    torch.testing.assert_close(full.float(), expected.float(), rtol=2**-7, atol=2**-7 * expected.abs().max().item())
    for count in (*range(1, 40), 64, 96, 97, 130, 255, 256, 257, 599):
        out = torch.empty(count, out_features, dtype=dtype)
        packed_linear(out, x[-count:], packed, bias)
        assert torch.equal(out, full[-count:]), count


def test_fp32_fma_kernel_sums_as_the_bf16_one_does():
    # Both kernels chain each output's FMAs over the features in order, whatever their tile width
    # (512-bit for fp32 on an AVX-512 build, 256-bit for bf16): on bf16-valued operands their fp32
    # sums are equal. bf16_fma_linear rounds its output, so each row runs with minus the fp32 kernel's
    # row as its bias: equal sums leave exact zeros, any other order a difference that rounds to
    # none of them.
    if not linear.fma_linear_available():
        pytest.skip("the FMA kernels do not run here (no AVX2 + FMA build)")
    x, weight = operands(40, 200, 1100)
    weight = weight.to_dense()
    sums = torch.empty(40, 200)
    ops.fp32_fma_linear(sums, x.float(), ops.fp32_pack_weight(weight.float()), None)
    packed, difference = ops.amx_pack_weight(weight), torch.empty(1, 200, dtype=torch.bfloat16)
    for row in range(40):
        ops.bf16_fma_linear(difference, x[row : row + 1], packed, -sums[row])
        assert torch.count_nonzero(difference) == 0, row


# Messages with the kernel's dtype name and its weight shapes for 4 and 5 column blocks (K = 96).
BAD_PACKED_ARGUMENTS = [
    (lambda a: {**a, "weight": a["weight"][:, :-1]}, r"weight must be a contiguous {name} CPU tensor \[4, {shape}\]"),
    (lambda a: {**a, "weight": a["weight"].double()}, "weight must be a contiguous {name}"),
    (lambda a: {**a, "input": a["input"].double()}, "input must be {name}"),
    (lambda a: {**a, "out": a["out"][:3]}, r"out must be {name} \[4, out_features\]"),
    (lambda a: {**a, "out": a["out"].new_empty(4, 80)}, r"weight must be .*\[5, {shape}\]"),
    (lambda a: {**a, "bias": torch.zeros(65)}, r"bias must be a floating-point CPU tensor \[64\]"),
]


def packed_message(kernel: str, message: str) -> str:
    fp32 = kernel == "fp32_fma"
    return message.format(name="float32" if fp32 else "bfloat16", shape="96, 16" if fp32 else "48, 16, 2")


@pytest.mark.parametrize("change,message", BAD_PACKED_ARGUMENTS)
@pytest.mark.parametrize("kernel", PACKED_KERNELS)
def test_packed_bad_arguments_are_named(kernel, change, message):
    dtype = kernel_dtype(kernel)
    x, weight = exact_operands(4, 64, 96, dtype)
    args = {"out": torch.empty(4, 64, dtype=dtype), "input": x, "weight": pack(kernel, weight), "bias": None}
    with pytest.raises(RuntimeError, match=packed_message(kernel, message)):
        getattr(torch.ops.pagedlm, f"{kernel}_linear")(**change(args))


def test_linear_runs_a_packed_kernel_where_it_can():
    """AMX where it runs; else, where no kernel reproduces oneDNN's sums (AVX2 CPUs, whose oneDNN
    takes no bf16, or oneDNN's own AMX kernels with PAGEDLM_DISABLE_AMX=1), the FMA kernel."""
    layer = Linear(96, 64, bias=True).to(torch.bfloat16)
    layer.process_weights_after_loading()
    if linear.amx_linear_available():
        expected = ops.bf16_amx_linear
    elif layer.k_chunk_ends is not None:
        pytest.skip("bf16 Linear runs ops.bf16_blocked_linear here (oneDNN's sums, reproduced)")
    elif linear.fma_linear_available():
        expected = ops.bf16_fma_linear
    else:
        pytest.skip("a portable build: bf16 Linear runs oneDNN")
    assert layer.packed_linear is expected and layer.weight.shape == (4, 48, 16, 2)


def test_fp32_linear_runs_the_fma_kernel_wherever_it_runs():
    """fp32 runs the FMA kernel on every AVX2 or AVX-512 build (8- or 16-lane FMAs, as oneDNN's); only a
    portable build leaves it to oneDNN."""
    layer = Linear(96, 64, bias=True)
    layer.process_weights_after_loading()
    if linear.fma_linear_available():
        assert layer.packed_linear is ops.fp32_fma_linear and layer.weight.shape == (4, 96, 16)
    else:
        assert layer.packed_linear is None and layer.blocked_layout


ACTS = {"silu": ops.silu_and_mul, "gelu_tanh": ops.gelu_tanh_and_mul}


@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("d,in_features", [(16, 32), (48, 100), (1536, 576), (4864, 896)])
@pytest.mark.parametrize("num_rows", [1, 17, 33, 130, 300])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kernel", PACKED_KERNELS)
def test_packed_act_and_mul_gives_the_bits_of_the_linear_then_the_activation(kernel, activation, d, in_features,
                                                                              num_rows, with_bias):
    # Random operands, so the sums and the activation round: any other order or rounding shows.
    packed_linear, packed_act_and_mul = packed_ops_or_skip(kernel)
    dtype = kernel_dtype(kernel)
    x, weight = operands(num_rows, 2 * d, in_features)
    x = torch.zeros(num_rows, in_features + 3, dtype=dtype)[:, 2:-1].copy_(x)  # strided rows
    weight, bias = weight.to_dense(), torch.randn(2 * d) if with_bias else None
    gate_up = torch.empty(num_rows, 2 * d, dtype=dtype)
    packed_linear(gate_up, x, pack(kernel, weight), bias)
    expected = torch.empty(num_rows, d, dtype=dtype)
    ACTS[activation](expected, gate_up)
    packed = pack(kernel, weight, gate_up=True)
    out = torch.full((num_rows, d + 16), float("nan"), dtype=dtype)[:, 16:]
    packed_act_and_mul(out, x, packed, bias, activation)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "activation": "gelu"}, "activation must be 'silu' or 'gelu_tanh'; got 'gelu'"),
        (lambda a: {**a, "out": a["out"].new_empty(4, 24)}, r"out_features \(d = 24\) must be a multiple of 16"),
        (lambda a: {**a, "out": a["out"].new_empty(4, 16)}, r"weight must be .*\[2, {shape}\]"),
        (lambda a: {**a, "bias": torch.zeros(32)}, r"bias must be a floating-point CPU tensor \[64\]"),
    ],
)
@pytest.mark.parametrize("kernel", PACKED_KERNELS)
def test_packed_act_and_mul_bad_arguments_are_named(kernel, change, message):
    dtype = kernel_dtype(kernel)
    x, weight = exact_operands(4, 64, 96, dtype)
    args = {"out": torch.empty(4, 32, dtype=dtype), "input": x, "weight": pack(kernel, weight, gate_up=True),
            "bias": None, "activation": "silu"}
    with pytest.raises(RuntimeError, match=packed_message(kernel, message)):
        getattr(torch.ops.pagedlm, f"{kernel}_linear_act_and_mul")(**change(args))


@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("d,in_features,chunks", [(64, 32, []), (128, 100, [64]), (320, 64, []), (1536, 576, [512]), (4864, 896, [512])])
@pytest.mark.parametrize("num_rows", [1, 5, 8, 13, 40, 300])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_blocked_act_and_mul_gives_the_bits_of_the_linear_then_the_activation(activation, d, in_features, chunks,
                                                                               num_rows, with_bias):
    # Cancelling operands (see operands), so the sums and the activation round: a wrong order, a
    # misplaced gate or up block, or another rounding shows.
    x, weight = operands(num_rows, 2 * d, in_features)
    x = torch.zeros(num_rows, in_features + 3, dtype=torch.bfloat16)[:, 2:-1].copy_(x)  # strided rows
    bias = torch.randn(2 * d).bfloat16() if with_bias else None
    ends = [*chunks, in_features]
    gate_up = torch.empty(num_rows, 2 * d, dtype=torch.bfloat16)
    kernel_or_skip(gate_up, x, weight, bias, ends)
    expected = torch.empty(num_rows, d, dtype=torch.bfloat16)
    ACTS[activation](expected, gate_up)
    out = torch.full((num_rows, d + 16), float("nan"), dtype=torch.bfloat16)[:, 16:]
    ops.bf16_blocked_linear_act_and_mul(out, x, weight, bias, ends, activation)
    assert torch.equal(out, expected)
    if num_rows <= 8 and in_features <= 100:  # the reference emulates the sums one product at a time
        ref = torch.empty_like(expected)
        reference.bf16_blocked_linear_act_and_mul(ref, x, weight, bias, ends, activation)
        assert torch.equal(ref, expected)


@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("kernel", [*PACKED_KERNELS, "blocked"])
def test_act_and_mul_on_exact_sums(activation, kernel):
    # Small integers: the sums are exact, so gate and up must be the right columns, in the kernels
    # (where they run) and in their references.
    d, in_features = (128 if kernel == "blocked" else 32), 40  # multiples of 64 and of 16
    dtype = torch.bfloat16 if kernel == "blocked" else kernel_dtype(kernel)
    x, weight = exact_operands(5, 2 * d, in_features, dtype)
    bias = torch.randint(-8, 9, (2 * d,)).float()
    gate_up = (x.float() @ weight.float().T + bias).to(dtype)
    gate, up = gate_up[:, :d], gate_up[:, d:]
    act = torch.nn.functional.silu(gate) if activation == "silu" else torch.nn.functional.gelu(gate, approximate="tanh")
    if kernel != "blocked":
        weight_args = (pack(kernel, weight, gate_up=True), bias)
        impls = [getattr(reference, f"{kernel}_linear_act_and_mul")]
        available = linear.amx_linear_available if kernel == "bf16_amx" else linear.fma_linear_available
        if available():
            impls.append(getattr(ops, f"{kernel}_linear_act_and_mul"))
    else:
        onednn_bf16_or_skip()
        weight_args = (torch.ops.mkldnn._reorder_linear_weight(weight, 64), bias, [in_features])
        kernel_or_skip(torch.empty(5, 2 * d, dtype=torch.bfloat16), x, *weight_args)
        impls = [reference.bf16_blocked_linear_act_and_mul, ops.bf16_blocked_linear_act_and_mul]
    for impl in impls:
        out = torch.empty(5, d, dtype=dtype)
        impl(out, x, *weight_args, activation)
        assert torch.equal(out, act * up), impl


@needs_onednn_bf16
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "activation": "gelu"}, "activation must be 'silu' or 'gelu_tanh'; got 'gelu'"),
        (lambda a: {**a, "weight": operands(4, 192, 96)[1]}, r"out_features \(2 \* d = 192\) must be a multiple of 128"),
        (lambda a: {**a, "out": torch.empty(4, 128, dtype=torch.bfloat16)}, r"out must be bfloat16 \[4, 64\]"),
        (lambda a: {**a, "bias": torch.zeros(64)}, r"bias must be a floating-point CPU tensor \[128\]"),
        (lambda a: {**a, "k_chunk_ends": [32, 64]}, "end at in_features = 96"),
        (lambda a: {**a, "weight": torch.zeros(100, 96, dtype=torch.bfloat16)}, "weight must be a bfloat16 MKLDNN"),
    ],
)
def test_blocked_act_and_mul_bad_arguments_are_named(change, message):
    x, weight = operands(4, 128, 96)
    args = {"out": torch.empty(4, 64, dtype=torch.bfloat16), "input": x, "weight": weight, "bias": None,
            "k_chunk_ends": [32, 96], "activation": "silu"}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pagedlm.bf16_blocked_linear_act_and_mul(**change(args))


@pytest.mark.parametrize("pack_gate_up", [ops.amx_pack_gate_up_weight, ops.fp32_pack_gate_up_weight])
def test_gate_up_weight_needs_d_a_multiple_of_16(pack_gate_up):
    with pytest.raises(ValueError, match="d a multiple of 16; got 48 rows"):
        pack_gate_up(torch.zeros(48, 32))


@pytest.mark.parametrize("d", [64, 80, 40])  # fused on both kernels, on AMX only, on neither
@pytest.mark.parametrize("act_fn", [SiluAndMul(), GeluAndMul()], ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gate_up_linear_equals_linear_then_activation(d, act_fn, dtype):
    torch.manual_seed(0)
    layer = GateUpLinear(96, d, bias=True, act_fn=act_fn).to(dtype)
    plain = Linear(96, 2 * d, bias=True).to(dtype)
    plain.load_state_dict({"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()})
    for module in (layer, plain):
        module.process_weights_after_loading()
    assert (layer.packed_act_and_mul is not None) == (d % 16 == 0 and plain.packed_linear is not None)
    assert layer.blocked_act_and_mul == (d % 64 == 0 and layer.k_chunk_ends is not None)
    x = torch.randn(3, 7, 96).to(dtype)
    assert torch.equal(layer(x), act_fn(plain(x).view(21, 2 * d)).view(3, 7, d))


def test_disable_amx_keeps_the_avx512_kernels():
    # Read once per process by the extension: a fresh interpreter with the switch set.
    code = "from pagedlm.model_executor.layers.linear import amx_linear_available; print(amx_linear_available())"
    env = {**os.environ, "PAGEDLM_DISABLE_AMX": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


_ROWS_WITH_AMX_DISABLED = """
import torch
from pagedlm.model_executor.layers.linear import Linear
torch.manual_seed(0)
for in_features, out_features in [(720, 200), (576, 1536)]:
    layer = Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0, 0.2)
    layer.process_weights_after_loading()
    x = torch.randn(300, in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        full = layer(x)
        print([count for count in (1, 2, 16, 32, 33, 64, 97) if not torch.equal(layer(x[:count]), full[:count])])
"""


def test_linear_rows_equal_at_every_row_count_with_amx_disabled():
    """Found by a hunt on an AMX CPU: with PAGEDLM_DISABLE_AMX=1 the bf16 weights went to oneDNN,
    whose own AMX kernels change a row's sums with the row count (3 of 16 rows differed)."""
    env = {**os.environ, "PAGEDLM_DISABLE_AMX": "1"}
    result = subprocess.run([sys.executable, "-c", _ROWS_WITH_AMX_DISABLED], env=env, capture_output=True, text=True,
                            check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "[]"], result.stdout


def test_packed_reference_refuses_the_other_kernels_layout():
    x, weight = exact_operands(4, 64, 96, torch.float32)
    with pytest.raises(ValueError, match="a torch.float32 input takes a torch.float32 weight of 3 dimensions"):
        reference.fp32_fma_linear(torch.empty(4, 64), x, ops.amx_pack_weight(weight), None)
    with pytest.raises(ValueError, match="a torch.bfloat16 input takes a torch.bfloat16 weight of 4 dimensions"):
        reference.bf16_fma_linear(torch.empty(4, 64, dtype=torch.bfloat16), x.bfloat16(), ops.fp32_pack_weight(weight), None)


ARGMAX_KERNELS = [*PACKED_KERNELS, "bf16_blocked"]


def argmax_ops_or_skip(kernel: str, weight: torch.Tensor):
    """A kernel's linear, argmax op and that op's reference over ``weight`` (bf16 ``[out_features,
    in_features]``, dense), each called as ``op(out or token_ids, x, bias)``; a skip where the kernel
    does not run here. The blocked kernel sums in two chunks where in_features > 32 (split at 32)."""
    out_features, in_features = weight.shape
    if kernel == "bf16_blocked":
        onednn_bf16_or_skip()
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        ends = [32, in_features] if in_features > 32 else [in_features]
        kernel_or_skip(torch.empty(1, out_features, dtype=torch.bfloat16), torch.zeros(1, in_features,
                       dtype=torch.bfloat16), blocked, None, ends)
        return tuple(lambda dst, x, bias, op=op: op(dst, x, blocked, bias, ends) for op in (
            ops.bf16_blocked_linear, ops.bf16_blocked_linear_argmax, reference.bf16_blocked_linear_argmax))
    packed_linear, _ = packed_ops_or_skip(kernel)
    packed = pack(kernel, weight)
    argmax, argmax_reference = (getattr(m, f"{kernel}_linear_argmax") for m in (ops, reference))
    return (lambda out, x, bias: packed_linear(out, x, packed, bias),
            *(lambda ids, x, bias, op=op: op(ids, x, packed, bias, out_features) for op in (argmax, argmax_reference)))


def linear_then_argmax(linear_op, x: torch.Tensor, bias, out_features: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    linear_op(out, x, bias)
    return torch.argmax(out.float(), dim=-1)  # the first index of the maximum, or of the first NaN


@pytest.mark.parametrize("out_features,in_features", [(49, 100), (100, 64), (16, 32), (1, 32), (4864, 96), (33, 576)])
@pytest.mark.parametrize("num_rows", [1, 5, 7, 17, 33, 130, 300])  # up to 6 rows, the blocked kernel's two-ended units
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kernel", ARGMAX_KERNELS)
def test_argmax_op_is_the_argmax_of_the_linears_outputs(kernel, out_features, in_features, num_rows, with_bias):
    dtype = kernel_dtype(kernel)
    gen = torch.Generator().manual_seed(out_features * 1000 + num_rows)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).bfloat16()
    weight[out_features // 2 :] = weight[: out_features - out_features // 2].clone()  # equal outputs, columns apart
    x = torch.randn(num_rows, in_features + 3, generator=gen).to(dtype)[:, 1 : in_features + 1]  # strided rows
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    linear_op, argmax_op, _ = argmax_ops_or_skip(kernel, weight)
    token_ids = torch.full((num_rows,), -1, dtype=torch.int64)
    argmax_op(token_ids, x, bias)
    assert torch.equal(token_ids, linear_then_argmax(linear_op, x, bias, out_features))
    exact_x, exact_weight = exact_operands(num_rows, out_features, in_features, dtype)
    _, argmax_op, argmax_reference = argmax_ops_or_skip(kernel, exact_weight)
    expected = torch.empty(num_rows, dtype=torch.int64)
    argmax_reference(expected, exact_x, bias)
    argmax_op(token_ids, exact_x, bias)
    assert torch.equal(token_ids, expected)


@pytest.mark.parametrize("kernel", ARGMAX_KERNELS)
def test_argmax_op_takes_torch_argmaxs_token_at_ties_nans_and_infinities(kernel):
    vocab = 5000  # spread over both threads' columns
    x = torch.randn(3, 64).to(kernel_dtype(kernel))
    weight = (torch.randn(1, 64) * 0.05).bfloat16().expand(vocab, 64).contiguous()  # every logit equal
    cases = {
        "ties": None,
        "nan": torch.zeros(vocab).index_fill_(0, torch.tensor([4321, 37, 4000]), float("nan")),
        "all -inf": torch.full((vocab,), float("-inf")),
        "+inf twice": torch.zeros(vocab).index_fill_(0, torch.tensor([4990, 2600]), float("inf")),
        "nan in the last, partial block": torch.zeros(vocab).index_fill_(0, torch.tensor([4998]), float("nan")),
        # The blocked kernel's caller takes column blocks from the back at few rows: it sees 4990 first.
        "max twice in the last blocks": torch.zeros(vocab).index_fill_(0, torch.tensor([4990, 4900]), 100.0),
        "max in both halves": torch.zeros(vocab).index_fill_(0, torch.tensor([4999, 1]), 100.0),
    }
    for name, bias in cases.items():
        n = vocab - 1 if "partial" in name else vocab  # 4,999: the last column block holds 7 (blocked: 7 of 64)
        bias = None if bias is None else bias[:n]
        linear_op, argmax_op, _ = argmax_ops_or_skip(kernel, weight[:n])
        token_ids = torch.empty(3, dtype=torch.int64)
        argmax_op(token_ids, x, bias)
        assert torch.equal(token_ids, linear_then_argmax(linear_op, x, bias, n)), name
    assert token_ids.tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "token_ids": torch.empty(4, dtype=torch.int32)}, r"token_ids must be a contiguous int64 CPU tensor \[4\]"),
        (lambda a: {**a, "token_ids": torch.empty(5, dtype=torch.int64)}, r"token_ids must be a contiguous int64 CPU tensor \[4\]"),
        (lambda a: {**a, "out_features": 80}, r"weight must be a contiguous {name} CPU tensor \[5, {shape}\]"),
        (lambda a: {**a, "out_features": 0}, "out_features must be positive; got 0"),
        (lambda a: {**a, "input": a["input"].to(torch.float16)}, r"input must be {name} \[rows, in_features\]"),
        (lambda a: {**a, "bias": torch.zeros(65)}, r"bias must be a floating-point CPU tensor \[64\]"),
    ],
)
@pytest.mark.parametrize("kernel", PACKED_KERNELS)
def test_packed_argmax_bad_arguments_are_named(kernel, change, message):
    x, weight = exact_operands(4, 64, 96, kernel_dtype(kernel))
    args = {"token_ids": torch.empty(4, dtype=torch.int64), "input": x, "weight": pack(kernel, weight),
            "bias": None, "out_features": 64}
    with pytest.raises(RuntimeError, match=f"{kernel}_linear_argmax: " + packed_message(kernel, message)):
        getattr(torch.ops.pagedlm, f"{kernel}_linear_argmax")(**change(args))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "token_ids": torch.empty(4, dtype=torch.int32)}, r"token_ids must be a contiguous int64 CPU tensor \[4\]"),
        (lambda a: {**a, "token_ids": torch.empty(8, dtype=torch.int64)[::2]}, "token_ids must be a contiguous int64"),
        (lambda a: {**a, "k_chunk_ends": [32, 64]}, "k_chunk_ends must end at in_features = 96"),
        (lambda a: {**a, "weight": torch.zeros(64, 96, dtype=torch.bfloat16)}, "weight must be a bfloat16 MKLDNN tensor"),
        (lambda a: {**a, "bias": torch.zeros(65)}, r"bias must be a floating-point CPU tensor \[64\]"),
    ],
)
def test_blocked_argmax_bad_arguments_are_named(change, message):
    x, weight = operands(4, 64, 96)
    args = {"token_ids": torch.empty(4, dtype=torch.int64), "input": x, "weight": weight, "bias": None,
            "k_chunk_ends": [32, 96]}
    with pytest.raises(RuntimeError, match="bf16_blocked_linear_argmax: " + message):
        torch.ops.pagedlm.bf16_blocked_linear_argmax(**change(args))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_plain_greedy_step_takes_its_tokens_from_the_lm_head_without_the_logits(llama_dir, monkeypatch, dtype):
    from pagedlm import LLM, SamplingParams

    llm = LLM(llama_dir, dtype=dtype)
    model = llm.llm_engine.model_runner.model
    prompts = ["a b c", "d e f g h", "i"] * 3
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    calls = []
    fused = model.lm_head.argmax
    monkeypatch.setattr(model.lm_head, "argmax", lambda x: (tokens := fused(x)) is not None and calls.append(1) or tokens)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert bool(calls) == model.lm_head.runs_own_kernel
    monkeypatch.setattr(model, "greedy_tokens", lambda hidden: None)  # the logits, then the sampler's argmax
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == got


def test_a_model_whose_logits_are_not_the_lm_heads_outputs_takes_no_greedy_shortcut(llama_dir):
    from pagedlm import LLM
    from pagedlm.model_executor.models.llama import LlamaForCausalLM

    model = LLM(llama_dir, dtype="bfloat16").llm_engine.model_runner.model
    hidden = torch.zeros(2, model.lm_head.in_features, dtype=torch.bfloat16)
    assert (model.greedy_tokens(hidden) is not None) == model.lm_head.runs_own_kernel

    class Capped(LlamaForCausalLM):  # a future model that changes its logits but says nothing of greedy_tokens
        def compute_logits(self, hidden_states):
            return super().compute_logits(hidden_states) * 0.5

    model.__class__ = Capped
    assert model.greedy_tokens(hidden) is None
    model.__class__ = LlamaForCausalLM
    model.logits_scaling = 2.0  # Granite's
    assert model.greedy_tokens(hidden) is None


def test_gemma_takes_the_greedy_shortcut_only_where_its_logits_are_the_lm_heads_outputs(tmp_path, tokenizer_dir):
    from conftest import make_checkpoint

    from pagedlm import LLM
    from pagedlm.model_executor.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM

    model = LLM(make_checkpoint(str(tmp_path), "gemma3", tokenizer_dir), dtype="bfloat16").llm_engine.model_runner.model
    hidden = torch.zeros(2, model.lm_head.in_features, dtype=torch.bfloat16)
    assert type(model) is Gemma3ForCausalLM and not model.final_logit_softcapping
    assert (model.greedy_tokens(hidden) is not None) == model.lm_head.runs_own_kernel
    model.final_logit_softcapping = 30.0
    assert model.greedy_tokens(hidden) is None
    model.final_logit_softcapping = None

    class Scaled(Gemma2ForCausalLM):  # a future Gemma that changes its logits but says nothing of greedy_tokens
        def compute_logits(self, hidden_states):
            return super().compute_logits(hidden_states) * 0.5

    model.__class__ = Scaled
    assert model.greedy_tokens(hidden) is None
