"""The engine: requests in, one scheduled model step at a time, ``RequestOutput``s out."""

import logging
import time

import torch
from transformers import GenerationConfig

from pagedlm.config import CacheConfig, ModelConfig, SchedulerConfig
from pagedlm.engine.block_manager import BlockSpaceManager
from pagedlm.engine.detokenizer import IncrementalDetokenizer
from pagedlm.engine.scheduler import Scheduler
from pagedlm.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedlm.outputs import CompletionOutput, RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.transformers_utils.tokenizer import get_tokenizer
from pagedlm.worker.cache_engine import num_blocks_for
from pagedlm.worker.model_runner import ModelRunner, SamplerOutput

logger = logging.getLogger("pagedlm")


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
        self.block_manager = BlockSpaceManager(block_size, num_blocks)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.stats = {"num_prompt_tokens": 0, "num_generated_tokens": 0}

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
        bm = self.block_manager
        if -(-n // bm.block_size) > bm.num_total_blocks - bm.watermark_blocks:
            return f"the prompt needs {-(-n // bm.block_size)} KV blocks; the cache has {bm.num_total_blocks}"
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
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.model_config.device).manual_seed(params.seed)
        seq_group = SequenceGroup(
            request_id, prompt, prompt_token_ids, params, self.cache_config.block_size,
            arrival_time if arrival_time is not None else time.monotonic(), generator,
        )
        for seq in seq_group.seqs:
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.scheduler.add_seq_group(seq_group)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_seqs()

    def abort_all(self) -> None:
        """Drop every unfinished request (e.g. after an interrupted ``generate``)."""
        for seq_group in self.scheduler.abort_all():
            for seq in seq_group.seqs:
                self.detokenizers.pop(seq.seq_id, None)

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the outputs of the requests that finished in it."""
        sched = self.scheduler.schedule()
        if sched.is_empty():
            return []
        result = self.model_runner.execute_model(
            sched.scheduled_seq_groups, self.block_manager.block_tables, sched.blocks_to_copy
        )
        for scheduled in sched.scheduled_seq_groups:
            for seq in scheduled.seq_group.get_seqs(SequenceStatus.RUNNING):
                if seq.num_computed_tokens == 0:
                    self.stats["num_prompt_tokens"] += len(seq.prompt_token_ids)
                seq.num_computed_tokens += scheduled.token_chunk_size
        self._process_sampler_output(result)
        finished = self.scheduler.free_finished_seq_groups()
        return [self._request_output(g) for g in finished]

    def _process_sampler_output(self, result: SamplerOutput) -> None:
        for seq_group, seq, token_id, logprob in zip(result.seq_groups, result.seqs, result.token_ids, result.logprobs):
            seq.append_token(token_id, logprob)
            seq.output_text += self.detokenizers[seq.seq_id].step(token_id)
            self.stats["num_generated_tokens"] += 1
            self._check_stop(seq, seq_group.sampling_params)

    def _check_stop(self, seq: Sequence, params: SamplingParams) -> None:
        token_id = seq.output_token_ids[-1]
        num_out = len(seq.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return self._finish(seq, SequenceStatus.FINISHED_STOPPED)
            if token_id in params.stop_token_ids:
                seq.stop_reason = token_id
                return self._finish(seq, SequenceStatus.FINISHED_STOPPED)
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return self._finish(seq, SequenceStatus.FINISHED_LENGTH_CAPPED)
        if seq.num_tokens >= self.model_config.max_model_len:
            return self._finish(seq, SequenceStatus.FINISHED_LENGTH_CAPPED)

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        self.block_manager.free(seq)
        detokenizer = self.detokenizers.pop(seq.seq_id)
        seq.output_text += detokenizer.flush(seq.prompt_token_ids[-8:] + seq.output_token_ids)

    @staticmethod
    def _request_output(seq_group: SequenceGroup) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=i,
                text=seq.output_text,
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                finish_reason=seq.status.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for i, seq in enumerate(seq_group.seqs)
        ]
        return RequestOutput(
            seq_group.request_id, seq_group.prompt, seq_group.prompt_token_ids, outputs, seq_group.is_finished()
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
