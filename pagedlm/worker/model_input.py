"""Flattens a step's scheduled sequences into the model's inputs (vLLM's ``prepare_model_input``).

No padding: prefill chunks first (several tokens per sequence), then decodes (one token per
sequence). Positions, slot mapping, block tables and sequence lengths are built once per step and
shared by every layer (the layout is the KV-cache contract in ``pagedlm/ops/__init__.py``).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from pagedlm.model_executor.layers.attention import AttentionMetadata
from pagedlm.step import SequenceData, SequenceGroupMetadata


@dataclass(slots=True)
class StepEntry:
    group_index: int  # into the step's ``SequenceGroupMetadata`` list
    seq: SequenceData
    last_row: int = -1  # row of the chunk's last token in the flattened step


class LongRope(NamedTuple):
    """A LongRoPE model's switch to the long factors (``_long_rope_positions``)."""

    threshold: int  # original_max_position_embeddings
    offset: int  # the first row of the long factors in the RoPE table (max_model_len)
    whole_sequence: bool  # a sequence past the threshold takes them at every position (Phi-3)


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: AttentionMetadata
    entries: list[StepEntry]  # in row order: prefill chunks, then decodes


def prepare_model_input(
    seq_group_metadata_list: list[SequenceGroupMetadata],
    block_size: int,
    device: torch.device,
    long_rope: LongRope | None = None,
) -> ModelInput:
    """``long_rope``: a LongRoPE model's; see ``_long_rope_positions``."""
    entries = [StepEntry(i, seq) for i, group in enumerate(seq_group_metadata_list) for seq in group.seq_data]
    entries.sort(key=lambda e: e.seq.token_chunk_size == 1)  # stable: prefills first, then decodes
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    cu_seqlens_q = [0]
    prefill_lens, prefill_tables, decode_lens, decode_tables = [], [], [], []
    for e in entries:
        seq, table = e.seq, e.seq.block_table
        start, end = seq.num_computed_tokens, seq.end
        if end - start == 1:  # a decode, as most rows of most steps are: no lists per row
            input_ids.append(seq.token_id(start))
            positions.append(start)
            slot_mapping.append(table[start // block_size] * block_size + start % block_size)
            decode_lens.append(end)
            decode_tables.append(table)
        else:
            input_ids += seq.chunk_token_ids()
            positions += range(start, end)
            slot_mapping += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            cu_seqlens_q.append(len(input_ids))
            prefill_lens.append(end)
            prefill_tables.append(table)
        e.last_row = len(input_ids) - 1

    def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=device)

    def block_table_tensor(tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        return tensor([t + [0] * (width - len(t)) for t in tables], torch.int32).view(len(tables), width)

    if long_rope is not None:
        positions = _long_rope_positions(entries, positions, *long_rope)
    attn_metadata = AttentionMetadata(
        slot_mapping=tensor(slot_mapping, torch.int64),
        num_prefill_tokens=cu_seqlens_q[-1],
        prefill_cu_seqlens_q=tensor(cu_seqlens_q, torch.int32),
        prefill_seq_lens=tensor(prefill_lens, torch.int32),
        prefill_block_tables=block_table_tensor(prefill_tables),
        decode_seq_lens=tensor(decode_lens, torch.int32),
        decode_block_tables=block_table_tensor(decode_tables),
    )
    return ModelInput(tensor(input_ids, torch.int64), tensor(positions, torch.int64), attn_metadata, entries)


def _long_rope_positions(entries: list[StepEntry], positions: list[int], threshold: int, offset: int,
                         whole_sequence: bool) -> list[int]:
    """Rows of a LongRoPE table (``RotaryEmbedding``: short factors, then the long ones from row
    ``offset``), as transformers picks the factors per forward pass, by its longest position. With
    ``whole_sequence`` (Phi-3), a sequence longer than ``threshold`` tokens (prompt and outputs so
    far) takes the long factors at every position (the engine recomputes a sequence that outgrows
    the threshold, as transformers' Phi-3 drops its cache then). Otherwise (other models keep their
    cache) a token takes them where its prompt is longer than ``threshold`` or it is at position
    ``threshold`` or later: a rule of its own position, so a recomputed sequence gets the same KV."""
    rows = list(positions)
    for e in entries:
        seq = e.seq
        first = e.last_row + 1 - seq.token_chunk_size
        if whole_sequence:
            long = len(seq.prompt_token_ids) + len(seq.output_token_ids) > threshold
            first_long = first if long else e.last_row + 1
        elif len(seq.prompt_token_ids) > threshold:
            first_long = first
        else:  # rows first .. last_row hold positions num_computed_tokens onwards
            first_long = first + max(threshold - seq.num_computed_tokens, 0)
        for row in range(first_long, e.last_row + 1):
            rows[row] += offset
    return rows
