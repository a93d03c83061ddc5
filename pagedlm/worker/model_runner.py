"""Turns one scheduled step into flat model inputs, runs the model and samples.

A step's tokens are flattened without padding: prefill chunks first (several tokens per
sequence), then decodes (one token per sequence). Positions, slot mapping, block tables and
sequence lengths are built once per step and shared by every layer.
"""

from dataclasses import dataclass, field

import torch

from pagedlm.config import CacheConfig, ModelConfig
from pagedlm.engine.scheduler import ScheduledSequenceGroup
from pagedlm.engine.sequence import Sequence, SequenceGroup
from pagedlm.model_executor.layers.attention import AttentionMetadata
from pagedlm.model_executor.layers.sampler import Sampler, SamplingMetadata
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
class TopLogprobs:
    """The chosen token's rank and the top-k (ids, log-probabilities) at one position."""

    rank: int
    token_ids: list[int]
    logprobs: list[float]


@dataclass
class SequenceSample:
    parent: Sequence
    child_index: int  # == parent.index, or the index of a new completion forked from parent
    token_id: int
    logprob: float
    top: TopLogprobs | None


@dataclass
class PromptLogprob:
    token_id: int  # the prompt token at this position
    logprob: float
    top: TopLogprobs


@dataclass
class SequenceGroupOutput:
    seq_group: SequenceGroup
    samples: list[SequenceSample] = field(default_factory=list)
    beam_logprobs: torch.Tensor | None = None  # [num beams, V], rows in ``samples`` order
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, eos_token_ids: set[int]) -> None:
        self.model_config = model_config
        self.eos_token_ids = sorted(eos_token_ids)
        self.block_size = cache_config.block_size
        self.device = model_config.device
        self.vocab_size = model_config.hf_config.vocab_size
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
    ) -> list[SequenceGroupOutput]:
        self.cache_engine.copy(blocks_to_copy)
        entries = [
            _Entry(seq, sg.seq_group, seq.num_computed_tokens, seq.num_computed_tokens + chunk)
            for sg in scheduled
            for seq, chunk in sg.token_chunks.items()
        ]
        entries.sort(key=lambda e: e.end - e.start == 1)  # stable: prefills first, then decodes
        input_ids, positions, meta, last_rows = self._prepare_inputs(entries, block_tables)
        hidden = self.model(input_ids, positions, self.cache_engine.kv_caches, meta)
        outputs: dict[SequenceGroup, SequenceGroupOutput] = {}
        for e in entries:
            span = self._prompt_logprob_span(e)
            if span is not None:
                out = outputs.setdefault(e.seq_group, SequenceGroupOutput(e.seq_group))
                first_row = last_rows[id(e)] - (e.end - 1 - span[0])
                out.prompt_logprobs += self._prompt_logprobs(e, hidden[first_row : first_row + span[1] - span[0]], *span)
        sampling = [e for e in entries if e.samples]
        if sampling:
            self._sample(sampling, hidden, last_rows, outputs)
        return list(outputs.values())

    def _sample(
        self,
        entries: list[_Entry],
        hidden: torch.Tensor,
        last_rows: dict[int, int],
        outputs: dict[SequenceGroup, SequenceGroupOutput],
    ) -> None:
        rows, children, generators, beam_rows = [], [], {}, []
        beam_rows_of: dict[SequenceGroup, list[int]] = {}
        for e in entries:
            group = e.seq_group
            params = group.sampling_params
            fork = group.samples_first_tokens() and not params.use_beam_search
            for index in range(params.best_of) if fork else [e.seq.index]:
                if group.generators is not None:
                    generators[len(rows)] = group.generators[index]
                if params.use_beam_search:
                    beam_rows_of.setdefault(group, []).append(len(beam_rows))
                    beam_rows.append(len(rows))
                rows.append(last_rows[id(e)])
                children.append((e, index))
        logits = self.model.compute_logits(hidden[self._tensor(rows, torch.int64)])
        meta = SamplingMetadata.build(
            params=[e.seq_group.sampling_params for e, _ in children],
            prompt_token_ids=[e.seq.prompt_token_ids for e, _ in children],
            output_token_ids=[e.seq.output_token_ids for e, _ in children],
            generators=generators,
            eos_token_ids=self.eos_token_ids,
            beam_rows=beam_rows,
            vocab_size=self.vocab_size,
            device=self.device,
        )
        result = self.sampler(logits, meta)
        token_ids, logprobs = result.token_ids.tolist(), result.logprobs.tolist()
        tops = _top_logprobs(result.ranks, result.top_ids, result.top_logprobs)
        for row, (e, index) in enumerate(children):
            out = outputs.setdefault(e.seq_group, SequenceGroupOutput(e.seq_group))
            top = tops[row] if tops and e.seq_group.sampling_params.logprobs is not None else None
            if top is not None:
                k = e.seq_group.sampling_params.logprobs
                top = TopLogprobs(top.rank, top.token_ids[:k], top.logprobs[:k])
            out.samples.append(SequenceSample(e.seq, index, token_ids[row], logprobs[row], top))
        for group, positions in beam_rows_of.items():
            outputs[group].beam_logprobs = result.beam_logprobs[positions]

    @staticmethod
    def _prompt_logprob_span(e: _Entry) -> tuple[int, int] | None:
        """Positions [first, end) of this chunk whose logits give prompt logprobs not yet
        produced (a recompute after preemption does not produce them twice)."""
        group = e.seq_group
        if group.prompt_logprobs is None or e.seq.index != 0:
            return None
        first, end = len(group.prompt_logprobs) - 1, min(e.end, len(group.prompt_token_ids) - 1)
        return (first, end) if e.start <= first < end else None

    def _prompt_logprobs(self, e: _Entry, hidden: torch.Tensor, first: int, end: int) -> list[PromptLogprob]:
        """Log-probabilities of prompt tokens ``first+1 .. end`` given everything before each."""
        logprobs = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
        targets = self._tensor(e.seq.prompt_token_ids[first + 1 : end + 1], torch.int64)
        chosen = logprobs.gather(1, targets[:, None])
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top_lps, top_ids = logprobs.topk(e.seq_group.sampling_params.prompt_logprobs, dim=-1)
        tops = _top_logprobs(ranks, top_ids, top_lps)
        return [PromptLogprob(t, lp, top) for t, lp, top in zip(targets.tolist(), chosen.squeeze(1).tolist(), tops)]

    def _prepare_inputs(
        self, entries: list[_Entry], block_tables: dict[int, list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, dict[int, int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        last_rows: dict[int, int] = {}
        cu_seqlens_q = [0]
        prefill_lens, prefill_tables, decode_lens, decode_tables = [], [], [], []
        for e in entries:
            table = block_tables[e.seq.seq_id]
            input_ids += e.seq.token_ids(e.start, e.end)
            positions += range(e.start, e.end)
            slot_mapping += [table[p // bs] * bs + p % bs for p in range(e.start, e.end)]
            last_rows[id(e)] = len(input_ids) - 1
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
        return self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta, last_rows

    def _block_table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        return self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32).view(len(tables), width)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)


def _top_logprobs(ranks: torch.Tensor | None, ids: torch.Tensor | None, lps: torch.Tensor | None) -> list[TopLogprobs]:
    if ranks is None:
        return []
    return [TopLogprobs(r, i, lp) for r, i, lp in zip(ranks.tolist(), ids.tolist(), lps.tolist())]
