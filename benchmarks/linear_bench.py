"""bf16 or fp32 linears of a model's shape: oneDNN's matmul (torch's where oneDNN has no bf16) against
pagedlm's kernel, per row count.

Every linear of one forward pass (each layer's qkv, o, gate_up and down, then the LM head), each
with its own random weight, so the weights come from memory as in a decode step. Per row count,
interleaved: the fastest of ``--rounds`` passes through oneDNN (``torch.ops.mkldnn._linear_pointwise``
on its blocked layout, one row run as two as ``Linear`` does without a kernel of ours; on a CPU whose
oneDNN has no bf16, AVX2, torch's ``F.linear`` instead) and through the kernel ``Linear`` runs here:
``ops.bf16_amx_linear`` on packed weights where AMX is usable, ``ops.bf16_fma_linear`` on them where
oneDNN has no bf16, else ``ops.bf16_blocked_linear`` on oneDNN's layout and the chunk ends
``onednn_order`` finds; in fp32 (``--dtype float32``), ``ops.fp32_fma_linear`` on
``fp32_pack_weight``'s layout against oneDNN's fp32 matmul. The table gives
both times, the weight bytes per second (against one read of the weights at the copy bandwidth,
measured in the same run), GFLOP/s, the ratio, and other processes' CPU (cores) meanwhile.

    python benchmarks/linear_bench.py --model-shape smollm2 --rows 1,2,8,16,64,128,256
    python benchmarks/linear_bench.py --dtype float32 --rows 1,8,64,256,2048
"""

import argparse
import time

# Before torch: pagedlm sets OMP_WAIT_POLICY=passive as the engine runs with. Otherwise libgomp's
# threads spin after each oneDNN pass and take a core from the kernel's pool in the pass after it.
from pagedlm import default_model_path, ops
import torch
from transformers import AutoConfig

from jobs import Load
from kernel_bench import copy_bandwidth
from pagedlm.model_executor.layers import linear, onednn_order
from throughput import MODEL_SHAPES


def linear_shapes(name: str) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear of one forward pass: "smollm2" is the default
    model's config, the others ``throughput.py``'s random-weight shapes."""
    c = AutoConfig.from_pretrained(default_model_path()).to_dict() if name == "smollm2" else MODEL_SHAPES[name]
    hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_size = hidden // heads
    layer = [
        ((heads + 2 * kv_heads) * head_size, hidden),
        (hidden, heads * head_size),
        (2 * c["intermediate_size"], hidden),
        (hidden, c["intermediate_size"]),
    ]
    return layer * c["num_hidden_layers"] + [(c["vocab_size"], hidden)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-shape", default="smollm2", choices=["smollm2", *MODEL_SHAPES])
    parser.add_argument("--rows", default="1,2,8,16,64,128,256", help="comma-separated row counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()

    shapes = linear_shapes(args.model_shape)
    dtype = getattr(torch, args.dtype)
    fp32 = dtype == torch.float32
    onednn_takes_dtype = fp32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dense = [(torch.randn(n, k) * 0.05).to(dtype) for n, k in shapes]
    weights = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in dense] if onednn_takes_dtype else dense
    amx = linear.amx_linear_available()
    if fp32 or amx or not onednn_takes_dtype:
        kernel = "fp32_fma_linear" if fp32 else "bf16_amx_linear" if amx else "bf16_fma_linear"
        pack = ops.fp32_pack_weight if fp32 else ops.amx_pack_weight
        ends, ours = {k: None for _, k in shapes}, [pack(w) for w in dense]
    else:
        kernel, ends, ours = "bf16_blocked_linear", {k: onednn_order.k_chunk_ends(k, 64) for _, k in shapes}, weights
    del dense
    baseline = "oneDNN" if onednn_takes_dtype else "torch"
    weight_bytes = sum(dtype.itemsize * n * k for n, k in shapes)
    bandwidth = copy_bandwidth(torch.device("cpu"), iters=5)
    print(f"{args.model_shape}: {len(shapes)} {args.dtype} linears, {weight_bytes / 1e6:.0f} MB of weights, "
          f"{torch.get_num_threads()} threads; copy bandwidth (1 GiB copy_, read + write) {bandwidth / 1e9:.1f} GB/s "
          f"= one weight read in {1e3 * weight_bytes / bandwidth:.2f} ms; pagedlm runs ops.{kernel}"
          + (f" (K chunk ends {ends})" if kernel == "bf16_blocked_linear" else "")
          + ("" if onednn_takes_dtype else "; oneDNN has no bf16 here, so the baseline is torch's F.linear"))
    header = (f"{'rows':>5} {baseline + ' ms':>10} {'GB/s':>6} {'GFLOP/s':>8} {'pagedlm ms':>11} {'GB/s':>6} "
              f"{'GFLOP/s':>8} {baseline + '/pagedlm':>15} {'others':>7}")
    print(header)
    print("-" * len(header))
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(rows, k).to(dtype) for k in ends}
        outputs = [torch.empty(rows, n, dtype=dtype) for n, _ in shapes]

        def onednn() -> None:
            for (_, k), w in zip(shapes, weights):
                if not onednn_takes_dtype:
                    torch.nn.functional.linear(inputs[k], w)
                    continue
                x = inputs[k] if rows > 1 else inputs[k].expand(2, -1)
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

        def pagedlm() -> None:
            for (_, k), w, out in zip(shapes, ours, outputs):
                if ends[k] is None:
                    getattr(ops, kernel)(out, inputs[k], w, None)
                else:
                    ops.bf16_blocked_linear(out, inputs[k], w, None, ends[k])

        best = {onednn: float("inf"), pagedlm: float("inf")}
        with Load() as load:
            for _ in range(args.rounds):
                for fn in best:
                    start = time.perf_counter()
                    fn()
                    best[fn] = min(best[fn], time.perf_counter() - start)
        flops = 2 * rows * weight_bytes / dtype.itemsize
        a, b = best[onednn], best[pagedlm]
        print(f"{rows:5d} {1e3 * a:10.2f} {weight_bytes / a / 1e9:6.1f} {flops / a / 1e9:8.0f} {1e3 * b:11.2f} "
              f"{weight_bytes / b / 1e9:6.1f} {flops / b / 1e9:8.0f} {a / b:14.2f}x {load.others:7.2f}")


if __name__ == "__main__":
    main()
