"""Model ops: one interface; on each device the C++/CUDA kernels of ``pagedlm._C`` or the torch reference.

KV-cache layout contract (every kernel, the reference and ``CacheEngine`` follow it):

* Per layer, one key cache and one value cache, each a contiguous tensor of shape
  ``[num_blocks, num_kv_heads, block_size, head_size]`` in the model's dtype, or fp8
  (``torch.float8_e4m3fn`` or ``torch.float8_e5m2``). An fp8 entry is ``x / k_scale`` (keys) or
  ``x / v_scale`` (values) saturated at the format's largest finite value and rounded to nearest
  even; its value is ``entry * scale`` (vLLM's convention). Every cache op takes ``k_scale`` and
  ``v_scale`` (floats, default 1.0, positive and finite; they must be 1.0 for a cache in the model's
  dtype).
* Token ``t`` of a sequence lives in physical block ``block_table[t // block_size]`` at offset
  ``t % block_size``. Its *slot* is ``block * block_size + offset``; ``slot_mapping`` gives the slot
  of every token of a step, and a negative slot means "do not write".
* ``block_tables`` is ``int32 [num_seqs, max_blocks_per_seq]``; entries past a sequence's last block
  are padding and never read. ``seq_lens`` is ``int32 [num_seqs]``, the number of cached tokens
  (including the ones written this step). Slots past ``seq_lens`` in the last block are stale and
  may hold anything, NaN included; no op reads them into a result.
* Queries, keys and values of a step are ``[num_tokens, num_heads, head_size]`` (keys and values
  with ``num_kv_heads``); head ``h`` reads KV head ``h // (num_heads // num_kv_heads)`` (GQA/MQA).

Ops:

* ``reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale=1.0, v_scale=1.0)``;
  ``slot_mapping`` is ``int64 [num_tokens]`` (int32 is accepted).
* ``paged_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
  sliding_window=0, logits_soft_cap=0.0, k_scale=1.0, v_scale=1.0)``: decode, one query per
  sequence, at position ``seq_lens[b] - 1``.
* ``paged_prefill_attention(out, query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens,
  scale, sliding_window=0, logits_soft_cap=0.0, k_scale=1.0, v_scale=1.0)``: causal varlen
  attention; the query rows of
  sequence ``b`` are its last ``cu_seqlens_q[b+1] - cu_seqlens_q[b]`` tokens, attending over its
  first ``seq_lens[b]``. ``cu_seqlens_q`` is ``int32 [num_seqs + 1]``.
* Both attention ops: the logits are ``scale * q·k`` (the model's softmax scale, e.g.
  ``head_size ** -0.5`` or Gemma's ``query_pre_attn_scalar ** -0.5``); with ``logits_soft_cap > 0``
  they become ``cap * tanh(logits / cap)`` before the mask (Gemma 2). With ``sliding_window = W > 0`` a
  query at position ``i`` sees only the keys at positions ``i - W + 1 .. i`` (Mistral's and
  transformers' convention; flash-attention's ``window_size=(W - 1, 0)``), and the kernels read no
  block before the window: slots there may hold anything, as stale slots may.
* ``copy_blocks(key_caches, value_caches, block_mapping)``: copies whole blocks within each cache
  by ``int64 [n, 2]`` (src, dst) pairs; lists with one key and one value cache per layer, every
  layer in one call.
* ``gather_rows(out, input, index)``: ``out[i] = input[index[i]]`` (``torch.index_select`` along
  dim 0) for an ``int64 [n]`` index, each entry checked to lie in ``[0, num_rows)``; the embedding
  lookup and the rows that get logits. On CPU it runs on the kernels' threads, so a step opens no
  OpenMP region of torch's.

Fused layer ops (in place or into ``out``; rows are ``[num_tokens, ...]`` and may be strided views,
last dimension contiguous). Each rounds its intermediates to the model dtype exactly where Hugging
Face's eager code does, so results match transformers bit for bit up to fp32 summation order:

* ``rms_norm(out, input, weight, epsilon)`` and ``fused_add_rms_norm(input, residual, weight,
  epsilon)``: ``residual += input``, then ``input = rms_norm(residual)``. ``rms_norm`` and
  ``gemma_rms_norm`` also take ``[num_tokens, num_heads, head_size]`` (q or k normalised per head,
  views into a fused QKV buffer; strided in their first two dimensions).
* ``rotary_embedding(positions, query, key, cos_sin_cache)``: rotate-half rotary embedding of
  ``query`` and ``key`` in place; ``cos_sin_cache`` is ``[max_position, head_size]`` in the model
  dtype, each row the cos values of the ``head_size / 2`` frequencies followed by their sin values;
  ``positions`` is ``int64 [num_tokens]``. A float32 ``cos_sin_cache`` with half-precision
  ``query`` and ``key`` rotates in fp32 and rounds once (OLMo 2/3's transformers code).
* ``silu_and_mul(out, input)``: ``out = silu(input[:, :d]) * input[:, d:]``.
* ``gelu_tanh_and_mul(out, input)``: ``out = gelu_tanh(input[:, :d]) * input[:, d:]``, GELU's tanh
  approximation (transformers' ``gelu_pytorch_tanh``, Gemma's GeGLU).
* ``gemma_rms_norm(out, input, weight, epsilon)`` and ``gemma_fused_add_rms_norm(input, residual,
  weight, epsilon)``: Gemma's RMSNorm, ``x / rms(x) * (1 + weight)`` with the product taken in fp32
  and rounded once (Llama's rounds the normalised ``x`` before multiplying by ``weight``).
* ``olmo_rms_norm(out, input, weight, epsilon)`` and ``olmo_rms_norm_add(input, residual, weight,
  epsilon)``: OLMo 2's RMSNorm, ``x / rms(x) * weight`` with the product taken in fp32 and rounded
  once; ``olmo_rms_norm_add`` normalises ``input`` [num_tokens, hidden] in place, then
  ``residual += input`` (its layers normalise what attention and the MLP add to the residual).
  ``olmo_rms_norm`` takes rows as ``rms_norm`` does (strided: q or k of a fused QKV buffer,
  normalised over all their heads). No CUDA kernels: the reference runs there.

Scalings (in place on a contiguous ``x`` in float32, bfloat16 or float16; each step computed in fp32 and
rounded to ``x``'s dtype, as eager torch's ops with a Python float do; on CPU on the kernels' threads,
so a bf16 step opens no OpenMP region for them):

* ``scale(x, factor, divide=False)``: ``x = x * factor``, or ``x / factor`` (a true division, not a
  product with ``1 / factor``), for a finite nonzero ``factor``: Granite's embedding and residual
  multipliers and its logits scaling, Gemma's embedding normaliser.
* ``soft_cap(x, cap)``: ``x = tanh(x / cap) * cap`` for a finite ``cap > 0``, rounded after the
  division, the tanh and the product (transformers' Gemma 2 final-logit soft-capping). In bfloat16
  and float16 the CPU kernel's tanh is ATen's vectorised one (Sleef), as eager torch's is for those
  dtypes; a float32 ``x`` goes through ATen's own ops (their fp32 tanh is MKL's, whose last bits
  Sleef's do not match), which open OpenMP regions.
* ``position_scale(x, positions, scales)``: ``x[t] = x[t] * scales[positions[t]]`` for ``x``
  ``[num_tokens, num_heads, head_size]`` (rows strided, as q in a fused QKV buffer), ``positions``
  int64 ``[num_tokens]`` and ``scales`` a ``[max_position]`` table in ``x``'s dtype (Ministral 3's
  attention temperature on q). No CUDA kernel: the reference runs there.

Sampling op:

* ``argmax_logprob(logits, token_ids, logprobs)``: for each row of ``logits`` ``[num_rows, vocab]``
  (any float dtype), the first index of its maximum into ``token_ids`` (int64) and that token's
  log-probability under a softmax in fp32 into ``logprobs`` (float32): greedy sampling in one read
  of the logits. A row with no softmax (a NaN, or an infinite maximum) gets NaN, as in
  ``top_logprobs`` and ``sample``, and the index ``torch.argmax`` gives (a NaN counts above every
  number: a row holding one takes its first NaN).
* ``argmax(logits, token_ids)``: ``argmax_logprob``'s token alone, for greedy rows whose
  log-probability nobody reads: one pass over the logits for the maximum instead of two with the
  exp of the log-sum (2 ms of a 57 ms SmolLM2 step at 128 rows).
* ``top_logprobs(logits, token_ids, logprobs, ranks, top_logprobs, top_ids)``: for each row of
  ``logits`` ``[num_rows, vocab]`` (any float dtype) and its ``token_ids[r]`` (int64, in
  ``[0, vocab)``): the token's log-probability ``(x[t] - max) + -log(sum(exp(x - max)))`` in fp32
  into ``logprobs`` (``argmax_logprob``'s and ``sample``'s formula, so the same bits), its rank
  (how many entries' log-probabilities, by that formula, are at least its own: vLLM's count, so a
  token tied with others ranks last of them) into ``ranks`` (int64), and
  the ``k = top_logprobs.shape[1]`` largest log-probabilities, largest first and ties in token
  order, into ``top_logprobs`` (float32 ``[num_rows, k]``) with their ids in ``top_ids`` (int64).
  One pass over the logits after the two of the log-sum; no log-softmax is stored. A row with no
  softmax (a NaN, or an infinite maximum) gets NaN log-probabilities, rank 1 and ids ``0 .. k - 1``.
* ``sample(logits, temperatures, top_ks, top_ps, min_ps, uniforms, token_ids, logprobs=None)``: one token
  per row, with per-row float32 ``temperatures`` (0 = greedy: the first maximum, ``argmax_logprob``'s
  token; also taken for a row with no softmax; a row whose maximum overflows float32 once divided
  by ``t`` has ``p`` 1 at its maximum's tokens and 0 elsewhere, as the limit is), int64 ``top_ks`` (>= 1; >= vocab = off), float32 ``top_ps`` (in
  (0, 1]; 1 = off), ``min_ps`` (in [0, 1]; 0 = off) and ``uniforms`` in [0, 1).
  With ``p = exp(x / t - max(x / t))``, the kept tokens are those with ``p`` at or above a threshold:
  the ``top_k``-th largest ``p``; then, over those, the ``p`` at which their descending cumulative
  mass first reaches ``top_p`` of their total; then ``min_p`` (Hugging Face's warper order; ties
  at a threshold are kept). The token is the first, in token order, at which the cumulative ``p``
  of the kept tokens exceeds ``uniform`` times their total (inverse CDF). ``logprobs``, if given,
  gets its log-probability under the softmax of the untempered logits; without it the CPU kernel
  skips the exp pass of that log-sum. CPU kernel and reference; on CUDA
  the reference runs.
* ``apply_token_bitmask(logits, rows, bitmask)``: in place, ``logits[rows[i], t] = -inf`` for every
  token ``t`` that bit ``t % 32`` of word ``t // 32`` of ``bitmask[i]`` leaves out (xgrammar's token
  bitmask: int32 ``[len(rows), at least ceil(vocab / 32)]``, words past the vocabulary unread; ``rows`` int64, each in ``[0, num_rows)``);
  ``logits`` ``[num_rows, vocab]`` in any float dtype. CPU kernel and reference; on CUDA the
  reference runs.

Linear ops (CPU, bfloat16):

* ``bf16_blocked_linear(out, input, weight, bias, k_chunk_ends)``: ``out = input @ weight.T + bias``
  for ``input`` bf16 ``[rows, in_features]`` (rows may be strided, features contiguous), ``weight`` the
  bf16 MKLDNN tensor ``torch.ops.mkldnn._reorder_linear_weight`` returns in oneDNN's AB16b64a2b layout
  (blocks of 64 output by 32 input features, zero-padded), ``bias`` ``[out_features]`` (any floating
  dtype, on the CPU) or None, ``out`` bf16 ``[rows, out_features]``. The sums follow oneDNN's brgemm order:
  ``k_chunk_ends`` (increasing, even except the last, which is ``in_features``) splits the features
  into chunks; each chunk is one fp32 chain over its feature pairs ``(2p, 2p + 1)``, the odd
  feature's exact product added first (one ``vdpbf16ps`` step); the chunk sums are added left to
  right, then the bias, and the total rounded to bf16. The CPU kernel needs an AVX512-BF16 build
  (it raises otherwise) and flushes subnormal running sums within a chain as ``vdpbf16ps`` does;
  the reference does not, and its NaNs may have other bit patterns. The kernel checks the weight's
  size, not its layout: an MKLDNN tensor in another layout of the same size gives wrong sums.
  ``pagedlm.model_executor.layers.onednn_order`` finds oneDNN's chunks for a weight.
* ``bf16_blocked_linear_act_and_mul(out, input, weight, bias, k_chunk_ends, activation)``: a gated
  MLP's gate_up projection and its activation in one pass, ``out = act(gate) * up`` for ``weight`` the
  blocked layout (as ``bf16_blocked_linear``'s) of a ``[2 * d, in_features]`` gate_up weight ``[Wg; Wu]``
  with ``d`` a multiple of 64, ``bias`` ``[2 * d]`` in the same gate, up order or None, ``out`` bf16
  ``[rows, d]``, ``activation`` ``"silu"`` or ``"gelu_tanh"``. Gate and up are summed and rounded as
  ``bf16_blocked_linear`` does, then combined as ``silu_and_mul`` / ``gelu_tanh_and_mul`` do: the
  bits of those two ops; the ``[rows, 2 * d]`` projection is never stored. Same requirements as
  ``bf16_blocked_linear``.
* ``bf16_blocked_linear_argmax(token_ids, input, weight, bias, k_chunk_ends)``: an LM head's greedy
  tokens without its logits: ``token_ids`` int64 ``[rows]`` gets each row's ``argmax`` (the first
  index of the maximum, or of the first NaN) over the bf16 ``[rows, out_features]`` that
  ``bf16_blocked_linear`` would write with the same arguments, from the same sums rounded the same
  way; the logits are never stored nor read back. Same requirements as ``bf16_blocked_linear``.
* ``bf16_amx_linear(out, input, weight, bias)``: ``out = input @ W.T + bias`` for ``input`` bf16
  ``[rows, in_features]`` (rows may be strided, features contiguous), ``weight`` = ``amx_pack_weight(W)``
  of a ``[out_features, in_features]`` weight (bf16 ``[ceil(out / 16), ceil(in / 32) * 16, 16, 2]``:
  per 16 output columns and per pair of input features, the columns' two weights, zero-padded),
  ``bias`` ``[out_features]`` (any floating dtype, on the CPU) or None, ``out`` bf16
  ``[rows, out_features]``. Each output is an fp32 sum over the 32-feature blocks of ``in_features``
  in order, one AMX ``tdpbf16ps`` per block (whose internal order the hardware defines), then the
  bias, rounded to bf16 once; a row's sums read no other row, so its bits do not depend on the
  number of rows. The CPU kernel needs an AMX-BF16 build and a CPU and kernel that grant AMX (it
  raises otherwise); the reference sums in fp32 in torch's order, so the two agree to fp32 rounding.
* ``bf16_amx_linear_act_and_mul(out, input, weight, bias, activation)``: a gated MLP's gate_up
  projection and its activation in one pass, ``out = act(input @ Wg.T + bg) * (input @ Wu.T + bu)``
  for ``weight`` = ``amx_pack_gate_up_weight(W)`` of a ``[2 * d, in_features]`` gate_up weight
  ``W = [Wg; Wu]`` (``d`` a multiple of 16), ``bias`` ``[2 * d]`` in the same gate, up order or None,
  ``out`` bf16 ``[rows, d]``, ``activation`` ``"silu"`` or ``"gelu_tanh"``. Gate and up are summed
  and rounded as ``bf16_amx_linear`` does, then combined as ``silu_and_mul`` / ``gelu_tanh_and_mul``
  do, so the CPU kernel's bits are those two ops' bits; the [rows, 2 * d] projection is never
  stored. Same requirements as ``bf16_amx_linear``.
* ``bf16_amx_linear_argmax(token_ids, input, weight, bias, out_features)``: an LM head's greedy
  tokens without its logits: ``token_ids`` int64 ``[rows]`` gets each row's ``argmax`` (the first
  index of the maximum, or of the first NaN) over the bf16 ``[rows, out_features]`` that
  ``bf16_amx_linear`` would write for ``weight`` = ``amx_pack_weight(W)`` of an ``[out_features,
  in_features]`` weight, from the same sums rounded the same way, so the tokens are those two ops';
  the logits are never stored nor read back. Same requirements as ``bf16_amx_linear``.
* ``bf16_fma_linear(out, input, weight, bias)`` and ``bf16_fma_linear_act_and_mul(out, input, weight,
  bias, activation)``: the two ops above, same arguments and packed weights, for CPUs without bf16
  dot products (AVX2). Each output is one fp32 chain of FMAs over the features in order (the weights
  widened from bf16 exactly), then the bias, rounded to bf16 once; a row's bits do not depend on the
  number of rows. The CPU kernel needs an AVX2 + FMA build (it raises otherwise); the reference sums
  in fp32 in torch's order, so the two agree to fp32 rounding.
* ``bf16_fma_linear_argmax(token_ids, input, weight, bias, out_features)`` and
  ``fp32_fma_linear_argmax(...)``: ``bf16_amx_linear_argmax`` for the FMA kernels (bf16 and fp32
  ``input``, their packed weights): each row's ``argmax`` over the outputs ``bf16_fma_linear`` /
  ``fp32_fma_linear`` would write, without writing them.

Linear ops (CPU, float32):

* ``fp32_fma_linear(out, input, weight, bias)`` and ``fp32_fma_linear_act_and_mul(out, input, weight,
  bias, activation)``: the two ops above for float32 ``input`` and ``out``, with ``weight`` =
  ``fp32_pack_weight(W)`` (fp32 ``[ceil(out / 16), in, 16]``: per 16 output columns and per input
  feature, the columns' weights, zero-padded) or ``fp32_pack_gate_up_weight(W)`` (the gate_up row
  order of ``amx_pack_gate_up_weight``). Each output is one fp32 chain of FMAs over the features in
  order, then the bias; a row's bits do not depend on the number of rows. Same requirements and
  reference as the bf16 FMA ops.

The extension kernels (``pagedlm._C``, registered as ``torch.ops.pagedlm.*``) also require:
query, out, keys and values share one dtype (float32, bfloat16 or float16), and the caches hold it
or fp8; the last
dimension of query/out/key/value is contiguous (they may be views into a fused QKV buffer);
attention tensors live on one device. The CPU kernels take any ``head_size`` (multiples of the
vector width, 16 floats with AVX-512, run without a partial last vector); the CUDA kernels need
``head_size <= 256`` with ``head_size`` times the cache's element size a multiple of 16 bytes (they
read K/V rows as 16-byte vectors).

Backends: when the extension is loaded (``EXTENSION_LOADED``), the ops are ``torch.ops.pagedlm.*``
and dispatch picks the kernels by the tensors' device. ``backend_for(device)`` says which: "cpu"
for CPU tensors; "cuda" for CUDA tensors when the extension was built with CUDA, else
"torch-reference" (the reference is registered for CUDA then, as it always is for the ops with
no CUDA kernel: ``gather_rows``, ``scale``, ``soft_cap``, ``top_logprobs``, ``sample``,
``apply_token_bitmask`` and the CPU-only linears; with the CUDA kernels ``top_logprobs`` and
``sample`` take ``argmax_logprob``'s log-sum there, and ``sample`` runs in calls of one row count,
so that a row's bits do not depend on the batch: ``pagedlm/ops/sampling.py``).
Without the extension, or with ``PAGEDLM_OPS_BACKEND=torch-reference``, every op is the pure-torch
reference on every device. On a CPU with AMX, ``PAGEDLM_DISABLE_AMX=1`` keeps the AVX-512 kernels
(``0``, the default, lets the linears and attention run on AMX tiles).
"""

import os
import sys
import warnings
from types import SimpleNamespace

import torch

from pagedlm.ops import reference
from pagedlm.ops import sampling

_OP_NAMES = (
    "reshape_and_cache",
    "paged_attention",
    "paged_prefill_attention",
    "copy_blocks",
    "gather_rows",
    "rms_norm",
    "fused_add_rms_norm",
    "gemma_rms_norm",
    "gemma_fused_add_rms_norm",
    "olmo_rms_norm",
    "olmo_rms_norm_add",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_tanh_and_mul",
    "scale",
    "soft_cap",
    "position_scale",
    "argmax_logprob",
    "argmax",
    "top_logprobs",
    "sample",
    "apply_token_bitmask",
    "bf16_blocked_linear",
    "bf16_blocked_linear_act_and_mul",
    "bf16_blocked_linear_argmax",
    "bf16_amx_linear",
    "bf16_amx_linear_act_and_mul",
    "bf16_amx_linear_argmax",
    "bf16_fma_linear",
    "bf16_fma_linear_act_and_mul",
    "fp32_fma_linear",
    "fp32_fma_linear_act_and_mul",
    "bf16_fma_linear_argmax",
    "fp32_fma_linear_argmax",
)
_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler; nvcc for CUDA)"


def _load_extension() -> bool:
    if "PAGEDLM_ATTENTION_BACKEND" in os.environ:
        raise ValueError(
            "PAGEDLM_ATTENTION_BACKEND was renamed to PAGEDLM_OPS_BACKEND (it selects the backend of every op, "
            "not just attention); set that instead"
        )
    requested = os.environ.get("PAGEDLM_OPS_BACKEND", "")
    if requested == "torch-reference":
        return False
    if requested:
        raise ValueError(f"PAGEDLM_OPS_BACKEND={requested!r}: the only accepted value is 'torch-reference'")
    # Read by the extension (csrc/cpu/amx.h), which takes "1" as off and anything else as on.
    disable_amx = os.environ.get("PAGEDLM_DISABLE_AMX")
    if disable_amx not in (None, "0", "1"):
        raise ValueError(f"PAGEDLM_DISABLE_AMX={disable_amx!r}: the accepted values are '0' and '1'")
    try:
        import pagedlm._C  # noqa: F401  (registers torch.ops.pagedlm.*)
    except ImportError as exc:
        warnings.warn(
            f"pagedlm._C could not be loaded ({exc}); pagedlm ops fall back to the slow torch "
            f"reference, whose results depend on the batch. To use the C++/CUDA kernels, {_BUILD_HINT}.",
            stacklevel=3,
        )
        return False
    return True


EXTENSION_LOADED = _load_extension()
_CUDA_KERNELS = EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
    "pagedlm::paged_attention", "CUDA"
)

if EXTENSION_LOADED and torch.cuda.is_available():
    if not _CUDA_KERNELS:
        warnings.warn(
            f"pagedlm._C was built without CUDA kernels; ops on CUDA tensors use the torch reference. To get "
            f"them, {_BUILD_HINT} with CUDA_HOME set.",
            stacklevel=2,
        )
    # Ops without a CUDA kernel (all of them in a CPU-only build; always gather_rows, scale, soft_cap,
    # top_logprobs, sample, apply_token_bitmask and the CPU-only linears) run the reference there, but
    # with the CUDA kernels top_logprobs and sample take argmax_logprob's log-sum (sampling.py).
    _reference_on_cuda = torch.library.Library("pagedlm", "IMPL")
    _on_cuda = {"top_logprobs": sampling.top_logprobs_on_cuda, "sample": sampling.sample_on_cuda} if _CUDA_KERNELS else {}
    for _name in _OP_NAMES:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pagedlm::{_name}", "CUDA"):
            _reference_on_cuda.impl(_name, _on_cuda.get(_name, getattr(reference, _name)), "CUDA")


def backend_for(device: torch.device | str) -> str:
    """The backend that runs the ops on tensors of ``device``: "cuda", "cpu" or "torch-reference"."""
    if not EXTENSION_LOADED:
        return "torch-reference"
    if torch.device(device).type == "cuda":
        return "cuda" if _CUDA_KERNELS else "torch-reference"
    return "cpu"


def _implementations() -> object:
    """Where the ops come from: the reference module, or the registered ``torch.ops.pagedlm``
    overloads (which take the same arguments as the reference functions)."""
    if not EXTENSION_LOADED:
        return reference
    return SimpleNamespace(**{name: getattr(torch.ops.pagedlm, name).default for name in _OP_NAMES})


_impl = _implementations()
reshape_and_cache = _impl.reshape_and_cache
paged_attention = _impl.paged_attention
paged_prefill_attention = _impl.paged_prefill_attention
copy_blocks = _impl.copy_blocks
gather_rows = _impl.gather_rows
rms_norm = _impl.rms_norm
fused_add_rms_norm = _impl.fused_add_rms_norm
gemma_rms_norm = _impl.gemma_rms_norm
gemma_fused_add_rms_norm = _impl.gemma_fused_add_rms_norm
olmo_rms_norm = _impl.olmo_rms_norm
olmo_rms_norm_add = _impl.olmo_rms_norm_add
rotary_embedding = _impl.rotary_embedding
silu_and_mul = _impl.silu_and_mul
gelu_tanh_and_mul = _impl.gelu_tanh_and_mul
scale = _impl.scale
soft_cap = _impl.soft_cap
position_scale = _impl.position_scale
argmax_logprob = _impl.argmax_logprob
argmax = _impl.argmax
top_logprobs = _impl.top_logprobs
sample = _impl.sample
apply_token_bitmask = _impl.apply_token_bitmask
bf16_blocked_linear = _impl.bf16_blocked_linear
bf16_blocked_linear_act_and_mul = _impl.bf16_blocked_linear_act_and_mul
bf16_blocked_linear_argmax = _impl.bf16_blocked_linear_argmax
bf16_amx_linear = _impl.bf16_amx_linear
bf16_amx_linear_act_and_mul = _impl.bf16_amx_linear_act_and_mul
bf16_amx_linear_argmax = _impl.bf16_amx_linear_argmax
bf16_fma_linear = _impl.bf16_fma_linear
bf16_fma_linear_act_and_mul = _impl.bf16_fma_linear_act_and_mul
fp32_fma_linear = _impl.fp32_fma_linear
fp32_fma_linear_act_and_mul = _impl.fp32_fma_linear_act_and_mul
bf16_fma_linear_argmax = _impl.bf16_fma_linear_argmax
fp32_fma_linear_argmax = _impl.fp32_fma_linear_argmax

# Whether the CPU kernels run bf16 attention on their bf16 tiles (an AVX512-BF16 build): online-softmax
# steps over chunks of 32 keys, so bits that do not depend on the cache's block size. Else (and in
# fp32) a step per cache block.
BF16_ATTENTION_TILES = EXTENSION_LOADED and bool(getattr(sys.modules.get("pagedlm._C"), "BF16_ATTENTION_TILES", 0))

kv_cache_scale_is_valid = reference.kv_cache_scale_is_valid
amx_pack_weight = reference.amx_pack_weight
amx_pack_gate_up_weight = reference.amx_pack_gate_up_weight
fp32_pack_weight = reference.fp32_pack_weight
fp32_pack_gate_up_weight = reference.fp32_pack_gate_up_weight

__all__ = [
    "EXTENSION_LOADED", "BF16_ATTENTION_TILES", "backend_for", "kv_cache_scale_is_valid", "amx_pack_weight",
    "amx_pack_gate_up_weight", "fp32_pack_weight", "fp32_pack_gate_up_weight", *_OP_NAMES,
]
