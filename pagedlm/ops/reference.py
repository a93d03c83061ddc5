"""Pure-torch reference implementation of the ops.

It follows the contracts written in ``pagedlm/ops/__init__.py``; the C++/CUDA kernels are tested
against it. The layer ops are Hugging Face's eager Llama code, written to an output. Clarity over speed, but every function is batched over sequences
where torch allows, because it is also the fallback backend when the extension is not built.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedlm.utils import cdiv


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def kv_cache_scale_is_valid(scale: float) -> bool:
    """Whether ``scale`` can scale an fp8 KV cache: positive and finite in float32 (the kernels'
    precision), with a finite float32 reciprocal (what writing divides by)."""
    single = torch.tensor(scale, dtype=torch.float32)
    return bool(single > 0 and torch.isfinite(single) and torch.isfinite(single.reciprocal()))


def _check_attention_options(key_cache: torch.Tensor, scale: float, logits_soft_cap: float) -> None:
    if key_cache.dim() != 4 or min(key_cache.shape[1:]) < 1:
        raise ValueError("key_cache must be [num_blocks, num_kv_heads, block_size, head_size], each but num_blocks >= 1")
    if not (math.isfinite(logits_soft_cap) and logits_soft_cap >= 0):
        raise ValueError(f"logits_soft_cap must be finite and >= 0 (0: no cap), got {logits_soft_cap}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")


def _check_scales(cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    if not all(kv_cache_scale_is_valid(s) for s in (k_scale, v_scale)):
        raise ValueError(f"k_scale and v_scale must be positive and finite in float32, with finite reciprocals; "
                         f"got {k_scale} and {v_scale}")
    if cache.dtype not in FP8_DTYPES and (k_scale, v_scale) != (1.0, 1.0):
        raise ValueError(f"k_scale and v_scale apply to fp8 KV caches only; a {cache.dtype} cache needs 1.0, "
                         f"got {k_scale} and {v_scale}")


def _to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as cache entries: x / scale, saturated at the largest finite value, rounded to nearest even
    (vLLM's convention for fp8 caches); other caches hold x itself."""
    if dtype not in FP8_DTYPES:
        return x.to(dtype)
    largest = torch.finfo(dtype).max
    inverse = torch.tensor(scale, dtype=torch.float32).reciprocal()
    return (x.float() * inverse.to(x.device)).clamp(-largest, largest).to(dtype)


def _from_cache(entries: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache entries as fp32 values: entry * scale (the scale is 1 for non-fp8 caches)."""
    return entries.float() * scale


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    _check_scales(key_cache, k_scale, v_scale)
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 (or int32) [num_tokens], got {slot_mapping.dtype}")
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    block_size = key_cache.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    key_cache[blocks, :, offsets] = _to_cache(key, key_cache.dtype, k_scale)
    value_cache[blocks, :, offsets] = _to_cache(value, value_cache.dtype, v_scale)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence as [length, num_kv_heads, head_size]."""
    num_blocks = cdiv(length, cache.shape[2])
    blocks = cache[block_table[:num_blocks].long()]  # [n, H, bs, D]
    return blocks.permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])[:length]


def _soft_cap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(scores / cap) * cap if cap > 0 else scores


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int, sliding_window: int, soft_cap: float
) -> torch.Tensor:
    """q [Lq, H, D], k/v [Lk, Hkv, D]; query i sits at position causal_offset + i and sees the keys
    at positions (p - sliding_window, p] (all up to p when sliding_window is 0)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = _soft_cap(torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale, soft_cap)
    q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + causal_offset
    k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
    hidden = k_pos > q_pos
    if sliding_window > 0:
        hidden |= k_pos <= q_pos - sliding_window
    scores.masked_fill_(hidden, float("-inf"))
    probs = scores.softmax(dim=-1)
    # Keys outside the window may hold anything (NaN included); zero them so 0 * NaN does not poison the sum.
    v = v.float().masked_fill(hidden.all(dim=0)[:, None, None], 0.0) if sliding_window > 0 else v.float()
    return torch.einsum("hqk,khd->qhd", probs, v)


def paged_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    logits_soft_cap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Decode: one query token per sequence (at position ``seq_len - 1``), attending over its cached
    context, or the last ``sliding_window`` tokens of it."""
    _check_attention_options(key_cache, scale, logits_soft_cap)
    _check_scales(key_cache, k_scale, v_scale)
    num_seqs, num_heads, head_size = query.shape
    if num_seqs == 0:
        return
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    max_len = int(seq_lens.max())
    num_blocks = cdiv(max_len, block_size)
    tables = block_tables[:, :num_blocks].long()
    # [B, n, Hkv, bs, D] -> [B, Hkv, n*bs, D]
    k = _from_cache(key_cache[tables], k_scale).permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, -1, head_size)
    v = _from_cache(value_cache[tables], v_scale).permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, -1, head_size)
    group = num_heads // num_kv_heads
    q = query.float().view(num_seqs, num_kv_heads, group, head_size)
    scores = _soft_cap(torch.einsum("bhgd,bhkd->bhgk", q, k) * scale, logits_soft_cap)
    positions = torch.arange(k.shape[2], device=query.device)
    lens = seq_lens[:, None].to(positions.device)
    hidden = positions[None, :] >= lens
    if sliding_window > 0:
        hidden |= positions[None, :] < lens - sliding_window
    scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
    # Stale slots (and keys before the window) may hold NaN; zero them so 0 * NaN does not poison the sum.
    v = v.masked_fill(hidden[:, None, :, None], 0.0)
    probs = scores.softmax(dim=-1)
    result = torch.einsum("bhgk,bhkd->bhgd", probs, v)
    out.copy_(result.reshape(num_seqs, num_heads, head_size))


def paged_prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    logits_soft_cap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Varlen causal attention: sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``,
    which are its last tokens; they attend over its first ``seq_lens[b]`` cached tokens (within the
    sliding window, if any)."""
    _check_attention_options(key_cache, scale, logits_soft_cap)
    _check_scales(key_cache, k_scale, v_scale)
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        k = _from_cache(_gather(key_cache, block_tables[b], seq_len), k_scale)
        v = _from_cache(_gather(value_cache, block_tables[b], seq_len), v_scale)
        offset = seq_len - (hi - lo)
        out[lo:hi] = _attend(query[lo:hi], k, v, scale, offset, sliding_window, logits_soft_cap).to(out.dtype)


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """Copy whole blocks ``src -> dst`` for every (src, dst) row of ``block_mapping``, in all layers."""
    src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
    for cache in (*key_caches, *value_caches):
        cache[dst] = cache[src]


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    x = input.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    out.copy_(weight * x.to(input.dtype))


def fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    residual.add_(input)
    rms_norm(input, residual, weight, epsilon)


def gemma_rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    x = input.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    out.copy_((x * (1.0 + weight.float())).to(input.dtype))


def gemma_fused_add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> None:
    residual.add_(input)
    gemma_rms_norm(input, residual, weight, epsilon)


def olmo_rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    x = input.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    out.copy_((weight * x).to(input.dtype))


def olmo_rms_norm_add(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    olmo_rms_norm(input, input, weight, epsilon)
    residual.add_(input)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    for x in (query, key):
        x.copy_(x * cos + _rotate_half(x) * sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def gather_rows(out: torch.Tensor, input: torch.Tensor, index: torch.Tensor) -> None:
    torch.index_select(input, 0, index, out=out)


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    gate, up = input.chunk(2, dim=-1)
    out.copy_(F.silu(gate) * up)


def gelu_tanh_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    gate, up = input.chunk(2, dim=-1)
    out.copy_(F.gelu(gate, approximate="tanh") * up)


def scale(x: torch.Tensor, factor: float, divide: bool = False) -> None:
    if not (math.isfinite(factor) and factor != 0.0):
        raise ValueError(f"scale: factor must be finite and nonzero; got {factor}")
    if divide:
        x.div_(factor)
    else:
        x.mul_(factor)


def soft_cap(x: torch.Tensor, cap: float) -> None:
    if not (math.isfinite(cap) and cap > 0.0):
        raise ValueError(f"soft_cap: cap must be finite and positive; got {cap}")
    x.copy_(torch.tanh(x / cap) * cap)


def position_scale(x: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor) -> None:
    x.mul_(scales[positions][:, None, None])


def argmax_logprob(logits: torch.Tensor, token_ids: torch.Tensor, logprobs: torch.Tensor) -> None:
    x = logits.float()
    top, ids = x.max(dim=-1)
    token_ids.copy_(ids)
    logprobs.copy_(top - torch.logsumexp(x, dim=-1))


def argmax(logits: torch.Tensor, token_ids: torch.Tensor) -> None:
    token_ids.copy_(logits.float().max(dim=-1).indices)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    if rows.numel() and not bool(((rows >= 0) & (rows < logits.shape[0])).all()):
        raise ValueError(f"apply_token_bitmask: rows must be in [0, {logits.shape[0]})")
    tokens = torch.arange(logits.shape[1], device=logits.device)
    allowed = (bitmask[:, tokens // 32] >> (tokens % 32).to(torch.int32)) & 1
    logits[rows] = logits[rows].masked_fill(allowed == 0, float("-inf"))


def top_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, logprobs: torch.Tensor, ranks: torch.Tensor,
                 top_logprobs: torch.Tensor, top_ids: torch.Tensor) -> None:
    x = logits.float()
    top = x.max(dim=-1, keepdim=True).values
    neg_log_sum = -torch.log(torch.exp(x - top).sum(dim=-1, keepdim=True))
    top_logprobs_from_log_sum(x, top, neg_log_sum, token_ids, logprobs, ranks, top_logprobs, top_ids)


def no_softmax(top: torch.Tensor, neg_log_sum: torch.Tensor) -> torch.Tensor:
    """The rows, of their maxima and ``-log(sum(exp(x - max)))`` (``[rows, 1]`` each), that have no
    softmax: a NaN (which makes the log-sum NaN, or -inf from the CPU kernels' exp), or an infinite
    maximum."""
    return ~(torch.isfinite(top) & torch.isfinite(neg_log_sum))


def top_logprobs_from_log_sum(x: torch.Tensor, top: torch.Tensor, neg_log_sum: torch.Tensor, token_ids: torch.Tensor,
                              logprobs: torch.Tensor, ranks: torch.Tensor, top_logprobs: torch.Tensor,
                              top_ids: torch.Tensor) -> None:
    """``top_logprobs`` given float32 logits ``x`` and each row's maximum and ``-log(sum(exp(x - max)))``
    (``[rows, 1]``)."""
    if x.shape[0] and not bool(((token_ids >= 0) & (token_ids < x.shape[1])).all()):
        raise ValueError(f"top_logprobs: token_ids must be in [0, {x.shape[1]})")
    # A row with a NaN or an infinite maximum has no softmax: NaN, rank 1, ids 0 .. k - 1.
    bad = no_softmax(top, neg_log_sum)[:, 0]
    lp = ((x - top) + neg_log_sum).masked_fill(bad[:, None], 0.0)
    chosen = lp.gather(1, token_ids[:, None])
    k = top_logprobs.shape[1]
    values, ids = _top_k_in_token_order(lp, k)
    logprobs.copy_(chosen[:, 0].masked_fill(bad, float("nan")))
    ranks.copy_((lp >= chosen).sum(dim=-1).clamp(min=1).masked_fill(bad, 1))
    top_logprobs.copy_(values.masked_fill(bad[:, None], float("nan")))
    top_ids.copy_(torch.where(bad[:, None], torch.arange(k, device=ids.device), ids))


def _top_k_in_token_order(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``x`` and their indices, ties in index order
    (``torch.topk`` breaks them differently for different row counts)."""
    if k == 0:
        return x.new_empty(x.shape[0], 0), torch.empty(x.shape[0], 0, dtype=torch.int64, device=x.device)
    kth = x.topk(k, dim=-1).values[:, -1:]  # values do not depend on the ties
    rows, ids = (x >= kth).nonzero(as_tuple=True)  # row-major, ids ascending within a row
    values = x[rows, ids]
    order = values.argsort(descending=True, stable=True)
    order = order[rows[order].argsort(stable=True)]  # rows grouped, by value within, ties by id
    counts = torch.bincount(rows, minlength=x.shape[0])
    first = counts.cumsum(0) - counts
    picked = order[(first[:, None] + torch.arange(k, device=x.device)).flatten()].view(-1, k)
    return values[picked], ids[picked]


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    uniforms: torch.Tensor,
    token_ids: torch.Tensor,
    logprobs: torch.Tensor | None = None,
) -> None:
    x = logits.float()
    vocab = x.shape[-1]
    top = x.max(dim=-1).values
    greedy = (temperatures == 0) | ~torch.isfinite(top)  # also a row with no softmax
    t = torch.where(greedy, 1.0, temperatures)
    z = x / t[:, None]
    p = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    # A maximum that overflows once tempered leaves every token below it a probability that
    # underflows to 0: the tokens at the maximum, alike.
    overflow = ~greedy & ~torch.isfinite(top / t)
    p = torch.where(overflow[:, None], (x == top[:, None]).float(), p)
    ordered = p.sort(dim=-1, descending=True).values
    threshold = ordered.gather(1, (top_ks.clamp(1, vocab) - 1)[:, None])
    kept = torch.where(ordered >= threshold, ordered, 0.0).double()
    mass = kept.cumsum(dim=-1)
    # top-p's threshold: the value at which the descending kept mass first reaches top_p of it all.
    first = (mass < top_ps[:, None].double() * mass[:, -1:]).sum(dim=-1, keepdim=True).clamp(max=vocab - 1)
    threshold = torch.where(top_ps[:, None] < 1, ordered.gather(1, first), threshold)
    threshold = torch.maximum(threshold, min_ps[:, None])
    weights = torch.where(p >= threshold, p, 0.0).double()
    cdf = weights.cumsum(dim=-1)
    picked = (cdf <= uniforms[:, None].double() * cdf[:, -1:]).sum(dim=-1)
    last_kept = vocab - 1 - (weights > 0).flip(-1).int().argmax(dim=-1)
    picked = torch.where(greedy, x.argmax(dim=-1), torch.minimum(picked, last_kept))
    token_ids.copy_(picked)
    if logprobs is not None:
        logprobs.copy_(x.gather(1, picked[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1))


def bf16_blocked_linear(
    out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k_chunk_ends: list[int]
) -> None:
    w = (weight.to_dense() if weight.is_mkldnn else weight).float()
    x = input.float()
    total = None
    start = 0
    for end in k_chunk_ends:
        chain = torch.zeros(x.shape[0], w.shape[0])
        for k in range(start, end, 2):  # one vdpbf16ps step: the odd feature's product first
            for j in (k + 1, k):
                if j < end:
                    chain = chain + torch.outer(x[:, j], w[:, j])
        total = chain if total is None else total + chain
        start = end
    if bias is not None:
        total = total + bias.float()
    out.copy_(total)


def _check_token_ids(token_ids: torch.Tensor, rows: int, op: str) -> None:
    """ValueError naming ``op`` unless ``token_ids`` is int64 ``[rows]`` (the *_linear_argmax ops)."""
    if token_ids.dtype != torch.int64 or token_ids.shape != (rows,):
        raise ValueError(f"{op}: token_ids must be int64 [{rows}]; got {token_ids.dtype} {tuple(token_ids.shape)}")


def bf16_blocked_linear_argmax(
    token_ids: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    k_chunk_ends: list[int],
) -> None:
    _check_token_ids(token_ids, input.shape[0], "bf16_blocked_linear_argmax")
    out = input.new_empty(input.shape[0], weight.shape[0])
    bf16_blocked_linear(out, input, weight, bias, k_chunk_ends)
    argmax(out, token_ids)


def _gated_activation(activation: str, op: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The act_and_mul op the gated linears' ``activation`` names; ValueError naming ``op`` otherwise."""
    acts = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}
    if activation not in acts:
        raise ValueError(f"{op}: activation must be 'silu' or 'gelu_tanh'; got {activation!r}")
    return acts[activation]


def bf16_blocked_linear_act_and_mul(
    out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k_chunk_ends: list[int],
    activation: str,
) -> None:
    act_and_mul = _gated_activation(activation, "bf16_blocked_linear_act_and_mul")
    if weight.shape[0] % 128 or out.dim() != 2 or 2 * out.shape[-1] != weight.shape[0]:
        raise ValueError(f"bf16_blocked_linear_act_and_mul: out must be [rows, d] for a [2 * d, in_features] gate_up "
                         f"weight with d a multiple of 64; got out {tuple(out.shape)}, weight {tuple(weight.shape)}")
    gate_up = out.new_empty(out.shape[0], weight.shape[0])
    bf16_blocked_linear(gate_up, input, weight, bias, k_chunk_ends)
    act_and_mul(out, gate_up)


def amx_pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A ``[N, K]`` weight in ``bf16_amx_linear``'s layout: bf16 ``[ceil(N / 16), ceil(K / 32) * 16, 16, 2]``,
    per block of 16 output columns and per pair of input features, the 16 columns' two weights
    (zero-padded: AMX's VNNI B-tile layout, Intel SDM TDPBF16PS)."""
    n, k = weight.shape
    n_pad, k_pad = -(-n // 16) * 16, -(-k // 32) * 32
    padded = torch.zeros(n_pad, k_pad, dtype=torch.bfloat16, device=weight.device)
    padded[:n, :k] = weight
    return padded.view(n_pad // 16, 16, k_pad // 2, 2).permute(0, 2, 1, 3).contiguous()


def fp32_pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A ``[N, K]`` weight in ``fp32_fma_linear``'s layout: fp32 ``[ceil(N / 16), K, 16]``, per block of
    16 output columns and per input feature, the 16 columns' weights (columns zero-padded)."""
    n, k = weight.shape
    n_pad = -(-n // 16) * 16
    padded = torch.zeros(n_pad, k, dtype=torch.float32, device=weight.device)
    padded[:n] = weight
    return padded.view(n_pad // 16, 16, k).transpose(1, 2).contiguous()


def _packed_linear(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``out = input @ W.T + bias`` for ``weight`` = ``amx_pack_weight(W)`` (bf16 ``input``) or
    ``fp32_pack_weight(W)`` (fp32 ``input``). Raises ValueError for another weight layout."""
    layout = (4, torch.bfloat16) if input.dtype == torch.bfloat16 else (3, torch.float32)
    if (weight.dim(), weight.dtype) != layout:
        raise ValueError(f"packed linear: a {input.dtype} input takes a {layout[1]} weight of {layout[0]} dimensions "
                         f"({'amx_pack_weight' if layout[0] == 4 else 'fp32_pack_weight'}); got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = out.shape[1], input.shape[1]
    blocked = weight.permute(0, 2, 1, 3) if weight.dim() == 4 else weight.transpose(1, 2)
    w = blocked.reshape(weight.shape[0] * 16, -1)[:n, :k].float()
    total = input.float() @ w.T
    if bias is not None:
        total = total + bias.float()
    out.copy_(total)


# The AMX and FMA kernels sum the same products in other fp32 orders.
bf16_amx_linear = bf16_fma_linear = fp32_fma_linear = _packed_linear


def _gate_up_blocks(d: int) -> torch.Tensor:
    """Row order of a packed gate_up weight: per 16 columns of ``d``, the gate's rows, then the up's."""
    return torch.arange(2 * d).view(2, d // 16, 16).transpose(0, 1).reshape(-1)


def _pack_gate_up(weight: torch.Tensor, pack, name: str) -> torch.Tensor:
    rows = weight.shape[0]
    if rows % 32:
        raise ValueError(f"{name}: a [2 * d, K] weight with d a multiple of 16; got {rows} rows")
    return pack(weight[_gate_up_blocks(rows // 2).to(weight.device)])


def amx_pack_gate_up_weight(weight: torch.Tensor) -> torch.Tensor:
    """A gated MLP's ``[2 * d, K]`` gate_up weight (gate rows, then up rows; ``d`` a multiple of 16)
    in ``bf16_amx_linear_act_and_mul``'s layout: ``amx_pack_weight`` of its rows in the order gate
    16j..16j+15, up 16j..16j+15 for each j, so that column blocks alternate gate and up.

    Raises ValueError when the rows are not ``2 * d`` with ``d`` a multiple of 16."""
    return _pack_gate_up(weight, amx_pack_weight, "amx_pack_gate_up_weight")


def fp32_pack_gate_up_weight(weight: torch.Tensor) -> torch.Tensor:
    """``amx_pack_gate_up_weight``'s row order in ``fp32_pack_weight``'s layout, for
    ``fp32_fma_linear_act_and_mul``. Raises ValueError as that function does."""
    return _pack_gate_up(weight, fp32_pack_weight, "fp32_pack_gate_up_weight")


def _packed_linear_act_and_mul(
    out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, op: str
) -> None:
    act_and_mul = _gated_activation(activation, op)
    d = out.shape[-1]
    if out.dim() != 2 or d % 16 or weight.shape[0] * 16 != 2 * d:
        raise ValueError(f"{op}: out must be [rows, d] with d a multiple of 16 and weight the packed gate_up "
                         f"weight of a [2 * d, in_features] weight; got out {tuple(out.shape)}, "
                         f"weight {tuple(weight.shape)}")
    order = _gate_up_blocks(d).to(input.device)
    blocked = out.new_empty(out.shape[0], 2 * d)
    _packed_linear(blocked, input, weight, None if bias is None else bias[order])
    gate_up = torch.empty_like(blocked)
    gate_up[:, order] = blocked
    act_and_mul(out, gate_up)


def bf16_amx_linear_act_and_mul(
    out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> None:
    _packed_linear_act_and_mul(out, input, weight, bias, activation, "bf16_amx_linear_act_and_mul")


def _packed_linear_argmax(
    token_ids: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int,
    op: str,
) -> None:
    if out_features <= 0 or weight.shape[0] * 16 < out_features:
        raise ValueError(f"{op}: out_features must be in [1, {weight.shape[0] * 16}] for a packed weight of "
                         f"{weight.shape[0]} column blocks; got {out_features}")
    _check_token_ids(token_ids, input.shape[0], op)
    out = input.new_empty(input.shape[0], out_features)
    _packed_linear(out, input, weight, bias)
    argmax(out, token_ids)


def _argmax_op(op: str):
    def packed_argmax(token_ids: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      out_features: int) -> None:
        _packed_linear_argmax(token_ids, input, weight, bias, out_features, op)

    packed_argmax.__name__ = packed_argmax.__qualname__ = op
    return packed_argmax


bf16_amx_linear_argmax = _argmax_op("bf16_amx_linear_argmax")
bf16_fma_linear_argmax = _argmax_op("bf16_fma_linear_argmax")
fp32_fma_linear_argmax = _argmax_op("fp32_fma_linear_argmax")


def bf16_fma_linear_act_and_mul(
    out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> None:
    _packed_linear_act_and_mul(out, input, weight, bias, activation, "bf16_fma_linear_act_and_mul")


def fp32_fma_linear_act_and_mul(
    out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> None:
    _packed_linear_act_and_mul(out, input, weight, bias, activation, "fp32_fma_linear_act_and_mul")
