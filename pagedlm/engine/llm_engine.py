"""The engine: requests in, one scheduled model step at a time, ``RequestOutput``s out."""

import time

import torch
from transformers import GenerationConfig

from pagedlm.config import CacheConfig, ModelConfig, SchedulerConfig
from pagedlm.engine.beam_search import BeamSearchState
from pagedlm.engine.block_manager import BlockSpaceManager
from pagedlm.engine.detokenizer import IncrementalDetokenizer, decode_completion
from pagedlm.engine.scheduler import Scheduler
from pagedlm.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedlm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.transformers_utils.tokenizer import get_tokenizer
from pagedlm.worker.cache_engine import num_blocks_for
from pagedlm.worker.model_runner import ModelRunner, SequenceGroupOutput, SequenceSample, TopLogprobs


class LLMEngine:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig) -> None:
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.tokenizer = get_tokenizer(model_config.model)
        self.eos_token_ids = _eos_token_ids(model_config, self.tokenizer.eos_token_id)
        self.model_runner = ModelRunner(model_config, cache_config, self.eos_token_ids)
        block_size = cache_config.block_size
        max_useful = scheduler_config.max_num_seqs * -(-model_config.max_model_len // block_size)
        num_blocks = num_blocks_for(model_config, cache_config, max_useful)
        self.model_runner.init_cache(cache_config, num_blocks)
        self.block_manager = BlockSpaceManager(block_size, num_blocks, enable_prefix_caching=cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}

    @property
    def vocab_size(self) -> int:
        return self.model_config.hf_config.vocab_size

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> str | None:
        """Why a request can never run, or ``None`` when it can."""
        n = len(prompt_token_ids)
        if n == 0:
            return "the prompt is empty"
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            return f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
        max_len = self.model_config.max_model_len
        if n >= max_len:
            return f"the prompt has {n} tokens; max_model_len is {max_len} and at least one token must be generated"
        if params.max_tokens is not None and n + params.max_tokens > max_len:
            return f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len ({max_len})"
        if not self.scheduler_config.enable_chunked_prefill and n > self.scheduler_config.max_num_batched_tokens:
            return f"the prompt has {n} tokens, over max_num_batched_tokens without chunked prefill"
        if params.best_of > self.scheduler_config.max_num_seqs:
            return f"best_of ({params.best_of}) exceeds max_num_seqs ({self.scheduler_config.max_num_seqs})"
        bm = self.block_manager
        if -(-n // bm.block_size) > bm.num_total_blocks - bm.watermark_blocks:
            return f"the prompt needs {-(-n // bm.block_size)} KV blocks; the cache has {bm.num_total_blocks}"
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.vocab_size:
                return f"{name} ({k}) exceeds the vocabulary size ({self.vocab_size})"
        if params.use_beam_search and (params.stop or params.logprobs is not None):
            return "stop strings and logprobs are not supported with use_beam_search"
        return None

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenizer(prompt).input_ids
        reason = self.check_request(prompt_token_ids, params)
        if reason is not None:
            raise ValueError(f"Request {request_id!r}: {reason}.")
        generators = None
        if params.seed is not None:
            generators = [torch.Generator(self.model_config.device).manual_seed(params.seed + i) for i in range(params.best_of)]
        seq_group = SequenceGroup(
            request_id, prompt, prompt_token_ids, params, self.cache_config.block_size,
            arrival_time if arrival_time is not None else time.monotonic(), generators,
        )
        if params.use_beam_search:
            max_new = self.model_config.max_model_len - len(prompt_token_ids)
            seq_group.beam = BeamSearchState(params, len(self.eos_token_ids), min(params.max_tokens or max_new, max_new))
        elif params.detokenize:
            self._add_detokenizer(seq_group.seqs[0], seq_group)
        self.scheduler.add_seq_group(seq_group)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_seqs()

    def abort_all(self) -> None:
        """Drop every unfinished request (e.g. after an interrupted ``generate``)."""
        for seq_group in self.scheduler.abort_all():
            for seq in seq_group.seqs:
                self.detokenizers.pop(seq.seq_id, None)

    def get_stats(self) -> dict[str, int | float]:
        bm = self.block_manager
        return {
            "num_kv_blocks": bm.num_total_blocks,
            "num_free_kv_blocks": bm.num_free_blocks,
            "peak_kv_blocks_in_use": bm.peak_blocks_in_use,
            "block_size": bm.block_size,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": bm.num_hit_tokens,
            "prefix_cache_queried_tokens": bm.num_queried_tokens,
            "prefix_cache_hit_rate": bm.num_hit_tokens / max(bm.num_queried_tokens, 1),
        }

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the outputs of the requests that finished in it."""
        sched = self.scheduler.schedule()
        if sched.is_empty():
            return []
        outputs = self.model_runner.execute_model(
            sched.scheduled_seq_groups, self.block_manager.block_tables, sched.blocks_to_copy
        )
        for scheduled in sched.scheduled_seq_groups:
            for seq, chunk in scheduled.token_chunks.items():
                seq.num_computed_tokens += chunk
        for out in outputs:
            self._process_group_output(out)
        return [self._request_output(g) for g in self.scheduler.free_finished_seq_groups()]

    def _process_group_output(self, out: SequenceGroupOutput) -> None:
        group = out.seq_group
        if out.prompt_logprobs:
            group.prompt_logprobs += [self._logprob_dict(p.token_id, p.logprob, p.top) for p in out.prompt_logprobs]
        if not out.samples:
            return
        if group.beam is not None:
            return self._process_beams(group, out)
        targets = []
        for sample in out.samples:  # fork from the parent's state before anything is appended
            seq = sample.parent
            if sample.child_index != seq.index:
                seq = seq.fork(sample.child_index)
                self.block_manager.fork(sample.parent, seq)
                group.seqs.append(seq)
                if group.sampling_params.detokenize:
                    self._add_detokenizer(seq, group)
            targets.append(seq)
        for seq, sample in zip(targets, out.samples):
            self._append(seq, group, sample)

    def _append(self, seq: Sequence, group: SequenceGroup, sample: SequenceSample) -> None:
        params = group.sampling_params
        seq.append_token(sample.token_id, sample.logprob)
        if params.logprobs is not None:
            seq.logprobs.append(self._logprob_dict(sample.token_id, sample.logprob, sample.top))
        new_text = ""
        if params.detokenize:
            new_text = self.detokenizers[seq.seq_id].step(sample.token_id)
            seq.output_text += new_text
        status = self._check_stop(seq, params, len(new_text))
        if status is not None:
            self._finish(seq, status)

    def _check_stop(self, seq: Sequence, params: SamplingParams, num_new_chars: int) -> SequenceStatus | None:
        token_id = seq.output_token_ids[-1]
        num_out = len(seq.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return SequenceStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                seq.stop_reason = token_id
                return SequenceStatus.FINISHED_STOPPED
            if params.stop and num_new_chars and self._cut_at_stop_string(seq, params, num_new_chars):
                return SequenceStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH_CAPPED
        if seq.num_tokens >= self.model_config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH_CAPPED
        return None

    @staticmethod
    def _cut_at_stop_string(seq: Sequence, params: SamplingParams, num_new_chars: int) -> bool:
        """Find the earliest stop string that the new text completes; cut the text there."""
        text = seq.output_text
        hits = []
        for stop in params.stop:
            # A match must end inside the new text, so start looking len(stop) - 1 chars before it.
            index = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
            if index >= 0:
                hits.append((index, stop))
        if not hits:
            return False
        index, stop = min(hits)
        seq.output_text = text[: index + len(stop)] if params.include_stop_str_in_output else text[:index]
        seq.stop_reason = stop
        return True

    def _process_beams(self, group: SequenceGroup, out: SequenceGroupOutput) -> None:
        params = group.sampling_params
        beams = [s.parent for s in out.samples]
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        candidates = group.beam.step(
            [b.output_token_ids for b in beams], [b.cumulative_logprob for b in beams], out.beam_logprobs, stop_ids
        )
        used = [False] * len(beams)
        next_beams = []
        for c in candidates:  # fork before any beam appends its own token
            parent = beams[c.parent]
            beam = parent if not used[c.parent] else parent.fork(0)
            if beam is not parent:
                self.block_manager.fork(parent, beam)
            used[c.parent] = True
            next_beams.append((beam, c))
        for parent, is_used in zip(beams, used):
            if not is_used:
                self._finish(parent, SequenceStatus.FINISHED_ABORTED)
        for beam, c in next_beams:
            beam.output_token_ids.append(c.token_id)
            beam.cumulative_logprob = c.cumulative_logprob
        group.seqs = [beam for beam, _ in next_beams]

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        self.block_manager.free(seq)
        detokenizer = self.detokenizers.pop(seq.seq_id, None)
        if detokenizer is not None and not isinstance(seq.stop_reason, str):
            seq.output_text += detokenizer.flush(seq.prompt_token_ids[-8:] + seq.output_token_ids)

    def _add_detokenizer(self, seq: Sequence, group: SequenceGroup) -> None:
        self.detokenizers[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, group.prompt_token_ids, group.sampling_params.skip_special_tokens
        )

    def _logprob_dict(self, token_id: int, logprob: float, top: TopLogprobs) -> dict[int, Logprob]:
        entries = {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(zip(top.token_ids, top.logprobs), start=1)}
        entries[token_id] = Logprob(logprob, top.rank)
        for t, entry in entries.items():
            entry.decoded_token = self.tokenizer.decode([t])
        return entries

    def _request_output(self, group: SequenceGroup) -> RequestOutput:
        params = group.sampling_params
        if group.beam is not None:
            outputs = [
                CompletionOutput(
                    index=i,
                    text=decode_completion(self.tokenizer, group.prompt_token_ids, h.token_ids, params)
                    if params.detokenize else "",
                    token_ids=h.token_ids,
                    cumulative_logprob=h.cumulative_logprob,
                    finish_reason="stop" if h.token_ids[-1] in self.eos_token_ids | set(params.stop_token_ids) else "length",
                )
                for i, h in enumerate(group.beam.finished[: params.n])
            ]
        else:
            seqs = sorted(group.seqs, key=lambda s: s.index)
            if params.best_of > params.n:
                seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: params.n]
            outputs = [
                CompletionOutput(
                    index=seq.index,
                    text=seq.output_text,
                    token_ids=seq.output_token_ids,
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=seq.logprobs if params.logprobs is not None else None,
                    finish_reason=seq.status.finish_reason,
                    stop_reason=seq.stop_reason,
                )
                for seq in seqs
            ]
        return RequestOutput(
            group.request_id, group.prompt, group.prompt_token_ids, group.prompt_logprobs, outputs, group.is_finished()
        )


def _eos_token_ids(model_config: ModelConfig, tokenizer_eos: int | None) -> set[int]:
    """EOS ids from generation_config.json (falling back to config.json) and the tokenizer."""
    try:
        eos = GenerationConfig.from_pretrained(model_config.model).eos_token_id
    except OSError:
        eos = getattr(model_config.hf_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return ids
