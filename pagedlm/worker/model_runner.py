"""Runs one step on the model: inputs from the step's metadata, the forward pass, then the
log-probabilities and samples the metadata asks for (types in ``pagedlm/step.py``)."""

import logging
from collections.abc import Iterator

import torch

from pagedlm import ops
from pagedlm.config import CacheConfig, ModelConfig
from pagedlm.model_executor.layers.attention import Attention
from pagedlm.model_executor.layers.rotary_embedding import long_rope_recomputes, long_rope_threshold
from pagedlm.model_executor.layers.sampler import Sampler, SamplerResult, SamplingMetadata, rank_and_top_logprobs
from pagedlm.model_executor.model_loader import get_model
from pagedlm.ops.sampling import argmax_and_neg_log_sum, token_logprobs
from pagedlm.sampling_params import SamplingParams
from pagedlm.step import PromptLogprob, SequenceData, SequenceGroupMetadata, SequenceGroupOutput, SequenceOutput, TopLogprobs
from pagedlm.worker.cache_engine import CacheEngine
from pagedlm.worker.model_input import LongRope, StepEntry, prepare_model_input
from pagedlm.worker.step_graph import StepGraphs

logger = logging.getLogger("pagedlm")

# Prompt rows whose logits prompt_logprobs and prompt_logprob_token_ids make at once (vLLM's
# chunk): their [rows, vocab] float32 logits are the pass's memory (0.6 GB at Qwen's 152k vocab).
_PROMPT_ROWS_PER_PASS = 1024


def _attention_layers(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, max_num_seqs: int) -> None:
        self.model_config = model_config
        self.max_num_seqs = max_num_seqs
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        self.device = model_config.device
        self.vocab_size = model_config.hf_config.vocab_size
        self.model = get_model(model_config, kv_cache_scales=cache_config.cache_dtype != "auto")
        threshold = long_rope_threshold(model_config.hf_config)
        # LongRoPE tables hold max_model_len rows of short factors, then the long ones.
        self.long_rope = None if threshold is None else LongRope(
            threshold, model_config.max_model_len, long_rope_recomputes(model_config.hf_config))
        seed = model_config.seed
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(seed) if seed is not None else None)
        self.cache_engine: CacheEngine | None = None
        self.attention_layers = _attention_layers(self.model)
        self.step_graphs: StepGraphs | None = None  # recorded decode steps (step_graph.py), with the cache

    def calculate_kv_scales_next_step(self) -> None:
        """Each attention layer sets its fp8 KV-cache scales from the keys and values of the next step."""
        for m in self.attention_layers:
            m.calculate_kv_scales = True

    def kv_cache_scales(self) -> list[tuple[float, float]]:
        """(k_scale, v_scale) of each attention layer."""
        return [(m.k_scale, m.v_scale) for m in self.attention_layers]

    def init_cache(self, num_kv_blocks: int) -> None:
        self.cache_engine = CacheEngine(self.model_config, self.cache_config, num_kv_blocks)
        self._make_step_graphs()

    def _make_step_graphs(self) -> None:
        """Decode steps are recorded and replayed (step_graph.py) where pagedlm's CPU kernels run the
        model, unless ``enforce_eager``; none are recorded yet."""
        self.step_graphs = None
        if self.model_config.enforce_eager or ops.backend_for(self.device) != "cpu" or self.cache_engine is None:
            return
        max_blocks_per_seq = -(-self.model_config.max_model_len // self.block_size)
        self.step_graphs = StepGraphs(self.model, self.cache_engine.kv_caches, self.max_num_seqs, max_blocks_per_seq,
                                      self.device)

    def weight_bytes(self) -> int:
        """Bytes of the model's parameters and buffers (a tensor shared by two modules counts once)."""
        tensors = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def free_cache(self) -> None:
        """Drop the KV cache and the steps recorded over it (on CUDA, back to the device too)."""
        self.cache_engine = None
        self.step_graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop the model and the KV cache; their memory is freed once nothing else holds them."""
        self.model = None
        self.attention_layers = []
        self.free_cache()

    @torch.inference_mode()
    def execute_model(
        self, seq_group_metadata_list: list[SequenceGroupMetadata], blocks_to_copy: list[tuple[int, int]]
    ) -> list[SequenceGroupOutput]:
        """Copy the step's copy-on-write blocks, run the model over every scheduled chunk and
        return, per group in the same order, its samples and prompt log-probabilities."""
        self.cache_engine.copy(blocks_to_copy)
        model_input = prepare_model_input(seq_group_metadata_list, self.block_size, self.device, self.long_rope)
        meta = model_input.attn_metadata
        if (self.step_graphs is not None and meta.num_prefill_tokens == 0 and meta.slot_mapping.shape[0] <= self.max_num_seqs
                and not any(m.calculate_kv_scales for m in self.attention_layers)):
            hidden = self.step_graphs.forward(model_input)
        else:
            hidden = self.model(model_input.input_ids, model_input.positions, self.cache_engine.kv_caches, meta)
        outputs = [SequenceGroupOutput() for _ in seq_group_metadata_list]
        for e in model_input.entries:
            params = seq_group_metadata_list[e.group_index].sampling_params
            if e.seq.prompt_logprob_span is not None:
                first, end = e.seq.prompt_logprob_span
                outputs[e.group_index].prompt_logprobs += self._prompt_logprobs(
                    e.seq, params.prompt_logprobs, _span_rows(hidden, e, first, end), first, end)
            if e.seq.prompt_token_id_span is not None:
                first, end = e.seq.prompt_token_id_span
                outputs[e.group_index].prompt_token_id_logprobs = self._prompt_token_id_logprobs(
                    params, _span_rows(hidden, e, first, end), first, end)
        sampling = [e for e in model_input.entries if e.seq.num_samples]
        if sampling:
            self._sample(seq_group_metadata_list, sampling, hidden, outputs)
        return outputs

    def _sample(
        self,
        seq_group_metadata_list: list[SequenceGroupMetadata],
        entries: list[StepEntry],
        hidden: torch.Tensor,
        outputs: list[SequenceGroupOutput],
    ) -> None:
        rows: list[int] = []
        owners: list[StepEntry] = []  # the entry each sampled row belongs to
        generators: dict[int, torch.Generator] = {}
        beam_rows: list[int] = []
        beam_rows_of: dict[int, list[int]] = {}  # group index -> its positions in beam_rows
        for e in entries:
            params = seq_group_metadata_list[e.group_index].sampling_params
            for j in range(e.seq.num_samples):
                if e.seq.generators is not None:
                    generators[len(rows)] = e.seq.generators[j]
                if params.use_beam_search:
                    beam_rows_of.setdefault(e.group_index, []).append(len(beam_rows))
                    beam_rows.append(len(rows))
                rows.append(e.last_row)
                owners.append(e)
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        selected = hidden.new_empty(len(rows), hidden.shape[1])
        ops.gather_rows(selected, hidden, index)
        params = [seq_group_metadata_list[e.group_index].sampling_params for e in owners]
        meta = SamplingMetadata.build(
            params=params,
            prompt_token_ids=[e.seq.prompt_token_ids for e in owners],
            output_token_ids=[e.seq.output_token_ids for e in owners],
            banned_token_ids=[e.seq.banned_token_ids for e in owners],
            token_bitmasks=[e.seq.token_bitmask for e in owners],
            forced_token_ids=[e.seq.forced_token_id for e in owners],
            generators=generators,
            beam_rows=beam_rows,
            vocab_size=self.vocab_size,
            device=self.device,
        )
        # A plain greedy step without grammars needs only each row's argmax, which the LM head may
        # give without writing the [rows, vocab] logits.
        tokens = self.model.greedy_tokens(selected) if meta.plain_greedy and meta.allowed is None else None
        if tokens is not None:
            result = SamplerResult.greedy(tokens)
        else:
            result = self.sampler(self.model.compute_logits(selected), meta)
        token_ids = result.token_ids.tolist()
        logprobs = [None] * len(token_ids) if result.logprobs is None else result.logprobs.tolist()
        tops = _top_logprobs(result.ranks, result.top_ids, result.top_logprobs)
        no_token = set(result.no_token_rows)
        for row, (e, p) in enumerate(zip(owners, params)):
            top = None
            if p.logprob_token_ids:
                values, ranks = result.token_id_logprobs[row]
                top = TopLogprobs(tops[row].rank, p.logprob_token_ids, values, ranks)
            elif tops and p.logprobs is not None:
                top = TopLogprobs(tops[row].rank, tops[row].token_ids[: p.logprobs], tops[row].logprobs[: p.logprobs])
            outputs[e.group_index].samples.append(
                SequenceOutput(e.seq.seq_id, token_ids[row], logprobs[row], top, row in no_token))
        for group_index, positions in beam_rows_of.items():
            outputs[group_index].beam_logprobs = result.beam_logprobs[positions]
            outputs[group_index].beam_raw_logprobs = result.beam_raw_logprobs[positions]

    def _prompt_logprobs(
        self, seq: SequenceData, num_top: int, hidden: torch.Tensor, first: int, end: int
    ) -> list[PromptLogprob]:
        """Log-probabilities of prompt tokens ``first+1 .. end`` given everything before each."""
        targets = torch.tensor(seq.prompt_token_ids[first + 1 : end + 1], dtype=torch.int64, device=self.device)
        result = []
        for rows, logits in self._prompt_logits(hidden):
            part = targets[rows]
            chosen = torch.empty(part.shape[0], dtype=torch.float32, device=self.device)
            ranks, top_lps, top_ids = rank_and_top_logprobs(logits, part, num_top, chosen)
            tops = _top_logprobs(ranks, top_ids, top_lps)
            result += [PromptLogprob(t, lp, top) for t, lp, top in zip(part.tolist(), chosen.tolist(), tops)]
        return result

    def _prompt_token_id_logprobs(self, params: SamplingParams, hidden: torch.Tensor, first: int,
                                  end: int) -> torch.Tensor:
        """Log-probabilities, float32 ``[end - first, num_ids]`` on CPU, of ``params``'
        ``prompt_logprob_token_ids`` rows for prompt positions ``first .. end - 1`` (each row the
        next token's distribution there), ``_raw_logprob``'s formula; -inf where a row is padded
        with -1."""
        start = first - (params.prompt_logprob_start or 0)
        ids = torch.tensor(params.prompt_logprob_token_ids[start : start + end - first], dtype=torch.int64,
                           device=self.device)
        scores = torch.empty(ids.shape, dtype=torch.float32, device=self.device)
        for rows, logits in self._prompt_logits(hidden):
            _, top, neg_log_sum = argmax_and_neg_log_sum(logits)
            scores[rows] = token_logprobs(logits, ids[rows].clamp(min=0), top, neg_log_sum)
        return scores.masked_fill_(ids < 0, float("-inf")).cpu()

    def _prompt_logits(self, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """The logits of prompt rows ``hidden`` [rows, hidden_size], ``_PROMPT_ROWS_PER_PASS`` rows
        at a time: (the pass's rows, their [pass rows, vocab] logits)."""
        for a in range(0, len(hidden), _PROMPT_ROWS_PER_PASS):
            rows = slice(a, a + _PROMPT_ROWS_PER_PASS)
            yield rows, self.model.compute_logits(hidden[rows])


def _span_rows(hidden: torch.Tensor, entry: StepEntry, first: int, end: int) -> torch.Tensor:
    """The rows of ``hidden`` that computed prompt positions ``[first, end)`` of ``entry``'s chunk."""
    first_row = entry.last_row - (entry.seq.end - 1 - first)
    return hidden[first_row : first_row + end - first]


def _top_logprobs(ranks: torch.Tensor | None, ids: torch.Tensor | None, lps: torch.Tensor | None) -> list[TopLogprobs]:
    if ranks is None:
        return []
    return [TopLogprobs(r, i, lp) for r, i, lp in zip(ranks.tolist(), ids.tolist(), lps.tolist())]
