"""Turns one scheduled step into flat model inputs, runs the model and samples.

A step's tokens are flattened without padding: prefill chunks first (several tokens per
sequence), then decodes (one token per sequence). Positions, slot mapping, block tables and
sequence lengths are built once per step and shared by every layer.
"""

from dataclasses import dataclass

import torch

from pagedlm.config import CacheConfig, ModelConfig
from pagedlm.engine.scheduler import ScheduledSequenceGroup
from pagedlm.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedlm.model_executor.layers.attention import AttentionMetadata
from pagedlm.model_executor.layers.sampler import Sampler, SamplingTensors
from pagedlm.model_executor.model_loader import get_model
from pagedlm.worker.cache_engine import CacheEngine


@dataclass
class _Entry:
    seq: Sequence
    seq_group: SequenceGroup
    start: int  # first position computed this step
    end: int  # one past the last

    @property
    def samples(self) -> bool:
        return self.end == self.seq.num_tokens


@dataclass
class SamplerOutput:
    seq_groups: list[SequenceGroup]  # the group of each row
    seqs: list[Sequence]  # the sequences that sampled this step, in row order
    token_ids: list[int]
    logprobs: list[float]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, eos_token_ids: set[int]) -> None:
        self.model_config = model_config
        self.eos_token_ids = sorted(eos_token_ids)
        self.block_size = cache_config.block_size
        self.device = model_config.device
        self.model = get_model(model_config)
        self.sampler = Sampler()
        self.cache_engine: CacheEngine | None = None

    def init_cache(self, cache_config: CacheConfig, num_blocks: int) -> None:
        self.cache_engine = CacheEngine(self.model_config, cache_config, num_blocks)

    @torch.inference_mode()
    def execute_model(
        self,
        scheduled: list[ScheduledSequenceGroup],
        block_tables: dict[int, list[int]],
        blocks_to_copy: list[tuple[int, int]],
    ) -> SamplerOutput:
        self.cache_engine.copy(blocks_to_copy)
        entries = [
            _Entry(seq, sg.seq_group, seq.num_computed_tokens, seq.num_computed_tokens + sg.token_chunk_size)
            for sg in scheduled
            for seq in sg.seq_group.get_seqs(SequenceStatus.RUNNING)
        ]
        entries.sort(key=lambda e: e.end - e.start == 1)  # stable: prefills first, then decodes
        input_ids, positions, meta, sample_rows = self._prepare_inputs(entries, block_tables)
        hidden = self.model(input_ids, positions, self.cache_engine.kv_caches, meta)
        sampling = [e for e in entries if e.samples]
        if not sampling:
            return SamplerOutput([], [], [], [])
        logits = self.model.compute_logits(hidden[sample_rows])
        tokens, logprobs = self.sampler(logits, self._sampling_tensors(sampling))
        return SamplerOutput(
            [e.seq_group for e in sampling], [e.seq for e in sampling], tokens.tolist(), logprobs.tolist()
        )

    def _prepare_inputs(
        self, entries: list[_Entry], block_tables: dict[int, list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sample_rows: list[int] = []
        cu_seqlens_q = [0]
        prefill_lens, prefill_tables, decode_lens, decode_tables = [], [], [], []
        for e in entries:
            table = block_tables[e.seq.seq_id]
            input_ids += e.seq.token_ids(e.start, e.end)
            positions += range(e.start, e.end)
            slot_mapping += [table[p // bs] * bs + p % bs for p in range(e.start, e.end)]
            if e.samples:
                sample_rows.append(len(input_ids) - 1)
            if e.end - e.start == 1:
                decode_lens.append(e.end)
                decode_tables.append(table)
            else:
                cu_seqlens_q.append(len(input_ids))
                prefill_lens.append(e.end)
                prefill_tables.append(table)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slot_mapping, torch.int64),
            num_prefill_tokens=cu_seqlens_q[-1],
            prefill_cu_seqlens_q=self._tensor(cu_seqlens_q, torch.int32),
            prefill_seq_lens=self._tensor(prefill_lens, torch.int32),
            prefill_block_tables=self._block_table_tensor(prefill_tables),
            decode_seq_lens=self._tensor(decode_lens, torch.int32),
            decode_block_tables=self._block_table_tensor(decode_tables),
        )
        return (
            self._tensor(input_ids, torch.int64),
            self._tensor(positions, torch.int64),
            meta,
            self._tensor(sample_rows, torch.int64),
        )

    def _sampling_tensors(self, entries: list[_Entry]) -> SamplingTensors:
        params = [e.seq_group.sampling_params for e in entries]
        vocab = self.model_config.hf_config.vocab_size
        greedy = [p.greedy for p in params]
        top_ks = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_ps = [p.top_p for p in params]
        min_ps = [p.min_p for p in params]
        sampled = [not g for g in greedy]
        return SamplingTensors(
            temperatures=self._tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32),
            top_ps=self._tensor(top_ps, torch.float32),
            top_ks=self._tensor(top_ks, torch.int64),
            min_ps=self._tensor(min_ps, torch.float32),
            greedy=self._tensor(greedy, torch.bool),
            generators={i: e.seq_group.generator for i, e in enumerate(entries) if e.seq_group.generator is not None},
            all_greedy=all(greedy),
            do_top_p_top_k=any(s and (k < vocab or p < 1.0) for s, k, p in zip(sampled, top_ks, top_ps)),
            do_min_p=any(s and m > 0 for s, m in zip(sampled, min_ps)),
            banned=self._banned_tokens(entries),
        )

    def _banned_tokens(self, entries: list[_Entry]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, token ids) of EOS and stop tokens that ``min_tokens`` still forbids."""
        rows, token_ids = [], []
        for i, e in enumerate(entries):
            params = e.seq_group.sampling_params
            if len(e.seq.output_token_ids) < params.min_tokens:
                banned = params.stop_token_ids + ([] if params.ignore_eos else self.eos_token_ids)
                rows += [i] * len(banned)
                token_ids += banned
        if not rows:
            return None
        return self._tensor(rows, torch.int64), self._tensor(token_ids, torch.int64)

    def _block_table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        return self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32).view(len(tables), width)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
