"""Paged-attention ops: one interface, three backends ("cuda", "cpu", "torch-reference").

KV-cache layout contract (every kernel, the reference and ``CacheEngine`` follow it):

* Per layer, one key cache and one value cache, each a contiguous tensor of shape
  ``[num_blocks, num_kv_heads, block_size, head_size]`` in the model's dtype.
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

* ``reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)``
* ``paged_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale)``: decode,
  one query per sequence.
* ``paged_prefill_attention(out, query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens,
  scale)``: causal varlen attention; the query rows of sequence ``b`` are its last
  ``cu_seqlens_q[b+1] - cu_seqlens_q[b]`` tokens, attending over its first ``seq_lens[b]``.
* ``copy_blocks(key_caches, value_caches, block_mapping)``, ``swap_blocks(src, dst, block_mapping)``:
  whole-block copies by ``int64 [n, 2]`` (src, dst) pairs.
"""

from pagedlm.ops import reference

BACKEND = "torch-reference"

reshape_and_cache = reference.reshape_and_cache
paged_attention = reference.paged_attention
paged_prefill_attention = reference.paged_prefill_attention
copy_blocks = reference.copy_blocks
swap_blocks = reference.swap_blocks

__all__ = [
    "BACKEND",
    "reshape_and_cache",
    "paged_attention",
    "paged_prefill_attention",
    "copy_blocks",
    "swap_blocks",
]
