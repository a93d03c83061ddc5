"""The engine: requests in, one scheduled model step at a time, ``RequestOutput``s out."""

import gc
import logging
import math
import numbers
import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pagedlm.config import (
    CacheConfig, ModelConfig, ReasoningConfig, SchedulerConfig, StructuredOutputsConfig, check_free_gpu_memory,
)
from pagedlm.engine.bad_words import bad_words_token_ids, banned_by_bad_words
from pagedlm.engine.beam_search import BeamSearchState
from pagedlm.engine.block_manager import BlockSpaceManager
from pagedlm.engine.detokenizer import (
    MAX_CONTEXT_TOKENS,
    IncrementalDetokenizer,
    decode_completion,
    decode_in_context,
    with_taken_texts,
)
from pagedlm.engine.reasoning_gate import END_FED, FREE, ReasoningParser
from pagedlm.engine.scheduler import ScheduledSequenceGroup, Scheduler, SchedulerOutputs
from pagedlm.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedlm.engine.stop_checker import StopChecker
from pagedlm.engine.structured_outputs import StructuredOutputManager
from pagedlm.engine.thinking_budget import ReasoningTokens, ThinkingBudget
from pagedlm.inputs import PromptType, parse_prompt, parse_tokenization_kwargs
from pagedlm.logprobs import Logprob, SampleLogprobs
from pagedlm.outputs import RequestOutput
from pagedlm.sampling_params import RequestOutputKind, SamplingParams
from pagedlm.step import SequenceData, SequenceGroupMetadata, SequenceGroupOutput, SequenceOutput, TopLogprobs
from pagedlm.transformers_utils.generation_config import eos_token_ids
from pagedlm.transformers_utils.tokenizer import encode_prompts, get_tokenizer, num_special_tokens_before_text
from pagedlm.utils import FieldError, cdiv, deferred_signals, is_integer, run_uninterrupted
from pagedlm.worker.cache_engine import determine_num_kv_blocks
from pagedlm.worker.model_runner import ModelRunner


logger = logging.getLogger("pagedlm")


# The prefix-cache salt of LongRoPE sequences past the threshold (their K/V use the long factors),
# paired with the request's own salt.
_LONG_ROPE_SALT = "long_rope"


def _with_entry(logprobs: SampleLogprobs, entry: dict[int, Logprob]) -> SampleLogprobs:
    """A copy of ``logprobs`` (a list or a ``FlatLogprobs``) with ``entry`` appended."""
    extended = logprobs[:]
    extended.append(entry)
    return extended


# How a grammar is made to hold from the first token, in both of pagedlm's places.
_IN_REASONING = ("LLM(structured_outputs_config={'enable_in_reasoning': True}); pagedlm run: "
                 "--structured-outputs-config '{\"enable_in_reasoning\": true}'")


def _feed_constraint(seq: Sequence, token_id: int, stop_token_ids: Collection[int] = (),
                     end_token_id: int | None = None) -> tuple[bool, str | None]:
    """Feed a sequence's new token to its reasoning gate and grammar: (the grammar ended, why the
    completion must abort or None). A token still inside the reasoning is free; the one that ends
    it is fed to the grammar when the parser says so. One of the request's ``stop_token_ids`` is
    fed as ``end_token_id`` (an EOS id): it ends the grammar where the grammar can end, which its
    mask allowed it only at (``StructuredOutputManager.end_at``), and aborts the completion where a
    logits processor forced it elsewhere."""
    if seq.grammar_matcher is None:
        return False, None
    stop_id = None
    if token_id in stop_token_ids and seq.reasoning_gate is None and end_token_id is not None:
        stop_id, token_id = token_id, end_token_id
    feeds_grammar, ends_reasoning = True, False
    if seq.reasoning_gate is not None:
        taken = seq.reasoning_gate.take(token_id)
        feeds_grammar = ends_reasoning = taken == END_FED
        if taken != FREE:
            seq.reasoning_gate = None
    if not feeds_grammar:
        return False, None
    if not seq.grammar_matcher.accept_token(token_id):
        if ends_reasoning:
            return False, (f"token {token_id}, sampled freely in the reasoning, ended it but is not one its "
                           "structured output allows")
        if stop_id is not None:  # a hunt: blamed a logits processor or ban
            return False, (f"token {stop_id} is one of its stop_token_ids, which ends the completion, and its "
                           "structured output cannot end there")
        return False, ("no token its structured output allows was left to sample (logits processors, bans, or "
                       "its stop_token_ids where the structured output cannot end, removed them all)")
    return seq.grammar_matcher.is_terminated(), None


def _long_rope_salt(cache_salt: str | None) -> tuple[str, str | None]:
    return (_LONG_ROPE_SALT, cache_salt)


def _is_long_rope_salt(cache_salt: object) -> bool:
    return isinstance(cache_salt, tuple)


class LLMEngine:
    """Holds every request's state, schedules each step and turns the worker's samples into
    ``RequestOutput``s (vLLM's ``LLMEngine``). ``LLM`` drives it; so can a caller that wants
    results step by step: ``add_request`` any time, ``step`` while ``has_unfinished_requests``."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 reasoning_config: ReasoningConfig | None = None,
                 structured_outputs_config: StructuredOutputsConfig | None = None) -> None:
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.tokenizer = get_tokenizer(model_config.tokenizer or model_config.model, model_config.trust_remote_code,
                                       model_config.chat_template)
        # thinking_token_budget's start and end tokens (None: no request may set it)
        self.reasoning_tokens = (None if reasoning_config is None
                                 else ReasoningTokens.of(reasoning_config, self.tokenizer))
        self._specials_before_text = num_special_tokens_before_text(self.tokenizer)
        # What skip_special_tokens leaves out of a text (tokenizers' decoders skip these).
        self._special_token_ids = {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        eos = eos_token_ids(model_config.generation_config_dir, model_config.hf_config, self.tokenizer.eos_token_id)
        self.stop_checker = StopChecker(eos, self.tokenizer.eos_token_id)
        sized = cache_config.num_kv_blocks is not None or cache_config.kv_cache_memory_bytes is not None
        utilization = cache_config.gpu_memory_utilization
        free_at_start = None if sized else check_free_gpu_memory(model_config.device, utilization)
        self.model_runner = ModelRunner(model_config, cache_config, scheduler_config.max_num_seqs)
        self.seq_groups: dict[str, SequenceGroup] = {}  # unfinished requests by id
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._structured_outputs: StructuredOutputManager | None = None  # made on first use
        # The parser whose reasoning end a request's grammar waits for (reasoning_gate.py), or why this
        # tokenizer cannot have it (each constrained request is refused with it); None: no waiting.
        structured = self.structured_outputs_config = structured_outputs_config or StructuredOutputsConfig()
        # The LLM's reasoning parser (or why this tokenizer cannot have it), which chat outputs are
        # split by (pagedlm run), and the gate's where grammars wait for the end of the reasoning.
        self.reasoning_parser: ReasoningParser | ValueError | None = None
        if structured.reasoning_parser:
            try:
                self.reasoning_parser = ReasoningParser.of(structured.reasoning_parser, self.tokenizer)
            except ValueError as exc:
                self.reasoning_parser = exc
        self.reasoning_gate_parser = None if structured.enable_in_reasoning else self.reasoning_parser
        max_useful = scheduler_config.max_num_seqs * cdiv(model_config.max_model_len, cache_config.block_size)
        num_kv_blocks = determine_num_kv_blocks(model_config, cache_config, max_useful, free_at_start)
        if cache_config.calculate_kv_scales:
            self._calculate_kv_scales()
        self._init_cache(num_kv_blocks, scheduler_config, enable_prefix_caching=cache_config.enable_prefix_caching)
        self._log_memory_plan()

    def _init_cache(self, num_kv_blocks: int, scheduler_config: SchedulerConfig, **block_manager_options: Any) -> None:
        """A KV cache of ``num_kv_blocks`` blocks, with the block manager and scheduler over it."""
        self.model_runner.init_cache(num_kv_blocks)
        self.block_manager = BlockSpaceManager(self.cache_config.block_size, num_kv_blocks, **block_manager_options)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)

    def _calculate_kv_scales(self) -> None:
        """vLLM's ``calculate_kv_scales``: every layer's fp8 KV-cache scales from one prefill of random
        tokens (seeded, so the same model gets the same scales), fixed from then on. The prompt is
        1,024 tokens (``max_model_len - 1`` where that is fewer) and runs in one pass, on a cache of
        its own that holds it, freed before the engine's is made: the scales (and every result after)
        do not depend on the step budget or the engine's cache size. Its token is greedy, so it draws
        nothing from the generator ``LLM(seed=)`` seeds."""
        rng = random.Random(0)
        length = min(self.model_config.max_model_len - 1, 1024)
        one_pass = replace(self.scheduler_config,
                           max_num_batched_tokens=max(self.scheduler_config.max_num_batched_tokens, length))
        self._init_cache(cdiv(length + 1, self.cache_config.block_size), one_pass, watermark=0.0,
                         enable_prefix_caching=False)
        self.model_runner.calculate_kv_scales_next_step()
        self.add_request("pagedlm-kv-scale-calibration", [rng.randrange(self.vocab_size) for _ in range(length)],
                         SamplingParams(temperature=0.0, max_tokens=1, detokenize=False))
        while self.has_unfinished_requests():
            self.step()
        self.model_runner.free_cache()
        scales = self.model_runner.kv_cache_scales()
        logger.info("KV-cache scales from %d random tokens: k_scale %.3g to %.3g, v_scale %.3g to %.3g.", length,
                    min(k for k, _ in scales), max(k for k, _ in scales), min(v for _, v in scales),
                    max(v for _, v in scales))

    @property
    def vocab_size(self) -> int:
        return self.model_config.hf_config.vocab_size

    def truncate_prompt(self, prompt_token_ids: list[int], *limits: int | None, from_text: bool = False,
                        side: str | None = None) -> list[int]:
        """The prompt cut to ``k`` tokens, ``k`` the smallest of ``limits`` (``truncate_prompt_tokens``
        values: None is no limit, -1 ``max_model_len - 1``). By default its last ``k``: vLLM's
        left truncation, where a prompt the tokenizer encoded from text (``from_text``) keeps the
        special tokens it put first (a BOS), as the tokenizer's own truncation, which vLLM uses,
        keeps them. ``side`` is vLLM's explicit ``truncation_side``, which slices the ids as they
        are: "left" keeps the last ``k`` (a BOS among the cut), "right" the first ``k``."""
        max_len = self.model_config.max_model_len
        keep = min((max_len - 1 if k == -1 else k for k in limits if k is not None), default=None)
        if keep is None or len(prompt_token_ids) <= keep:
            return prompt_token_ids
        if side == "right":
            return prompt_token_ids[:keep]
        first = min(self._specials_before_text, keep) if from_text and side is None else 0
        return prompt_token_ids[:first] + prompt_token_ids[len(prompt_token_ids) - keep + first:]

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams,
                      wait_for_grammar: bool = True) -> FieldError | None:
        """Why a request can never run, naming the ``SamplingParams`` field at fault (or "prompt"),
        or ``None`` when it can. A structured-outputs constraint is compiled here (once per distinct
        one) and checked (``check_constraint``); with ``wait_for_grammar=False`` its compilation
        only starts, and ``check_constraint`` says later whether it can run."""
        n = len(prompt_token_ids)
        if n == 0:
            return FieldError("the prompt is empty", "prompt")
        vocab_size = self.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        if bad:
            return FieldError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", "prompt")
        max_len = self.model_config.max_model_len
        if params.truncate_prompt_tokens is not None and params.truncate_prompt_tokens > max_len:
            # As tokenization_kwargs' (parse_tokenization_kwargs) and vLLM's processor say it.
            return FieldError(f"truncate_prompt_tokens ({params.truncate_prompt_tokens}) cannot be greater than "
                              f"max_model_len ({max_len})", "truncate_prompt_tokens")
        if n >= max_len:
            return FieldError(f"the prompt has {n} tokens; max_model_len is {max_len} and at least one token must be "
                              "generated", "prompt")
        if params.max_tokens is None and params.min_tokens > max_len - n:
            return FieldError(f"min_tokens ({params.min_tokens}) must be <= max_tokens, which is max_model_len "
                              f"({max_len}) less the prompt's {n} tokens when not given (vLLM's rule)", "min_tokens")
        if not self.scheduler_config.enable_chunked_prefill and n > self.scheduler_config.max_num_batched_tokens:
            return FieldError(f"the prompt has {n} tokens, over max_num_batched_tokens without chunked prefill",
                              "prompt")
        if params.thinking_token_budget is not None and self.reasoning_tokens is None:
            return FieldError("thinking_token_budget needs the model's reasoning start and end strings: "
                              "LLM(reasoning_parser=...) or LLM(reasoning_config=ReasoningConfig(...)) "
                              "(pagedlm run: --reasoning-parser)", "thinking_token_budget")
        if params.best_of > self.scheduler_config.max_num_seqs:
            split = " (LLM.generate runs a larger n, with best_of == n, as several requests)" \
                if params.best_of == params.n and not params.use_beam_search else ""
            return FieldError(f"{params.best_of_field} ({params.best_of}) exceeds max_num_seqs "
                              f"({self.scheduler_config.max_num_seqs}): the engine runs a request's sequences "
                              f"together{split}", params.best_of_field)
        # A sequence stops with "length" at max_model_len whatever max_tokens says (vLLM's
        # check_stop); only the KV cache's room refuses a request.
        max_seq_len = self._max_seq_len(n, params.best_of)
        max_tokens = params.max_tokens if params.trace_decode_token_ids is None else self._fit_trace(params, n)[1]
        if n >= max_seq_len or (max_tokens is not None and min(n + max_tokens, max_len) > max_seq_len):
            bm = self.block_manager
            wanted = f"{n} prompt tokens" + (f" + max_tokens ({max_tokens})" if max_tokens is not None else " + 1")
            return FieldError(f"{wanted} do not fit the KV cache: its {bm.num_kv_blocks} KV blocks of {bm.block_size} "
                              f"tokens hold at most {max_seq_len} tokens for each of the request's {params.best_of} "
                              "sequence(s) at once", "prompt" if n >= max_seq_len else "max_tokens")
        scored_rows = params.prompt_logprob_token_ids or ()
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids or ()),
                          ("logit_bias", params.logit_bias or ()), ("logprob_token_ids", params.logprob_token_ids or ()),
                          ("trace_decode_token_ids", params.trace_decode_token_ids or ()),
                          ("prompt_logprob_token_ids", {t for row in scored_rows for t in row if t != -1})):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                return FieldError(f"{name} {bad[:5]} are outside the vocabulary [0, {vocab_size})", name)
        if params.trace_decode_token_ids is not None and not self.model_config.enable_trace_replay:
            return FieldError("trace_decode_token_ids needs LLM(enable_trace_replay=True) (pagedlm run and vLLM: "
                              "--enable-trace-replay)", "trace_decode_token_ids")
        max_logprobs = self.model_config.max_logprobs
        if scored_rows:
            num_rows = max(n - 1 - (params.prompt_logprob_start or 0), 0)
            if len(scored_rows) != num_rows:
                return FieldError(f"prompt_logprob_token_ids has {len(scored_rows)} rows, but the prompt has "
                                  f"{num_rows} scored rows (prompt_len - 1 - prompt_logprob_start)",
                                  "prompt_logprob_token_ids")
            if max_logprobs not in (None, -1) and len(scored_rows[0]) > max_logprobs:
                return FieldError(f"prompt_logprob_token_ids has {len(scored_rows[0])} ids a row, over max_logprobs "
                                  f"({max_logprobs}), the LLM's limit (LLM(max_logprobs=...))", "prompt_logprob_token_ids")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab_size:
                return FieldError(f"{name} ({k}) exceeds the vocabulary size ({vocab_size})", name)
            if k is not None and max_logprobs not in (None, -1) and (vocab_size if k == -1 else k) > max_logprobs:
                return FieldError(f"{name} ({'-1, the vocabulary' if k == -1 else k}) exceeds max_logprobs "
                                  f"({max_logprobs}), the LLM's limit (LLM(max_logprobs=...); pagedlm run: --max-logprobs)", name)
        try:
            bad_words = bad_words_token_ids(self.tokenizer, params.bad_words or ())
        except FieldError as error:
            return error
        # Banned at some step whatever came before: one-token bad words always, stop tokens until min_tokens.
        stops = self.stop_checker.all_stop_token_ids(params) if params.min_tokens else set()
        if params.allowed_token_ids or len(params.bad_words or ()) + len(stops) >= vocab_size:
            banned = {ids[0] for ids in bad_words if len(ids) == 1}
            banned |= stops
            why = ("banned at some step (one-token bad_words, or stop tokens while min_tokens holds): nothing could be "
                   "sampled there")
            if params.allowed_token_ids and set(params.allowed_token_ids) <= banned:
                return FieldError(f"allowed_token_ids {sorted(params.allowed_token_ids)[:5]} are all {why}",
                                  "allowed_token_ids")
            if (not params.allowed_token_ids and len(banned) >= vocab_size
                    and sum(0 <= t < vocab_size for t in banned) == vocab_size):
                return FieldError(f"every token of the vocabulary is {why}",
                                  "stop_token_ids" if params.min_tokens and params.stop_token_ids else "bad_words")
        if params.use_beam_search and params.stop:
            return FieldError("stop strings are not supported with use_beam_search", "stop")
        if params.structured_outputs is not None:
            if self.structured_outputs.tokenizer_problem:
                return FieldError(self.structured_outputs.tokenizer_problem, "structured_outputs")
            if isinstance(self.reasoning_gate_parser, ValueError):
                return FieldError(f"structured_outputs: {self.reasoning_gate_parser}, so it cannot wait for the end of "
                                  f"the reasoning ({_IN_REASONING} holds it from the first token)", "structured_outputs")
            if params.use_beam_search and self.reasoning_gate_parser is not None:
                return FieldError("structured_outputs with beam search cannot wait for the end of the reasoning "
                                  f"({_IN_REASONING} holds it from the first token)", "structured_outputs")
            if params.thinking_token_budget is not None and self.reasoning_gate_parser is None:
                return FieldError("thinking_token_budget with structured_outputs needs the grammar to wait for the end "
                                  "of the reasoning (LLM(reasoning_parser=...), without structured_outputs_config's "
                                  "enable_in_reasoning): else it would hold from the first token, thinking included",
                                  "thinking_token_budget")
            if wait_for_grammar:
                return self.check_constraint(params)
            self.structured_outputs.compile_async(params.structured_outputs)
        return None

    def check_constraint(self, params: SamplingParams) -> FieldError | None:
        """Why a request's structured-outputs constraint cannot run (waiting for it to compile):
        it does not compile, its own stop ids mask every token it can start with, or
        ``allowed_token_ids`` hold none of them."""
        manager = self.structured_outputs
        compiling = manager.compile_async(params.structured_outputs)
        if compiling.exception() is not None:
            return FieldError(str(compiling.exception()), "structured_outputs")
        own_stops = self._own_stops(params)
        if params.allowed_token_ids or own_stops:
            start = manager.bitmask(manager.new_matcher(params.structured_outputs))
            manager.end_at(start, own_stops)
            if not start.any():
                return FieldError("stop_token_ids are every token structured_outputs lets the output start with "
                                  "(a stop id ends a grammar only where it can end)", "stop_token_ids")
            if params.allowed_token_ids and not manager.allows_any_of(start, params.allowed_token_ids):
                return FieldError("allowed_token_ids hold none of the tokens structured_outputs lets the output "
                                  "start with", "allowed_token_ids")
        return None

    def _own_stops(self, params: SamplingParams) -> list[int]:
        """A request's stop ids that are no EOS id: under a grammar they end it (vLLM's
        ``all_stop_token_ids`` are its matcher's stop tokens), allowed only where it can end."""
        return sorted(set(params.stop_token_ids) - self.stop_checker.eos_token_ids)

    @property
    def structured_outputs(self) -> StructuredOutputManager:
        """The structured-outputs manager (xgrammar), made when the first constrained request comes."""
        if self._structured_outputs is None:
            self._structured_outputs = StructuredOutputManager(
                self.tokenizer, self.vocab_size, sorted(self.stop_checker.eos_token_ids),
                self.structured_outputs_config.disable_any_whitespace)
        return self._structured_outputs

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
        lora_request: None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: None = None,
        priority: int = 0,
    ) -> str:
        """Queue one request; it runs from the next ``step`` on. vLLM's signature.

        Args:
            request_id: names the request in its outputs and in ``abort_request``; unique among
                unfinished requests.
            prompt: a str, ``TextPrompt``, ``TokensPrompt`` or list of token ids (``inputs.parse_prompt``);
                text is tokenized with the model's tokenizer. Its ``cache_salt`` keeps its blocks
                from being shared with requests of another salt (or none) in the prefix cache.
            params: how to generate its completions. The request keeps a checked copy
                (``SamplingParams.clone``): changing ``params`` afterwards does not change it.
            arrival_time: ``time.monotonic()`` seconds, default now; kept on the request. Requests
                are scheduled in the order they are added (the last admitted is preempted first), as
                vLLM's FCFS policy does, whatever their arrival times.
            lora_request: None (pagedlm has no LoRA adapters).
            tokenization_kwargs: ``truncate_prompt_tokens``, ``truncation_side`` and
                ``add_special_tokens`` (``inputs.TokenizationKwargs``).
            trace_headers: None (pagedlm exports no traces).
            priority: 0 (requests are scheduled first come, first served).

        Returns:
            ``request_id``.

        Raises:
            TypeError: ``request_id`` is not a str.
            ValueError: ``request_id`` is in use, the prompt or a field of ``params`` is invalid (one
                set after construction included), the request can never run (``check_request``
                says why), or an argument pagedlm has no use for is set.
        """
        self._check_open()
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}.")
        if request_id in self.seq_groups:
            raise ValueError(f"Request {request_id!r} is already running; request ids must be unique.")
        if lora_request is not None:
            raise ValueError("lora_request: pagedlm runs no LoRA adapters; pass None.")
        if trace_headers is not None:
            raise ValueError("trace_headers: pagedlm exports no traces; pass None.")
        if not is_integer(priority) or priority != 0:
            raise ValueError(f"priority must be 0 (pagedlm schedules first come, first served), got {priority!r}.")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"Request {request_id!r}: params must be a SamplingParams, got {type(params).__name__}.")
        if arrival_time is not None and (isinstance(arrival_time, bool) or not isinstance(arrival_time, numbers.Real)
                                         or not math.isfinite(arrival_time)):
            raise ValueError(f"arrival_time must be None or time.monotonic() seconds (a finite number), got {arrival_time!r}.")
        params = params.clone()
        tokenization = parse_tokenization_kwargs(tokenization_kwargs, self.model_config.max_model_len)
        try:
            parsed = parse_prompt(prompt)
        except FieldError as exc:
            raise FieldError(f"Request {request_id!r}: {str(exc).rstrip('.')}.", exc.field) from None
        prompt_token_ids, from_text = parsed.token_ids, False
        if prompt_token_ids is None:
            from_text = tokenization.add_special_tokens is not False
            prompt_token_ids = encode_prompts(self.tokenizer, [parsed.text], from_text)[0]
        prompt_token_ids = self.truncate_prompt(prompt_token_ids, params.truncate_prompt_tokens,
                                                tokenization.truncate_prompt_tokens, from_text=from_text,
                                                side=tokenization.truncation_side)
        if params.trace_decode_token_ids is not None:
            params.trace_decode_token_ids, params.max_tokens = self._fit_trace(params, len(prompt_token_ids))
            params.ignore_eos = True  # vLLM's: an EOS in the trace does not end its replay
        reason = self.check_request(prompt_token_ids, params)
        if reason is not None:
            raise FieldError(f"Request {request_id!r}: {str(reason).rstrip('.')}.", reason.field)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(params, name) == -1:  # vLLM's "the whole vocabulary" (the request's own copy)
                setattr(params, name, self.vocab_size)
        generators = None
        if params.seed is not None:
            generators = [torch.Generator(self.model_config.device).manual_seed(params.seed + i) for i in range(params.best_of)]
        long_rope = self.model_runner.long_rope
        cache_salt = parsed.cache_salt
        if long_rope is not None and len(prompt_token_ids) > long_rope.threshold:
            cache_salt = _long_rope_salt(cache_salt)
        seq_group = SequenceGroup(
            request_id, parsed.text, prompt_token_ids, params, self.cache_config.block_size,
            arrival_time if arrival_time is not None else time.monotonic(), generators, cache_salt,
        )
        seq_group.max_seq_len = self._max_seq_len(len(prompt_token_ids), params.best_of)
        seq_group.stream_interval = max(params.stream_interval or 1, self.scheduler_config.stream_interval)
        if params.bad_words:
            seq_group.bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)
        if params.use_beam_search:
            max_new = seq_group.max_seq_len - len(prompt_token_ids)
            seq_group.beam = BeamSearchState(params, min(params.max_tokens or max_new, max_new),
                                             constrained=params.structured_outputs is not None)
        if params.structured_outputs is not None:
            seq_group.seqs[0].grammar_matcher = self.structured_outputs.new_matcher(params.structured_outputs)
            if self.reasoning_gate_parser is not None:
                seq_group.seqs[0].reasoning_gate = self.reasoning_gate_parser.gate(prompt_token_ids)
        if params.thinking_token_budget is not None:
            seq_group.seqs[0].thinking = ThinkingBudget.for_prompt(params.thinking_token_budget, self.reasoning_tokens,
                                                                   prompt_token_ids)
        with deferred_signals():
            if params.detokenize and not params.use_beam_search:
                self._add_detokenizer(seq_group.seqs[0], seq_group)
            self.seq_groups[request_id] = seq_group
            self.scheduler.add_seq_group(seq_group)
        return request_id

    def _fit_trace(self, params: SamplingParams, num_prompt_tokens: int) -> tuple[list[int], int]:
        """vLLM's trace replay of a request: its ``trace_decode_token_ids`` cut to what
        ``max_model_len`` leaves after the prompt, and its ``max_tokens`` cut to the trace's length
        (the completion ends when the trace does: an EOS in it does not end it)."""
        trace = params.trace_decode_token_ids[: max(self.model_config.max_model_len - num_prompt_tokens, 1)]
        return trace, len(trace) if params.max_tokens is None else min(len(trace), params.max_tokens)

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokenizer

    def get_num_unfinished_requests(self) -> int:
        """Added requests not finished or aborted yet; one of ``n`` completions counts once (as
        vLLM's v0 engine counted it; its V1 engine counts the ``n`` child requests)."""
        return len(self.seq_groups)

    def has_unfinished_requests(self) -> bool:
        """Whether any added request has not finished (or been aborted) yet."""
        return bool(self.seq_groups)

    def abort_request(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        """Stop one or more unfinished requests and free their KV blocks; they produce no more
        outputs. Ids of finished or unknown requests are skipped, as in vLLM. ``internal``: vLLM's
        choice between the ids given to ``add_request`` and its own suffixed ones; pagedlm's are the
        ids given, so both read them alike.

        Raises:
            TypeError: ``request_id`` is not a str or an iterable of them, or ``internal`` not a bool.
        """
        if not isinstance(internal, bool):
            raise TypeError(f"internal must be a bool, got {internal!r}.")
        if not isinstance(request_id, (str, Iterable)):
            raise TypeError(f"request_id must be a str or an iterable of str, got {type(request_id).__name__}.")
        request_ids = {request_id} if isinstance(request_id, str) else set(request_id)
        with deferred_signals():
            for seq_group in self.scheduler.abort_seq_groups(request_ids):
                del self.seq_groups[seq_group.request_id]
                for seq in seq_group.seqs:
                    self.detokenizers.pop(seq.seq_id, None)

    def close(self) -> None:
        """Abort every request and release the KV cache and the weights."""
        self.abort_request(list(self.seq_groups))
        self.model_runner.close()
        if self._structured_outputs is not None:
            self._structured_outputs.close()
        gc.collect()  # tensors that reference cycles among the released objects hold

    def _check_open(self) -> None:
        if self.model_runner.model is None:
            raise RuntimeError("This engine is closed (its KV cache and weights were released).")

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (e.g. to time a cold start). Returns True (vLLM's:
        whether it was reset; here it always is, blocks in use staying where they are)."""
        self.block_manager.reset_prefix_cache()
        return True

    def reset_peak_kv_blocks_in_use(self) -> None:
        """Start the ``peak_kv_blocks_in_use`` statistic afresh from the blocks in use now."""
        self.block_manager.reset_peak_blocks_in_use()

    def _max_seq_len(self, num_prompt_tokens: int, best_of: int) -> int:
        """The longest each of a request's sequences may grow: ``max_model_len``, and what the KV
        cache holds with all ``best_of`` of them that long at once (the prompt's full blocks
        shared), so a request that is admitted can always be run to its end. Where Phi-3's
        LongRoPE recomputes the sequences that grew past its threshold under a salt of their own
        (``_recompute_past_long_rope_threshold``), siblings on both sides of it hold two copies
        of the prompt's blocks, unless the sequences stop at the threshold."""
        bm = self.block_manager
        shared = num_prompt_tokens // bm.block_size

        def longest(copies: int) -> int:
            own = (bm.num_kv_blocks - bm.watermark_blocks - copies * shared) // best_of
            return min(self.model_config.max_model_len, (shared + own) * bm.block_size)

        long_rope = self.model_runner.long_rope
        if best_of > 1 and long_rope is not None and long_rope.whole_sequence \
                and num_prompt_tokens <= long_rope.threshold:
            return max(min(longest(1), long_rope.threshold), longest(2))
        return longest(1)

    def _log_memory_plan(self) -> None:
        bm = self.block_manager
        num_tokens = bm.num_kv_blocks * bm.block_size
        logger.info(
            "Memory plan: weights %.2f GiB (%s); KV cache %d blocks = %d tokens of KV cache (%.2f GiB, %s, block_size %d); "
            "longest sequence %d tokens (max_model_len %d).",
            self.model_runner.weight_bytes() / 2**30, str(self.model_config.dtype).removeprefix("torch."),
            bm.num_kv_blocks, num_tokens, self.model_runner.cache_engine.num_bytes / 2**30,
            str(self.model_runner.cache_engine.key_caches[0].dtype).removeprefix("torch."), bm.block_size,
            self._max_seq_len(0, best_of=1), self.model_config.max_model_len,
        )

    def get_stats(self) -> dict[str, int | float]:
        bm = self.block_manager
        return {
            "num_kv_blocks": bm.num_kv_blocks,
            "num_free_kv_blocks": bm.num_free_blocks,
            "peak_kv_blocks_in_use": bm.peak_blocks_in_use,
            "block_size": bm.block_size,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": bm.num_hit_tokens,
            "prefix_cache_queried_tokens": bm.num_queried_tokens,
            "prefix_cache_hit_rate": bm.num_hit_tokens / max(bm.num_queried_tokens, 1),
        }

    def step(self) -> list[RequestOutput]:
        """Run one iteration: schedule, run the model once, sample, append and check stops.

        Returns one ``RequestOutput`` for every request that took part in the step and sampled
        (not one whose prompt is still being prefilled in chunks), as its
        ``SamplingParams.output_kind`` asks (``CUMULATIVE``: as it stands after the step; ``DELTA``:
        what the step added; ``FINAL_ONLY``: only once it is done). ``finished`` tells whether it
        is done; a finished request is not returned again. Raises whatever scheduling or the model
        step raised (a logits processor's error, an interrupt); every unfinished request then goes
        back to the queue to be computed again (``Scheduler.requeue``), and the prefix cache is reset
        because the step's blocks may not have been written, so greedy and seeded requests give the
        same outputs when stepping goes on (an unseeded one draws anew: its draws come from the
        engine's generator in the order of the rows a step samples). SIGINT or SIGTERM arriving
        once the model has run is held until the step's outputs are applied (``deferred_signals``)
        and raised then; the requests that finished in that step are not returned.
        """
        self._check_open()
        drawn: list[tuple[torch.Generator, torch.Tensor]] = []  # seeded generators' states before the step
        applying = False
        try:
            sched = self.scheduler.schedule()
            if sched.is_empty():
                return []
            metadata = [self._seq_group_metadata(scheduled) for scheduled in sched.scheduled_seq_groups]
            # A failed step's draws are undone, so that stepping on draws them again.
            drawn = [(g, g.get_state()) for s in sched.scheduled_seq_groups for g in s.seq_group.generators or ()]
            outputs = self.model_runner.execute_model(metadata, sched.blocks_to_copy)
            with deferred_signals():
                applying = True
                request_outputs = self._apply_step(sched, outputs)
        except BaseException:
            if not applying:  # the model's results are dropped, as if the step had not run (a hunt: an
                # interrupt just after the model ran, before the hold, kept its draws and lost its outputs)
                def undo() -> None:
                    for generator, state in drawn:
                        generator.set_state(state)
                    self.scheduler.requeue(list(self.seq_groups.values()))  # the prefix cache goes too

                run_uninterrupted(undo)
            raise
        return request_outputs

    def _apply_step(self, sched: SchedulerOutputs, outputs: list[SequenceGroupOutput]) -> list[RequestOutput]:
        """A step's model outputs applied to its requests, under ``deferred_signals``."""
        self.block_manager.finish_step()
        # A request a logits processor aborted during the step is gone: it gets nothing more (vLLM's
        # scheduler skips such requests too).
        live = [(s, o) for s, o in zip(sched.scheduled_seq_groups, outputs)
                if self.seq_groups.get(s.seq_group.request_id) is s.seq_group]
        for scheduled, output in live:
            for seq, chunk in scheduled.token_chunks.items():
                seq.num_computed_tokens += chunk
            self._process_group_output(scheduled.seq_group, output)
        if self.model_runner.long_rope is not None and self.model_runner.long_rope.whole_sequence:
            self._recompute_past_long_rope_threshold([s for s, _ in live])
        # A prompt chunk that sampled nothing makes no output (as in vLLM).
        request_outputs = [out for s, o in live
                           if (o.samples or s.seq_group.is_finished()) and (out := RequestOutput.from_seq_group(s.seq_group))]
        for seq_group in self.scheduler.free_finished_seq_groups():
            del self.seq_groups[seq_group.request_id]
        return request_outputs

    def _recompute_past_long_rope_threshold(self, scheduled: list[ScheduledSequenceGroup]) -> None:
        """A LongRoPE sequence that grew past the threshold takes the long factors at every position
        (``model_input._long_rope_positions``) in Phi-3: its KV, computed with the short ones, is
        recomputed, as transformers' Phi-3 drops its cache at that point. Its blocks get a salt of
        their own in the prefix cache."""
        threshold = self.model_runner.long_rope.threshold
        for s in scheduled:
            group = s.seq_group
            crossed = [seq for seq in group.get_seqs(SequenceStatus.RUNNING)
                       if not _is_long_rope_salt(seq.cache_salt) and seq.num_tokens > threshold]
            if crossed:
                # Per sequence: a sibling still under the threshold keeps the short factors and
                # shares no block with the ones past it (their block keys differ by the salt).
                for seq in crossed:
                    seq.set_cache_salt(_long_rope_salt(seq.cache_salt))
                self.scheduler.recompute(group)

    def _seq_group_metadata(self, scheduled: ScheduledSequenceGroup) -> SequenceGroupMetadata:
        """What the worker needs of one scheduled group: per sequence its chunk and block table,
        how many tokens its last row samples and with which generators, and which prompt
        logprobs the chunk produces (those of the group's first scheduled sequence)."""
        group = scheduled.seq_group
        params = group.sampling_params
        fans_out = group.fans_out()
        block_tables = self.block_manager.block_tables
        span_taken = False
        seq_data = []
        for seq, chunk in scheduled.token_chunks.items():
            start = seq.num_computed_tokens
            data = SequenceData(seq.seq_id, seq.prompt_token_ids, seq.output_token_ids, start, chunk, block_tables[seq.seq_id])
            if start + chunk == seq.num_tokens:
                data.num_samples = params.best_of if fans_out else 1
                if group.generators is not None:
                    data.generators = group.generators if fans_out else [group.generators[seq.index]]
                until_min = self.stop_checker.banned_token_ids(params, len(seq.output_token_ids)) \
                    if params.min_tokens else ()
                words = banned_by_bad_words(group.bad_words_token_ids, seq.output_token_ids) \
                    if group.bad_words_token_ids else set()
                if seq.grammar_matcher is not None and seq.reasoning_gate is None:
                    data.token_bitmask = self.structured_outputs.bitmask(seq.grammar_matcher)
                    own_stops = self._own_stops(params) if params.stop_token_ids else ()
                    if own_stops:
                        self.structured_outputs.end_at(data.token_bitmask, own_stops)
                    # Where the grammar can only end, ending beats min_tokens (else nothing is
                    # allowed); bad words stay banned (a ban that leaves nothing aborts).
                    if until_min and not self.structured_outputs.allows_other_than(
                            data.token_bitmask, (*until_min, *words)):
                        until_min = ()
                if until_min or words:
                    data.banned_token_ids = tuple(sorted(words.union(until_min)))
                if seq.thinking is not None:
                    data.forced_token_id = seq.thinking.forced_token()
                elif params.trace_decode_token_ids is not None:
                    data.forced_token_id = params.trace_decode_token_ids[len(seq.output_token_ids)]
            if not span_taken and (group.prompt_logprobs is not None or group.prompt_token_id_logprobs is not None):
                # The group's first sequence computes its prompt's scores.
                data.prompt_logprob_span = group.prompt_logprob_span(start, start + chunk)
                data.prompt_token_id_span = group.prompt_token_id_span(start, start + chunk)
                span_taken = data.prompt_logprob_span is not None or data.prompt_token_id_span is not None
            seq_data.append(data)
        return SequenceGroupMetadata(group.request_id, params, seq_data)

    def _process_group_output(self, group: SequenceGroup, out: SequenceGroupOutput) -> None:
        for p in out.prompt_logprobs:  # the logprob of prompt token i comes after prompt[:i]
            i = len(group.prompt_logprobs)
            context = group.prompt_token_ids[max(0, i - MAX_CONTEXT_TOKENS) : i]
            group.prompt_logprobs.append(self._logprob_dict(group, context, p.token_id, p.logprob, p.top_logprobs))
        if out.prompt_token_id_logprobs is not None:
            group.add_prompt_token_id_logprobs(out.prompt_token_id_logprobs.numpy())
        if not out.samples:
            return
        if group.beam is not None:
            return self._process_beams(group, out)
        if len(out.samples) == 1:
            return self._append(group.get_seq(out.samples[0].parent_seq_id), group, out.samples[0])
        # A parent's first sample extends it; its k-th further one (the fan-out of a group's first
        # tokens) starts completion k, forked from the parent before anything is appended.
        targets, k = [], 0
        for j, sample in enumerate(out.samples):
            parent = group.get_seq(sample.parent_seq_id)
            k = k + 1 if j and out.samples[j - 1].parent_seq_id == sample.parent_seq_id else 0
            targets.append(parent if k == 0 else self._fork(group, parent, index=k))
        for seq, sample in zip(targets, out.samples):
            self._append(seq, group, sample)

    def _fork(self, group: SequenceGroup, parent: Sequence, index: int) -> Sequence:
        child = parent.fork(index)
        self.block_manager.fork(parent, child)
        group.seqs.append(child)
        if group.sampling_params.detokenize:
            self._add_detokenizer(child, group)
        return child

    def _append(self, seq: Sequence, group: SequenceGroup, sample: SequenceOutput) -> None:
        params = group.sampling_params
        # Penalties, logits processors or bans may leave no token to sample (every logit -inf), or
        # a processor may raise one the grammar's bitmask had removed: the completion ends before
        # that token, finish_reason "abort".
        if sample.no_token:
            return self._abort_completion(seq, group, "no token was left to sample (logits processors, "
                                                      "allowed_token_ids, bad_words or bans removed them all)")
        grammar_ended, why = _feed_constraint(seq, sample.token_id, params.stop_token_ids,
                                              self.structured_outputs.end_token_id if seq.grammar_matcher else None)
        if why is not None:
            return self._abort_completion(seq, group, why)
        seq.append_token(sample.token_id, sample.logprob)
        if seq.thinking is not None:
            seq.thinking.append(sample.token_id)
        stopped_on_token = self.stop_checker.check_stop_token(seq, params)
        if grammar_ended and not stopped_on_token:
            # The grammar ended on an EOS or stop id that min_tokens or ignore_eos alone would not
            # stop at (_seq_group_metadata lifted the ban where nothing else was left): the
            # completion still ends on it, as on any stop token.
            seq.stop_reason = self.stop_checker.stop_reason(params, sample.token_id)
            stopped_on_token = True
        new_text, taken_text = "", None
        # A stop token stays in token_ids; its text only with include_stop_str_in_output (vLLM's contract).
        if params.detokenize and (not stopped_on_token or params.include_stop_str_in_output):
            new_text = self.detokenizers[seq.seq_id].step(sample.token_id)
            seq.output_text += new_text
            taken_text = self._taken_text(params, sample.token_id, new_text)
        if params.num_logprobs is not None:
            context = seq.token_ids(max(0, seq.num_tokens - 1 - MAX_CONTEXT_TOKENS), seq.num_tokens - 1)
            seq.logprobs.append(self._logprob_dict(group, context, sample.token_id, sample.logprob, sample.top_logprobs,
                                                   num_output_tokens=len(seq.output_token_ids) - 1, taken_text=taken_text))
        if stopped_on_token:
            self.stop_checker.check_stop_strings(seq, params, len(new_text))  # its own text, as vLLM checks it
        if stopped_on_token or grammar_ended:
            status = SequenceStatus.FINISHED_STOPPED
        else:
            status = self.stop_checker.check(seq, params, group.max_seq_len, len(new_text))
        if status is not None:
            self._finish(seq, status)

    def _abort_completion(self, seq: Sequence, group: SequenceGroup, why: str) -> None:
        logger.warning("request %s: %s; completion %d ends with finish_reason 'abort'", group.request_id, why, seq.index)
        self._finish(seq, SequenceStatus.FINISHED_ABORTED)

    def _process_beams(self, group: SequenceGroup, out: SequenceGroupOutput) -> None:
        params = group.sampling_params
        beams = [group.get_seq(s.parent_seq_id) for s in out.samples]
        if all(s.no_token for s in out.samples):  # no beam can go on: each ends as it is
            for beam in beams:
                if params.detokenize:
                    self._decode_beam(group, beam, beam.output_token_ids)
                self._abort_completion(beam, group, "no token was left to extend its beam (logits processors, "
                                                    "allowed_token_ids, bad_words or bans removed them all)")
            return
        entry = self._beam_logprob_entry(group, beams, out) if params.logprobs is not None else None
        # A grammar ends only on EOS, which then ends its beam (with ignore_eos too).
        stop_token_ids = (self.stop_checker.all_stop_token_ids(params) if group.beam.constrained
                          else self.stop_checker.stop_token_ids(params))
        candidates = group.beam.step(
            [b.output_token_ids for b in beams], [group.beam.scores.get(b.seq_id, 0.0) for b in beams], out.beam_logprobs,
            [b.cumulative_logprob for b in beams], out.beam_raw_logprobs, stop_token_ids,
            (lambda beam, token_id: _with_entry(beams[beam].logprobs, entry(beam, token_id))) if entry else None,
        )
        # Each beam's dict from its parent's context, before any beam appends its token.
        entries = [entry(c.parent, c.token_id) for c in candidates] if entry else None
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
        group.beam.scores = {beam.seq_id: c.score for beam, c in next_beams}
        for i, (beam, c) in enumerate(next_beams):
            _, why = _feed_constraint(beam, c.token_id)
            assert why is None, why  # the grammar's mask left the token's candidate finite
            if entries is not None:
                beam.logprobs.append(entries[i])
            beam.output_token_ids.append(c.token_id)
            beam.cumulative_logprob = c.cumulative_logprob
            # Only a CUMULATIVE output shows a live beam's text (the finished ones are decoded in
            # _beam_results): decoding every beam whole at every step made long searches quadratic.
            if params.detokenize and params.output_kind is RequestOutputKind.CUMULATIVE:
                texts, end = decode_completion(self.tokenizer, group.prompt_token_ids, beam.output_token_ids, params)
                beam.output_text = "".join(texts) + end
        group.seqs = [beam for beam, _ in next_beams] if not group.beam.done else self._beam_results(group)

    def _taken_text(self, params: SamplingParams, token_id: int, text: str) -> str | None:
        """A taken token's ``decoded_token``: the text it added to its completion, but for a special
        token that ``skip_special_tokens`` leaves out of it (None: its ``decoded_token`` shows it)."""
        return None if params.skip_special_tokens and token_id in self._special_token_ids else text

    def _decode_beam(self, group: SequenceGroup, seq: Sequence, shown: list[int]) -> None:
        """A finished beam's text, decoded whole from ``shown`` (its tokens, less a stop token its
        text leaves out), and its taken tokens' ``decoded_token`` the text each added (``_append``'s)."""
        params = group.sampling_params
        texts, end = decode_completion(self.tokenizer, group.prompt_token_ids, shown, params)
        seq.output_text = "".join(texts) + end
        taken = [self._taken_text(params, t, text) for t, text in zip(shown, texts)]
        seq.logprobs = with_taken_texts(seq.logprobs, seq.output_token_ids, seq.output_text, end, taken)

    def _beam_results(self, group: SequenceGroup) -> list[Sequence]:
        """The best ``n`` finished hypotheses of a done beam search, as finished sequences."""
        params = group.sampling_params
        results = []
        for i, hypothesis in enumerate(group.beam.finished[: params.n]):
            seq = Sequence(i, group.prompt_token_ids, self.cache_config.block_size)
            seq.output_token_ids = hypothesis.token_ids
            seq.cumulative_logprob = hypothesis.cumulative_logprob
            seq.logprobs = hypothesis.logprobs
            if hypothesis.stopped:
                seq.status = SequenceStatus.FINISHED_STOPPED
                seq.stop_reason = self.stop_checker.stop_reason(params, hypothesis.token_ids[-1])
            else:
                seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
            if params.detokenize:
                shown = hypothesis.token_ids
                if hypothesis.stopped and not params.include_stop_str_in_output:
                    shown = shown[:-1]
                self._decode_beam(group, seq, shown)
            results.append(seq)
        return results

    def _beam_logprob_entry(
        self, group: SequenceGroup, beams: list[Sequence], out: SequenceGroupOutput
    ) -> Callable[[int, int], dict[int, Logprob]]:
        """``entry(beam, token_id)``: the logprob dict of ``beams[beam]`` (as it is before the step
        appends) choosing ``token_id``, as sampling reports one (``_logprob_dict``): the top entries
        the sampler found for the beam's row, the chosen token's log-probability and rank from the
        model's log-probabilities ``out.beam_raw_logprobs`` [beams, V] that beam search reports.
        Under a grammar the sampler's entries are of the masked logits, so all come from the
        model's row."""
        raw_logprobs = out.beam_raw_logprobs
        constrained = group.beam.constrained

        def entry(beam: int, token_id: int) -> dict[int, Logprob]:
            row = raw_logprobs[beam]
            sampled = out.samples[beam].top_logprobs
            top = TopLogprobs(max(int((row >= row[token_id]).sum()), 1), sampled.token_ids, sampled.logprobs)
            if constrained and sampled.ranks is None:
                values, ids = row.topk(len(sampled.token_ids))
                top = TopLogprobs(top.rank, ids.tolist(), values.tolist())
            elif constrained:  # logprob_token_ids: their values and ranks in the model's row
                ranks = [max(int((row >= row[t]).sum()), 1) for t in sampled.token_ids]
                top = TopLogprobs(top.rank, sampled.token_ids, row[sampled.token_ids].tolist(), ranks)
            seq = beams[beam]
            context = seq.token_ids(max(0, seq.num_tokens - MAX_CONTEXT_TOKENS), seq.num_tokens)
            return self._logprob_dict(group, context, token_id, float(row[token_id]), top,
                                      num_output_tokens=len(seq.output_token_ids))

        return entry

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        self.block_manager.free(seq)
        detokenizer = self.detokenizers.pop(seq.seq_id, None)
        if detokenizer is not None and not isinstance(seq.stop_reason, str):
            end = detokenizer.flush(seq.output_token_ids)
            seq.output_text += end
            seq.logprobs = with_taken_texts(seq.logprobs, seq.output_token_ids, seq.output_text, end)

    def _add_detokenizer(self, seq: Sequence, group: SequenceGroup) -> None:
        params = group.sampling_params
        self.detokenizers[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, group.prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
        )

    def _logprob_dict(
        self, group: SequenceGroup, context: list[int], token_id: int, logprob: float, top: TopLogprobs,
        num_output_tokens: int | None = None, taken_text: str | None = None,
    ) -> dict[int, Logprob]:
        """One position's logprobs, as vLLM orders and ranks them: the chosen token's first, then the
        top ones, ranked by their position (1 = most likely, ties in token order), each with the text
        it adds after ``context`` (none without ``detokenize``). A chosen token among them has its
        position's rank; one outside them ``top.rank``, how many tokens are at least as likely
        (vLLM's), which places it after them. ``logprob_token_ids``' entries (``top.ranks`` given)
        keep their own ranks, as the chosen token does then. ``num_output_tokens``: how many of
        ``context``'s last tokens are the completion's, at a completion's position (None at a
        prompt's); at its first, the text has no token before it to be spaced from. ``taken_text``: the
        text the chosen token added to its completion, its ``decoded_token`` then (so the taken tokens'
        texts add up to the completion's, whatever the decoder made of their bytes)."""
        if top.ranks is None:
            ranks = {t: rank for rank, t in enumerate(top.token_ids, start=1)}
            chosen_rank = ranks.get(token_id, top.rank)
        else:
            ranks, chosen_rank = dict(zip(top.token_ids, top.ranks)), top.rank
        entries = {token_id: Logprob(logprob, chosen_rank)}
        for t, lp in zip(top.token_ids, top.logprobs):
            if t != token_id:
                entries[t] = Logprob(lp, ranks[t])
        params = group.sampling_params
        if params.detokenize:
            # No space between two special tokens where the text has none (skip_special_tokens=False's
            # rule, which starts with the completion, IncrementalDetokenizer's).
            spaces = params.spaces_between_special_tokens or params.skip_special_tokens or num_output_tokens == 0
            texts = decode_in_context(self.tokenizer, context, list(entries), spaces, taken_text, num_output_tokens)
            for entry, text in zip(entries.values(), texts):
                entry.decoded_token = text
        return entries
