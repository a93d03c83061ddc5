"""``LLM``: the offline facade (vLLM's ``LLM`` class)."""

import ctypes
import functools
import inspect
import logging
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, replace
from itertools import count, islice, repeat
from typing import Any

import numpy as np
import torch

from pagedlm.config import ModelConfig, ReasoningConfig, StructuredOutputsConfig
from pagedlm.engine.arg_utils import create_engine_configs
from pagedlm.engine.llm_engine import LLMEngine
from pagedlm.entrypoints.chat_utils import (
    Conversation, RenderedChat, is_conversation, render_chat,
)
from pagedlm.entrypoints.parallel_sampling import ParentRequest, child_params, needs_children
from pagedlm.entrypoints.progress_bar import progress_bar, tqdm
from pagedlm.inputs import (
    ParsedPrompt, PromptType as InputPrompt, TokenizationKwargs, is_token_ids, parse_prompt,
    parse_tokenization_kwargs,
)
from pagedlm.openmp import limit_threads_to_cpu_quota
from pagedlm.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from pagedlm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from pagedlm.transformers_utils.tokenizer import encode_prompts
from pagedlm.utils import FieldError, is_integer, run_uninterrupted


logger = logging.getLogger("pagedlm")

# A str, TextPrompt, TokensPrompt or list of token ids (inputs.parse_prompt), or a chat template's RenderedChat.
PromptType = InputPrompt | RenderedChat


class LLM:
    """Generate completions for many prompts with continuous batching over a paged KV cache.

    Args:
        model: a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files),
            a ``.gguf`` file of a Llama, Mistral, Qwen2, Qwen3, Phi-3 (without LongRoPE), Gemma 2
            or Gemma 3 model (converted once and cached), or a Hub id ("org/name", from the local
            Hugging Face cache, downloaded there first unless ``HF_HUB_OFFLINE`` is set).
        dtype: "auto" (the checkpoint's dtype; float16 runs as bfloat16 on CPU), "float32",
            "bfloat16" or "float16".
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        max_model_len: longest prompt + completion; defaults to the model's context length
            (``max_position_embeddings``, times a "linear" RoPE scaling's factor, as vLLM reads it).
            A LongRoPE model (Phi-3-128k, Phi-4-mini) gets its whole length, where vLLM 0.32
            defaults to ``original_max_position_embeddings`` (4k) because its kernel applies one
            factor set to a whole batch; pagedlm switches factors per sequence, as transformers does.
        block_size: tokens per KV block (8, 16 or 32; None, vLLM's default, is 16).
        kv_cache_dtype: "auto" (the model's dtype; "bfloat16" or "float16" name it where it is that, as
            in vLLM, and are refused otherwise), or an fp8 KV cache: "fp8_e4m3" (alias "fp8") or
            "fp8_e5m2", with per-tensor scales from the checkpoint's ``k_scale``/``v_scale`` or 1.0
            (vLLM's names and convention). It halves a bf16 cache's bytes per token, at some accuracy.
        calculate_kv_scales: with an fp8 cache, set each layer's scales from one prefill of random
            tokens at start-up (max|k| / 200, max|v| / 100, older vLLM's rule; vLLM 0.32 dropped the
            argument) instead.
        num_kv_blocks / kv_cache_memory_bytes: size the KV cache by blocks (vLLM's
            ``num_gpu_blocks_override`` is taken for ``num_kv_blocks``) or bytes; by default it
            takes the free GPU memory less 10% of the GPU's total on CUDA (see
            ``gpu_memory_utilization``), and 20% of available RAM on CPU (that too; within the process's
            memory cgroup; capped at what ``max_num_seqs`` sequences of ``max_model_len`` tokens
            could use). At most one of the three is set.
        max_num_seqs: most sequences in one step (None: 256, or ``max_num_batched_tokens`` where
            that is set lower, as in vLLM).
        max_num_batched_tokens: most tokens (prefill + decode) in one step (None: 2048; without
            chunked prefill at least ``max_model_len``, as in vLLM).
        enable_chunked_prefill: split prompts longer than the step's token budget over steps
            (None: True).
        enable_prefix_caching: (None: True) reuse the KV blocks of prompt prefixes seen before (within one
            ``generate`` call and across calls). Unlike vLLM, whose free blocks keep their content
            until the whole cache is in use, a freed prefix stays only while the cache memory the
            engine has written holds it: new requests reuse written memory while over a quarter of
            it, and over 128 blocks, is free, before they write memory never written (whose first
            writes are page faults). A prefix held by running requests is found as before, and so
            are the prefixes of the last few calls of a small job; one seen again after many
            unrelated requests may not be.
        generation_config: where the default ``SamplingParams`` (used when a call passes none)
            come from: "auto" takes temperature, top_k, top_p, min_p, repetition_penalty,
            presence_penalty, frequency_penalty and max_new_tokens from the model's
            generation_config.json, as vLLM does; "vllm" takes
            none; a directory, its generation_config.json. The EOS ids that stop generation
            come from the same file (the model's for "vllm"). See ``get_default_sampling_params``.
        override_generation_config: generation-config keys (the ones ``generation_config`` reads:
            temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
            frequency_penalty, max_new_tokens) set over it, as vLLM's argument does (a None value
            unsets the model's).
        hf_overrides: values set on the checkpoint's config before the model is built (vLLM's): a
            dict of its fields (a dict value updates a nested config such as ``text_config``), or
            a function from the config to the config.
        max_logprobs: the most ``logprobs`` / ``prompt_logprobs`` a request may ask for (vLLM's
            limit, 20 there; -1 in a request asks for the vocabulary), and ``beam_search``'s
            ``2 * beam_width``; None (the default) sets none, -1 the vocabulary.
        seed: seeds the random draws of completions that have no ``SamplingParams.seed``, so a
            run repeats itself (with the same requests in the same order): 0 by default, as in
            vLLM; None leaves them to torch's default generator. A seeded request does not
            depend on it.
        tokenizer: a checkpoint directory, ``.gguf`` file or Hub id whose tokenizer (and chat
            template) to use instead of the model's.
        trust_remote_code: let transformers run code a checkpoint ships for its config or
            tokenizer (``auto_map``); the model itself always runs pagedlm's own code.
        chat_template: a Jinja chat template, or a path to one, replacing the tokenizer's own
            wherever chats are rendered (``chat``, ``pagedlm run``); ``chat``'s own argument wins.
        gpu_memory_utilization: on CUDA, the share of the GPU's memory (0, 1] this LLM may use,
            its weights and KV cache (default 0.9; vLLM's per-instance limit: two LLMs at 0.45 share
            a GPU, and less free than the share at start-up raises ValueError); on CPU, the share of the
            RAM available once the weights are loaded that the KV cache takes (default 0.2). vLLM's
            CPU backend reads it as the share of all RAM it reserves, weights included, which
            sizes the cache alike for a small model; so 0.9 leaves little for anything else (the
            cache's pages are mapped as it fills: a job that fills it may then run out of memory).
        tensor_parallel_size: 1 (vLLM's argument; pagedlm runs a model on one device).
        batch_invariant: a greedy or seeded request's tokens and log-probabilities are the same
            bits whatever else is in the batch, the step's token budget, prefix-cache hits or
            preemption (vLLM's opt-in ``VLLM_BATCH_INVARIANT``, here the default: None is True
            but on the torch reference ops, which are not, and refuse True). On CPU it costs
            nothing measurable and cannot be turned off. On CUDA False lets cuBLAS take each
            linear's rows in one product (True runs them in products of a fixed shape,
            ``layers.linear.INVARIANT_ROWS`` rows each); its cost there was never measured
            (docs/architecture.md).
        enforce_eager: run every step's forward pass op by op from Python. By default (False) on
            CPU, the 3rd decode-only step of a batch size (``step_graph.RECORD_AFTER``) is recorded
            as its sequence of kernel calls and later steps of that size replay it
            (``worker/step_graph.py``), as vLLM replays CUDA graphs; this saves the per-op Python
            and dispatch cost (~2 ms of a 30-layer step), with the same kernels on the same shapes,
            so the same bits. Steps with prefill tokens, a
            batch size whose forward pass runs a torch op (the torch reference backend's ops, oneDNN's
            matmul) and CUDA always run eagerly. A recording keeps the model as it was: a module's
            ``forward`` wrapped, or a weight or attribute replaced, after a batch size was recorded
            does not reach its replays; change the model before the first ``generate``, or set True.
        reasoning_parser: vLLM's reasoning parser of the model ("qwen3", "deepseek_r1", ...:
            ``config.REASONING_PARSERS``): its reasoning start and end strings, which
            ``SamplingParams.thinking_token_budget`` needs, and where structured outputs start
            (after the reasoning, see ``structured_outputs_config``). pagedlm does not split the
            reasoning out of the text (vLLM's offline ``LLM`` does not either).
        reasoning_config: a ``ReasoningConfig`` (or a dict of its fields) with those strings, the
            end string forced when the budget runs out; over ``reasoning_parser``'s. Its own
            ``reasoning_parser`` only names those strings, as in vLLM.
        structured_outputs_config: a ``StructuredOutputsConfig`` (or a dict of its fields). With a
            reasoning parser (``reasoning_parser``, or this config's), a request's structured
            outputs hold only from the token after the model's reasoning ends, as in vLLM
            (``engine/reasoning_gate.py``); ``enable_in_reasoning=True`` makes them hold from the
            first token.
        enable_trace_replay: let requests force their completions' tokens
            (``SamplingParams.trace_decode_token_ids``, vLLM's; for debugging and reinforcement
            learning); False refuses such requests.
        stream_interval: ``LLMEngine.step`` returns a running request's output (``CUMULATIVE`` or
            ``DELTA``) once at least this many tokens came since the last one, and always its
            first and its final one (vLLM's, for ``DELTA`` outputs; a request's
            ``SamplingParams.stream_interval`` may raise it). ``generate`` and ``chat`` return final outputs only, so it changes nothing
            there.
        **vllm_kwargs: vLLM's other arguments, taken at the values pagedlm honours or that do
            nothing (vLLM's defaults, mostly): ``engine.arg_utils.VLLM_NO_OP_ARGS`` lists each with its allowed
            values and why (e.g. ``disable_log_stats=True``, ``quantization=None``, ``tokenizer_mode`` "auto",
            ``compilation_config`` None or 0, ``enable_lora=False``). Another value is refused
            (``ValueError``, naming the argument and the allowed values), another name too, vLLM's
            or not (``TypeError``).

    Raises:
        ValueError: an argument is out of range (the message names it and the allowed values), or
            the model cannot be loaded as one of the supported architectures (the message says why).
        TypeError: an argument name that is neither pagedlm's nor one of ``VLLM_NO_OP_ARGS`` (vLLM's
            other engine arguments included).
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        block_size: int | None = 16,
        kv_cache_dtype: str = "auto",
        calculate_kv_scales: bool = False,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool | None = None,
        enable_prefix_caching: bool | None = None,
        generation_config: str = "auto",
        override_generation_config: dict[str, Any] | None = None,
        hf_overrides: dict[str, Any] | Callable[[Any], Any] | None = None,
        max_logprobs: int | None = None,
        seed: int | None = 0,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        chat_template: str | os.PathLike | None = None,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        batch_invariant: bool | None = None,
        enforce_eager: bool = False,
        reasoning_parser: str | None = None,
        reasoning_config: ReasoningConfig | dict[str, str] | None = None,
        structured_outputs_config: StructuredOutputsConfig | dict[str, Any] | None = None,
        enable_trace_replay: bool = False,
        stream_interval: int = 1,
        **vllm_kwargs: Any,
    ) -> None:
        arguments = {name: value for name, value in locals().items() if name != "self"}  # only the arguments yet
        model_config, cache_config, scheduler_config, reasoning, structured = create_engine_configs(**arguments)
        self._default_sampling_params = model_config.get_diff_sampling_param()
        self._final_only_defaults = SamplingParams(**self._default_sampling_params,
                                                   output_kind=RequestOutputKind.FINAL_ONLY)
        if self._default_sampling_params:
            logger.info("Default sampling parameters from the model's generation config: %s (generation_config='vllm' "
                        "turns them off).", ", ".join(f"{k}={v}" for k, v in self._default_sampling_params.items()))
        if model_config.device.type == "cpu":
            limit_threads_to_cpu_quota()
        self._engine: LLMEngine | None = LLMEngine(model_config, cache_config, scheduler_config, reasoning, structured)
        self._request_counter = count()
        self._queued: list[_Request] = []  # enqueue's, until wait_for_completion runs them
        self._streaming = False
        self._stepping_thread: int | None = None  # the thread in an engine call (_engine_call)
        # Held while a call steps the engine or adds to it, and by close(): a close() from another
        # thread waits for the step, and the call then finds the LLM closed.
        # An RLock for its owner check (_is_owned, C-level, so an interrupt cannot leave it held); no
        # call takes it again inside a hold (_refuse_inside_a_step).
        self._engine_lock = threading.RLock()
        # The ends of abandoned iterations that the collector finalised inside this thread's hold of
        # the lock (close()'s gc.collect()): run by the next hold (_end_abandoned), not inside one
        # another, where aborting their requests would cut into the engine's own work.
        self._pending_ends: list[Callable[[], None]] = []
        # Set by close() before it waits for the lock, which is not fair: the calling thread takes it
        # again for its next step before a waiting close() wakes, so without the flag a close() waited
        # for the whole call (found by a CI run on a busy machine).
        self._closing = False

    @property
    def llm_engine(self) -> LLMEngine:
        """The ``LLMEngine`` this LLM steps (vLLM's ``LLM.llm_engine``): ``add_request``, ``step``,
        ``abort_request`` for callers who drive requests themselves.

        Raises:
            RuntimeError: the LLM is closed.
        """
        if self._engine is None:
            raise RuntimeError(_CLOSED)
        return self._engine

    @property
    def model_config(self) -> ModelConfig:
        """The engine's ``ModelConfig`` (vLLM's ``LLM.model_config``)."""
        return self.llm_engine.model_config

    def __getattr__(self, name: str) -> Any:
        # Reached for names the class lacks (say why for vLLM's LLM methods pagedlm has not), and
        # when a property's getter raised AttributeError: run it again to let its own error out.
        attribute = inspect.getattr_static(type(self), name, None)
        if isinstance(attribute, property):
            return attribute.__get__(self, type(self))
        why = _VLLM_ONLY_METHODS.get(name)
        if why is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise AttributeError(f"LLM.{name} is vLLM's; pagedlm does not have it: {why}")

    def close(self) -> None:
        """Release the KV cache and the weights now, without waiting for the garbage collector
        (a notebook gets its memory back without a restart). Calling it again does nothing; any
        other use of the LLM afterwards raises ``RuntimeError``, a call running in another thread
        included (close waits for its step to end). ``with LLM(...) as llm:`` closes on leaving
        the block."""
        self._refuse_inside_a_step("close()")
        self._closing = True
        def release() -> torch.device | None:
            with self._engine_lock:
                if self._engine is None:
                    return None
                device = self._engine.model_config.device
                self._engine.close()
                self._engine = None
                self._queued = []
                self._end_abandoned()
                return device

        device = run_uninterrupted(release)  # an interrupt half-way would leave it half-released
        if device is None:
            return
        if device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            _return_free_heap_to_os()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get_tokenizer(self):
        """The model's Hugging Face tokenizer (a ``PreTrainedTokenizerFast``), as the engine uses it.

        Raises:
            RuntimeError: the LLM is closed.
        """
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """A new ``SamplingParams`` with the defaults the model's generation config sets (see
        ``generation_config``), which ``generate`` uses when it is given none. A default
        ``max_tokens`` is shortened for a prompt that would otherwise pass ``max_model_len``."""
        self.llm_engine  # a closed LLM refuses this too
        return SamplingParams(**self._default_sampling_params)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        *,
        lora_request: None = None,
        priority: int | Sequence[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; one ``RequestOutput`` per prompt, in input order.

        A prompt is a string, ``{"prompt": str}`` (``TextPrompt``), ``{"prompt_token_ids": [int,
        ...]}`` (``TokensPrompt``, with an optional ``"prompt"`` text that the output echoes) or a
        list of token ids (a list of ints passed as ``prompts`` is one prompt, as in vLLM); a dict's
        ``cache_salt`` keeps its prefix-cache blocks apart from other salts' (vLLM's). Every
        prompt and parameter is checked before any work starts: bad ones raise one ``ValueError``
        listing each bad prompt's index and why. ``use_tqdm`` shows a progress bar (tqdm.auto's: a
        widget in a notebook that has ipywidgets); a callable makes the bar instead, as vLLM's
        does (e.g. ``functools.partial(tqdm, leave=False)``).

        ``tokenization_kwargs`` is vLLM's; pagedlm takes its ``truncate_prompt_tokens``: k >= 1
        runs each prompt on its last k tokens (a text prompt keeps the BOS its tokenizer adds, as
        vLLM's does), -1 on as many as ``max_model_len`` leaves room for (vLLM 0.32 keeps
        ``max_model_len``, a prompt it then refuses); its ``truncation_side`` ("right": the first
        k tokens; "left": the last k of the ids as they are, a BOS cut as any token, as vLLM's
        explicit side slices them); and ``add_special_tokens`` (default True: text prompts get
        the tokenizer's BOS). ``SamplingParams.truncate_prompt_tokens``
        (vLLM's older place for it) still works; given both, the smaller limit applies.
        ``lora_request``, ``priority`` and ``mm_processor_kwargs`` are vLLM's and take only their
        no-op values (None, 0 and empty), which pagedlm's text-only, first-come-first-served
        engine without adapters honours.

        Raises:
            ValueError: the bad prompts and parameters (as above), ``tokenization_kwargs`` has
                another key or a ``truncate_prompt_tokens`` that is not None, -1 or 1 to
                ``max_model_len``, or a vLLM argument is set to something pagedlm cannot do.
            RuntimeError: the LLM is closed, another ``generate``/``chat``/``beam_search``/iteration
                is running on it, its engine holds unfinished requests added with
                ``llm_engine.add_request``, or one of this call's requests was aborted with
                ``llm_engine.abort_request`` while it ran.
        """
        _check_flags(use_tqdm)
        requests = self._prompt_requests(prompts, sampling_params, lora_request, priority, tokenization_kwargs,
                                         mm_processor_kwargs)
        return self._run(requests, use_tqdm)

    def _prompt_requests(self, prompts, sampling_params, lora_request, priority, tokenization_kwargs,
                         mm_processor_kwargs) -> list["_Request"]:
        """``generate``'s prompts checked (its arguments, its errors)."""
        tokenization = self._tokenization(tokenization_kwargs)
        prompts = _prompt_list(prompts)
        _check_vllm_only(lora_request, priority, mm_processor_kwargs, len(prompts))
        params = self._params_per_prompt(sampling_params, len(prompts))
        return self._checked(prompts, params, tokenization=tokenization)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        lora_request: None = None,
        use_tqdm: bool | Callable[..., tqdm] = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt (vLLM's ``LLM.beam_search``); one ``BeamSearchOutput`` per
        prompt, in input order, holding its ``params.beam_width`` best sequences (fewer only when
        there are fewer continuations, or fewer outputs its grammar allows), best first (see
        ``BeamSearchParams`` for the search and ``BeamSearchSequence`` for what each holds).

        Prompts are as in ``generate``. At most ``concurrency_limit`` prompts are searched at once
        (when None, twice ``max_num_seqs``, as ``generate`` runs them: the scheduler runs what fits
        of them), each with ``beam_width`` sequences in the batch. The arguments
        are vLLM's, in its order; ``lora_request`` takes None. Each step reports ``2 * beam_width``
        logprobs (vLLM's count; candidates are ranked as ``SamplingParams.use_beam_search`` ranks
        them), which ``LLM(max_logprobs=)`` must allow.

        Raises:
            ValueError: ``params`` is not a ``BeamSearchParams`` or has a bad field (fields set after
                construction are checked too), ``beam_width`` exceeds ``max_num_seqs``,
                ``concurrency_limit`` is not a positive int, ``2 * beam_width`` exceeds
                ``LLM(max_logprobs=)``, or prompts are invalid (listed as by ``generate``, before any
                work).
            RuntimeError: the LLM is closed, another ``generate``/``chat``/``beam_search``/iteration
                is running on it, or its engine holds unfinished requests added with
                ``llm_engine.add_request``.
        """
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}.")
        params = replace(params)  # checks fields set after construction
        prompts = _prompt_list(prompts)
        _check_vllm_only(lora_request, None, None, len(prompts))
        max_logprobs = self.llm_engine.model_config.max_logprobs
        if max_logprobs not in (None, -1) and 2 * params.beam_width > max_logprobs:
            raise ValueError(f"beam_search ranks 2 * beam_width ({2 * params.beam_width}) logprobs a step, over "
                             f"max_logprobs ({max_logprobs}), the LLM's limit.")
        max_num_seqs = self.llm_engine.scheduler_config.max_num_seqs
        if params.beam_width > max_num_seqs:
            raise ValueError(f"beam_width ({params.beam_width}) exceeds max_num_seqs ({max_num_seqs}): each beam is a "
                             "sequence of the batch.")
        if concurrency_limit is not None and (not is_integer(concurrency_limit) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be None or a positive int, got {concurrency_limit!r}.")
        sampling_params = params.sampling_params(self.llm_engine.vocab_size)
        _check_flags(use_tqdm)
        requests = self._checked(prompts, [sampling_params] * len(prompts))
        outputs = self._run(requests, use_tqdm, concurrency_limit)
        decode = functools.partial(self.get_tokenizer().decode, skip_special_tokens=params.skip_special_tokens)
        return [
            BeamSearchOutput([
                BeamSearchSequence(request.prompt.tokens_input(), tokens, c.logprobs, None, c.cumulative_logprob,
                                   decode(tokens), c.finish_reason, c.stop_reason)
                for c in out.outputs
                for tokens in [out.prompt_token_ids + c.token_ids]
            ])
            for request, out in zip(requests, outputs)
        ]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: None = None,
        priority: int | Sequence[int] | None = None,
        chat_template: str | os.PathLike | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation or each of a list of them (vLLM's ``LLM.chat``); one
        ``RequestOutput`` per conversation, in input order, whose ``prompt`` is the rendered text.

        A conversation is a list of ``{"role": str, "content": str}`` messages, with any role the
        template knows ("developer" messages become one system message where the template does
        not know that role, as in vLLM: ``chat_utils``); content may also be null or a list of text parts (see
        ``chat_utils.parse_conversation``). It is rendered with ``chat_template`` (a template or a
        path to one, as ``LLM``'s argument) or the tokenizer's own, with ``add_generation_prompt`` (open an assistant turn) or
        ``continue_final_message`` (extend the last message; not both), ``tools`` (OpenAI's
        function definitions) and ``chat_template_kwargs`` passed to the template (``render_chat``;
        as in vLLM, an argument that is not None wins over the key of the same name in
        ``chat_template_kwargs``); the text is tokenized without adding special tokens, since the
        template has placed them. An empty list is no conversation (no outputs).
        ``tokenization_kwargs`` truncates the rendered prompts as in ``generate`` (from the left
        unless its ``truncation_side`` says "right", special tokens included); its ``add_special_tokens`` (default False: the template placed
        them) adds the tokenizer's. ``chat_template`` may also name one of the tokenizer's
        templates. ``chat_template_content_format`` is vLLM's: "string" (a message's text parts
        joined into one string), "openai" (a list of ``{"type": "text", "text": ...}`` parts) or
        "auto" (the template's, ``chat_utils.detect_content_format``). The arguments are vLLM's,
        in its order; ``lora_request``, ``priority`` and ``mm_processor_kwargs`` take their no-op
        values, as in ``generate``.

        Raises:
            ValueError: listing every conversation that cannot run and why, before any work (a
                ``chat_template`` that is neither a template name, a file nor a valid template
                included); a bad ``tokenization_kwargs`` (see ``generate``); a vLLM argument
                pagedlm cannot honour.
            RuntimeError: the LLM is closed, another ``generate``/``chat``/``beam_search``/iteration
                is running on it, its engine holds unfinished requests added with
                ``llm_engine.add_request``, or one of this call's requests was aborted with
                ``llm_engine.abort_request`` while it ran.
        """
        _check_flags(use_tqdm)
        requests = self._chat_requests(
            messages, sampling_params, lora_request, priority, chat_template, chat_template_content_format,
            add_generation_prompt, continue_final_message, tools, chat_template_kwargs, tokenization_kwargs,
            mm_processor_kwargs)
        return self._run(requests, use_tqdm)

    def _chat_requests(self, messages, sampling_params, lora_request, priority, chat_template,
                       chat_template_content_format, add_generation_prompt, continue_final_message, tools,
                       chat_template_kwargs, tokenization_kwargs, mm_processor_kwargs) -> list["_Request"]:
        """``chat``'s conversations rendered and checked (its arguments, its errors)."""
        tokenization = self._tokenization(tokenization_kwargs)
        if isinstance(chat_template, os.PathLike):
            chat_template = os.fspath(chat_template)
        conversations = [messages] if is_conversation(messages) else messages
        if not isinstance(conversations, Sequence) or isinstance(conversations, str):
            raise ValueError(f"messages must be a conversation or a list of them, got {type(messages).__name__}.")
        _check_vllm_only(lora_request, priority, mm_processor_kwargs, len(conversations), "conversations")
        params = self._params_per_prompt(sampling_params, len(conversations), "conversations")
        self.llm_engine  # a closed LLM refuses before rendering anything
        prompts: list[PromptType] = []
        errors: dict[int, str] = {}
        for i, conversation in enumerate(conversations):
            try:
                prompts.append(render_chat(
                    self.get_tokenizer(), conversation, chat_template, add_generation_prompt,
                    continue_final_message, chat_template_kwargs, tools, chat_template_content_format,
                ))
            except ValueError as exc:
                errors[i] = str(exc)
                prompts.append("")
        return self._checked(prompts, params, errors, what="conversations", tokenization=tokenization)

    def enqueue(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: None = None,
        priority: int | Sequence[int] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        """Check the prompts as ``generate`` does and queue them without running anything
        (vLLM's); ``wait_for_completion`` runs everything queued. Returns their request ids, the
        ``request_id`` of their outputs. The queue is the LLM's, not the engine's (vLLM queues them
        in its engine): ``generate`` and ``chat`` run only their own prompts (vLLM's would run the
        queued ones with them), ``llm_engine.abort_request`` does not reach a queued request, and
        ``close`` drops the queue. ``use_tqdm`` shows a bar while they are queued, as vLLM's does;
        the other arguments are ``generate``'s.

        Raises:
            ValueError: as ``generate``, before anything is queued.
            RuntimeError: the LLM is closed.
        """
        _check_flags(use_tqdm)
        requests = self._prompt_requests(prompts, sampling_params, lora_request, priority, tokenization_kwargs,
                                         mm_processor_kwargs)
        return self._enqueue(requests, use_tqdm)

    def enqueue_chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: None = None,
        priority: int | Sequence[int] | None = None,
        chat_template: str | os.PathLike | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        """``chat``'s conversations, rendered and checked as it does, queued as ``enqueue`` queues
        prompts (vLLM's); returns their request ids.

        Raises:
            ValueError: as ``chat``, before anything is queued.
            RuntimeError: the LLM is closed.
        """
        _check_flags(use_tqdm)
        requests = self._chat_requests(
            messages, sampling_params, lora_request, priority, chat_template, chat_template_content_format,
            add_generation_prompt, continue_final_message, tools, chat_template_kwargs, tokenization_kwargs,
            mm_processor_kwargs)
        return self._enqueue(requests, use_tqdm, "Rendering conversations")

    def wait_for_completion(self, output_type: type | tuple[type, ...] | None = None, *,
                            use_tqdm: bool | Callable[..., tqdm] = True) -> list[RequestOutput]:
        """Run every request ``enqueue``/``enqueue_chat`` queued before the call and return their
        outputs, in the order they were queued (vLLM's); requests queued while it runs (from
        another thread) wait for the next call. The queue is then empty; a run that raises (an
        interrupt included) puts its requests back, so a second call runs them all again (an
        unseeded sampled request draws anew). ``output_type``: vLLM's check of what comes back, a
        type or tuple of types ``RequestOutput`` is an instance of (pagedlm runs generative
        models only), or None.

        Raises:
            ValueError: another ``output_type``.
            RuntimeError: as ``generate``.
        """
        types = output_type if isinstance(output_type, tuple) else (output_type,)
        if output_type is not None and not (all(isinstance(t, type) for t in types)  # a hunt: a tuple of non-types
                                            and issubclass(RequestOutput, types)):
            raise ValueError(f"output_type must be None or a type RequestOutput is an instance of (or a tuple of types "
                             f"holding one), got {output_type!r}: pagedlm runs generative models, whose outputs are "
                             "RequestOutputs.")
        _check_flags(use_tqdm)
        self._refuse_inside_a_step("wait_for_completion")
        queued: list[_Request] = []
        try:  # an interrupt (or error) from the queue's taking on puts it back (a hunt: one in the loop lost it)
            with self._engine_lock:  # taken whole: a wait in another thread finds it empty
                self._end_abandoned()
                # A closed LLM refuses; one whose engine holds add_request's requests too, with an
                # empty queue as with a full one (a hunt: it returned [], leaving them unfinished).
                # A call running meanwhile (another thread's wait) leaves an empty queue to return [].
                if self.llm_engine.has_unfinished_requests() and not self._streaming:
                    raise RuntimeError(_ENGINE_BUSY)
                queued, self._queued = self._queued, []
            if not queued:
                return []
            for index, request in enumerate(queued):
                request.index = index
            return self._run(queued, use_tqdm)
        except BaseException:
            def put_back() -> None:
                with self._engine_lock:
                    if self._engine is not None:  # a close() meanwhile dropped the queue for good
                        self._queued[:0] = queued  # before any queued meanwhile

            run_uninterrupted(put_back)
            raise

    def _enqueue(self, requests: list["_Request"], use_tqdm: bool | Callable[..., tqdm],
                 desc: str = "Rendering prompts") -> list[str]:
        with progress_bar(use_tqdm, len(requests), desc) as bar:
            for request in requests:
                request.request_id = str(next(self._request_counter))
                bar.update(1)
        with self._engine_lock:
            self.llm_engine  # not closed meanwhile
            self._queued += requests
        return [request.request_id for request in requests]

    def generate_as_completed(
        self,
        prompts: Iterable[PromptType],
        sampling_params: SamplingParams | Iterable[SamplingParams | None] | None = None,
        *,
        use_tqdm: bool | Callable[..., tqdm] = False,
        max_in_flight: int | None = None,
        return_errors: bool = False,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> Iterator[tuple[int, RequestOutput | ValueError]]:
        """Yield ``(index, RequestOutput)`` for each prompt as soon as it finishes, in the order they
        finish; ``index`` is the prompt's position in ``prompts``.

        ``prompts`` may be any iterable, a generator included: it is read lazily, 64 prompts at a
        time (they are tokenized together), and at most ``max_in_flight`` requests (default twice
        ``max_num_seqs``) are queued in the engine at once, so memory is bounded by that window,
        not by the input (a prompt whose ``n`` runs as several requests, ``parallel_sampling``, is
        added whole: all its requests count, and it may overshoot the window).
        ``sampling_params`` is one ``SamplingParams`` for all, ``None`` for the model's defaults, or
        an iterable with one entry per prompt (``None`` entries take the defaults). Closing the
        iterator early (``break``) aborts the requests still in flight.

        A prompt that cannot run (see ``generate``) is yielded as ``(index, ValueError)`` when
        ``return_errors`` is True (a ``utils.FieldError`` naming the ``SamplingParams`` field at
        fault, or "prompt", where one is), and so is one aborted with ``llm_engine.abort_request``
        while it ran. Otherwise the prompts after it are not run (those already read
        with it are dropped), the requests already in the engine finish and are yielded, and then a
        ``ValueError`` naming the prompt is raised. ``tokenization_kwargs`` is as in ``generate``.

        Raises:
            ValueError: ``sampling_params`` has fewer or more entries than ``prompts``, when the
                shorter one runs out (at once, for sized inputs); at once: a bad
                ``tokenization_kwargs``, ``max_in_flight`` not a positive int, ``use_tqdm`` or
                ``return_errors`` not a bool (``use_tqdm`` may also be a callable).
            RuntimeError: the LLM is closed (at once, or at the ``next`` after a close); at the
                first ``next``: another ``generate``/``chat``/``beam_search``/iteration is running on
                it, or its engine holds unfinished requests added with ``llm_engine.add_request``;
                later, without ``return_errors``: one of its requests was aborted with
                ``llm_engine.abort_request`` (e.g. from a logits processor) while it ran.

        """
        if max_in_flight is not None and (type(max_in_flight) is not int or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be a positive int, got {max_in_flight!r}.")
        _check_flags(use_tqdm, return_errors)
        tokenization = self._tokenization(tokenization_kwargs)
        _refuse_bytes(prompts)
        if _is_one_prompt(prompts):
            prompts = [prompts]
        elif not isinstance(prompts, Iterable):  # a hunt: zip's TypeError, naming no argument
            raise ValueError(f"prompts must be a prompt or an iterable of prompts, got {type(prompts).__name__}.")
        total = len(prompts) if isinstance(prompts, Sized) else None
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            items = zip(count(), prompts, repeat(sampling_params))
        elif not isinstance(sampling_params, Iterable) or isinstance(sampling_params, (str, bytes, dict)):
            raise ValueError(f"sampling_params must be a SamplingParams, None, or an iterable with one per prompt, "
                             f"got {type(sampling_params).__name__}.")
        elif total is not None and isinstance(sampling_params, Sized) and len(sampling_params) != total:
            raise ValueError(f"sampling_params has {_count(len(sampling_params), 'entries')} for "
                             f"{_count(total, 'prompts')}.")
        else:
            items = _zip_one_each(prompts, sampling_params)
        window = max_in_flight or 2 * self.llm_engine.scheduler_config.max_num_seqs
        prepare = functools.partial(self._prepare, wait_for_grammars=False, tokenization=tokenization)
        return self._stream(_chunks(items, _TOKENIZE_CHUNK, prepare), window, total, use_tqdm, return_errors)

    def _tokenization(self, tokenization_kwargs: dict[str, Any] | None) -> TokenizationKwargs:
        return parse_tokenization_kwargs(tokenization_kwargs, self.llm_engine.model_config.max_model_len)

    def _params_per_prompt(self, sampling_params, num_prompts: int, what: str = "prompts"
                           ) -> list[SamplingParams | None]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if not isinstance(sampling_params, Sequence):
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them, "
                             f"got {type(sampling_params).__name__}.")
        if len(sampling_params) != num_prompts:
            raise ValueError(f"sampling_params has {_count(len(sampling_params), 'entries')} for "
                             f"{_count(num_prompts, what)}.")
        return list(sampling_params)

    def _checked(self, prompts: Sequence, params: list[SamplingParams | None], errors: dict[int, str] | None = None,
                 what: str = "prompts", tokenization: TokenizationKwargs = TokenizationKwargs()) -> list["_Request"]:
        """Every prompt checked (one ``ValueError`` lists each bad input and why, ``errors``
        included), as requests ready to run."""
        errors = dict(errors or {})
        requests = []
        for request in self._prepare(list(zip(count(), prompts, params)), tokenization=tokenization):
            if isinstance(request, _Rejected):
                errors.setdefault(request.index, str(request.reason))
            requests.append(request)
        if errors:
            lines = "\n".join(f"  {what[:-1]} {i}: {why}" for i, why in sorted(errors.items()))
            raise ValueError(f"{len(errors)} of {len(prompts)} {what} are invalid; nothing was run:\n{lines}")
        return requests

    def _run(self, requests: list["_Request"], use_tqdm: bool | Callable[..., tqdm],
             max_in_flight: int | None = None) -> list[RequestOutput]:
        """Run checked requests, at most ``max_in_flight`` at once (default twice
        ``max_num_seqs``, as ``generate_as_completed``: the engine's state of a waiting request,
        ~3 KB and more with a seed or a grammar, is made when it joins, not for every prompt at the
        start); their outputs by their ``index``."""
        outputs: list[RequestOutput | None] = [None] * len(requests)
        window = max_in_flight or 2 * self.llm_engine.scheduler_config.max_num_seqs
        for index, output in self._stream(iter(requests), window, len(requests), use_tqdm, False):
            outputs[index] = output
        return outputs

    def _prepare(self, items: list[tuple[int, object, SamplingParams | None]], wait_for_grammars: bool = True,
                 tokenization: TokenizationKwargs = TokenizationKwargs()) -> list["_Request | _Rejected"]:
        """Tokenize, truncate (to the smaller of ``tokenization``'s limit and the params') and
        check a chunk of ``(index, prompt, params)``; ``None`` params are the defaults. Without
        ``wait_for_grammars`` a structured-outputs constraint's compilation only starts here (into
        the bounded cache); its request takes the grammar as it joins ``_stream``'s window, and is
        checked once it is compiled."""
        parsed, token_ids, errors, from_text = self._tokenize([prompt for _, prompt, _ in items],
                                                              tokenization.add_special_tokens)
        truncate_prompt_tokens = tokenization.truncate_prompt_tokens
        requests: list[_Request | _Rejected] = []
        # Each params object's checked FINAL_ONLY copy, or why it is invalid (a field set after
        # construction). Only finished outputs are returned (as vLLM's LLM does), so the engine
        # builds no others.
        final_only: dict[int, SamplingParams | ValueError] = {}
        # Each checked params object's child requests (parallel_sampling), None where it runs as one.
        split: dict[int, list[tuple[int, SamplingParams]] | ValueError | None] = {}
        for k, (index, _, params) in enumerate(items):
            reason = errors.get(k)
            if params is None:
                params = self._final_only_defaults
            elif not isinstance(params, SamplingParams):
                reason = reason or ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
            else:
                if id(params) not in final_only:  # the chunk holds each object, so no id is reused in it
                    try:
                        checked = params.clone()  # checks the caller's output_kind too, before replacing it
                        checked.output_kind = RequestOutputKind.FINAL_ONLY
                        final_only[id(params)] = checked
                    except ValueError as e:
                        message = str(e).rstrip(".")
                        final_only[id(params)] = (FieldError(message, e.field) if isinstance(e, FieldError)
                                                  else ValueError(message))
                params = final_only[id(params)]
                if isinstance(params, ValueError):
                    reason = reason or params
            if reason is None:
                token_ids[k] = self.llm_engine.truncate_prompt(
                    token_ids[k], params.truncate_prompt_tokens, truncate_prompt_tokens, from_text=k in from_text,
                    side=tokenization.truncation_side)
                if id(params) not in split:
                    split[id(params)] = self._children_of(params)
                children = split[id(params)]
                if isinstance(children, ValueError):
                    reason = children
                else:
                    checked = children[0][1] if children else params
                    reason = self.llm_engine.check_request(token_ids[k], checked, wait_for_grammars)
            if reason is None:
                prompt = ParsedPrompt(parsed[k].text, token_ids[k], parsed[k].cache_salt)
                requests.append(_Request(index, prompt, params, children=children))
            else:
                requests.append(_Rejected(index, reason))
        return requests

    def _tokenize(self, prompts: Sequence[object], add_special_tokens: bool | None
                  ) -> tuple[list[ParsedPrompt], list[list[int]], dict[int, FieldError], set[int]]:
        """Each prompt parsed (``inputs.parse_prompt``; its ``text`` the one outputs echo) and its
        token ids, why each bad one is bad, and which were encoded from text with the tokenizer's
        special tokens (by default text prompts are, rendered chats as their ``add_special_tokens`` says)."""
        parsed: list[ParsedPrompt] = []
        errors: dict[int, FieldError] = {}
        rendered: dict[int, bool] = {}  # a rendered chat's index -> its own add_special_tokens
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, RenderedChat):
                rendered[i] = prompt.add_special_tokens
                salt = {} if prompt.cache_salt is None else {"cache_salt": prompt.cache_salt}
                prompt = {"prompt": prompt.text, **salt}
            try:
                parsed.append(parse_prompt(prompt))
            except FieldError as exc:
                errors[i] = exc
                parsed.append(ParsedPrompt(None, []))
        token_ids = [p.token_ids or [] for p in parsed]
        texts = {i: p.text for i, p in enumerate(parsed) if p.token_ids is None and p.text is not None}
        special = {i for i in texts if (rendered.get(i, True) if add_special_tokens is None else add_special_tokens)}
        # Emptiness is decided on the final ids: "" is the prompt [BOS] for a tokenizer that adds one.
        for indices, with_specials in ((sorted(special), True), (sorted(set(texts) - special), False)):
            encoded = encode_prompts(self.llm_engine.tokenizer, [texts[i] for i in indices], with_specials)
            for i, ids in zip(indices, encoded):
                token_ids[i] = ids
        return parsed, token_ids, errors, special

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix; later requests compute their prompts afresh. Returns
        True (vLLM's: whether it was reset; pagedlm's always is, blocks in use staying where they are).
        vLLM 0.32's ``reset_running_requests`` and ``reset_connector`` arguments are not taken.
        Called from another thread during a step, it waits for the step to end.

        Raises:
            RuntimeError: the LLM is closed, or the call comes from inside one of its steps (a
                logits processor).
        """
        self._refuse_inside_a_step("reset_prefix_cache")
        return self._engine_call(lambda engine: engine.reset_prefix_cache())

    def get_stats(self) -> dict[str, int | float]:
        """KV-cache use, as a dict: ``num_kv_blocks`` and ``num_free_kv_blocks`` (blocks now),
        ``peak_kv_blocks_in_use`` (blocks, during the last ``generate``/``chat``/``beam_search``/
        ``generate_as_completed``), ``block_size`` (tokens a block), and since the LLM started:
        ``num_preemptions``, ``prefix_cache_hit_tokens`` and ``prefix_cache_queried_tokens`` (prompt
        tokens served from the cache / looked up when sequences were admitted) and
        ``prefix_cache_hit_rate`` (their ratio, 0.0 before any lookup)."""
        return self.llm_engine.get_stats()

    def _engine_call(self, call: Callable[[LLMEngine], Any]) -> Any:
        """``call(engine)`` with no close() from another thread under it.

        Raises:
            RuntimeError: the LLM was closed (before, or while the calling iteration was paused).
        """
        with self._engine_lock:
            self._end_abandoned()
            if self._closing:
                raise RuntimeError(_CLOSED)
            self._stepping_thread = threading.get_ident()
            try:
                return call(self.llm_engine)
            finally:
                self._stepping_thread = None

    def _end_abandoned(self) -> None:
        """End the abandoned iterations that the collector finalised inside a hold of the engine lock
        (``_pending_ends``); the caller holds it."""
        while self._pending_ends:
            self._pending_ends.pop()()

    def _refuse_inside_a_step(self, what: str) -> None:
        """A call that takes the engine, made from inside one of its steps (a logits processor),
        would wait for that step forever."""
        if self._stepping_thread == threading.get_ident():
            raise RuntimeError(f"{what} was called from inside a step of this LLM (a logits processor?), which holds "
                               "its engine; call it after the running call returns.")

    def _stream(self, requests: Iterator["_Request | _Rejected"], window: int, total: int | None,
                use_tqdm: bool | Callable[..., tqdm],
                return_errors: bool) -> Iterator[tuple[int, RequestOutput | ValueError]]:
        """Keep up to ``window`` requests in the engine, topping up from ``requests`` before each
        step, and yield ``(index, output)`` as each finishes."""
        self._refuse_inside_a_step("generate/chat/beam_search/generate_as_completed/wait_for_completion")
        in_flight: dict[str, int] = {}  # engine request id -> prompt index
        parents: dict[str, ParentRequest] = {}  # child request id -> its request (parallel_sampling)
        compiling: list[_Request] = []  # waiting for their structured-outputs grammar
        held: list[_Request | _Rejected] = []  # read, not yet added
        bad: _Rejected | None = None  # the first prompt that cannot run, when not returning errors
        exhausted = False
        num_in = num_out = 0
        with self._engine_lock:
            self._end_abandoned()
            if self._streaming:
                raise RuntimeError(_ALREADY_RUNNING)
            engine = self.llm_engine
            if engine.has_unfinished_requests():
                raise RuntimeError(_ENGINE_BUSY)
            self._streaming = True
        try:
            engine.reset_peak_kv_blocks_in_use()
            with progress_bar(use_tqdm, total, "Processed prompts") as bar:
                while True:
                    while not exhausted and bad is None and len(in_flight) + len(compiling) + len(held) < window:
                        request = next(requests, None)
                        if request is None:
                            exhausted = True
                        elif isinstance(request, _Request) and request.params.structured_outputs is not None:
                            # Compiled (or found in the bounded cache) as it joins the window, so that a
                            # call holds the window's grammars (80-250 KB each), not every prompt's: a
                            # generate of 100k distinct schemas held them all, ~8 GB with SmolLM2.
                            request.grammar = engine.structured_outputs.compile_async(request.params.structured_outputs)
                            # Joins once its grammar is compiled; the batch runs on meanwhile.
                            (held if request.grammar.done() else compiling).append(request)
                        else:
                            held.append(request)
                    # One done() a request: a grammar that finished between two reads was in neither list.
                    compiled = [r.grammar.done() for r in compiling]
                    held += [r for r, done in zip(compiling, compiled) if done]
                    compiling = [r for r, done in zip(compiling, compiled) if not done]
                    held.sort(key=lambda r: r.index)
                    # Without return_errors a prompt runs only once every earlier one is known to be good.
                    first_compiling = min((r.index for r in compiling), default=None)
                    if return_errors or first_compiling is None:
                        ready, held = held, []
                    else:
                        ready = [r for r in held if r.index < first_compiling]
                        held = [r for r in held if r.index > first_compiling]
                    for request in ready:
                        reason = request.reason if isinstance(request, _Rejected) else self._engine_call(request.error)
                        if bad is not None and request.index > bad.index:
                            continue  # after a bad prompt (not returning errors): not run
                        if reason is None:
                            refused = self._add(request, in_flight, parents)
                            if refused is None:
                                continue
                            if not return_errors:
                                raise refused
                            reason = refused if isinstance(refused, ValueError) else \
                                ValueError(f"{type(refused).__name__}: {refused}")
                        if return_errors:
                            bar.update(1)
                            yield request.index, reason
                        else:
                            bad = _Rejected(request.index, reason)
                    if bad is not None:
                        compiling = [r for r in compiling if r.index < bad.index]
                        held = [r for r in held if r.index < bad.index]
                    if not in_flight:
                        if compiling:
                            wait([r.grammar for r in compiling], return_when=FIRST_COMPLETED)
                        elif exhausted or bad is not None:
                            break
                        continue  # a window of prompts that could not run: read on
                    finished = [out for out in self._engine_call(lambda e: e.step()) if out.finished]
                    if not finished and not engine.has_unfinished_requests():
                        gone = sorted(set(in_flight.values()))
                        why = ("aborted with llm_engine.abort_request while it ran (from a logits processor?), so it has "
                               "no output; a logits processor ends a completion by allowing only EOS")
                        if not return_errors:
                            raise RuntimeError(f"prompt(s) {', '.join(map(str, gone))} of this call were {why}.")
                        in_flight.clear()
                        parents.clear()
                        bar.update(len(gone))
                        yield from ((index, ValueError(why)) for index in gone)
                        continue
                    done = []
                    for out in finished:
                        if out.request_id not in in_flight:
                            raise RuntimeError(f"request {out.request_id!r}, added with llm_engine.add_request while this "
                                               "LLM was iterating, finished inside the iteration; add requests to the "
                                               "engine only when no generate/chat/iteration runs on it.")
                        index, parent = in_flight.pop(out.request_id), parents.pop(out.request_id, None)
                        if parent is not None:
                            out = parent.add(out.request_id, out)
                        if out is not None:
                            done.append((index, out))
                    if not done:
                        continue
                    for _, out in done:
                        num_in += len(out.prompt_token_ids)
                        num_out += sum(len(c.token_ids) for c in out.outputs)
                    if use_tqdm:
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(
                            f"est. speed input: {num_in / elapsed:.1f} toks/s, output: {num_out / elapsed:.1f} toks/s",
                            refresh=False,
                        )
                        bar.update(len(done))
                    yield from done
        finally:
            # An interrupted or abandoned iteration leaves nothing queued for the next call; a second
            # interrupt waits for that (found by a hunt: one landing in the abort left the LLM refusing
            # every later call as "already running").
            def end() -> None:
                if self._engine is not None:
                    self._engine.abort_request(list(in_flight))
                self._streaming = False

            def end_locked() -> None:
                # An abandoned iteration held by a reference cycle ends when the collector finalises it,
                # which may be inside this thread's own hold of the lock (close()'s gc.collect()):
                # waiting there would wait on itself (found by a hunt).
                if self._engine_lock._is_owned():
                    self._pending_ends.append(end)
                    return
                with self._engine_lock:
                    self._end_abandoned()
                    end()

            run_uninterrupted(end_locked)
        if bad is not None:
            raise ValueError(f"prompt {bad.index} cannot run: {bad.reason} (the requests before it finished and "
                             "were yielded; no later prompt was run)")

    def _children_of(self, params: SamplingParams) -> list[tuple[int, SamplingParams]] | ValueError | None:
        """``params``' child requests where it asks for more completions than the engine runs at
        once (``parallel_sampling``), None where it runs as one request, or why it cannot split."""
        max_num_seqs = self.llm_engine.scheduler_config.max_num_seqs
        if not needs_children(params, max_num_seqs):
            return None
        try:
            return child_params(params, max_num_seqs)
        except ValueError as exc:
            return exc

    def _add(self, request: "_Request", in_flight: dict[str, int],
             parents: dict[str, ParentRequest]) -> Exception | None:
        """Add ``request`` to the engine: as one request, or as the children of a ``ParentRequest``.
        Returns the error with which the engine refused it after all (one its checks did not
        foresee, e.g. the tokenizer's), none of its requests left in the engine: with
        ``return_errors`` that prompt's error, so that a job's other rows run on."""
        request_id = request.request_id or str(next(self._request_counter))
        added = [request_id] if request.children is None else [f"{request_id}.{j}" for j in range(len(request.children))]
        try:
            if request.children is None:
                in_flight[request_id] = request.index  # first: an interrupt between them is aborted
                self._engine_call(lambda e: e.add_request(request_id, request.prompt, request.params))
            else:
                parent = ParentRequest(request_id, {child_id: offset for child_id, (offset, _)
                                                    in zip(added, request.children)})
                for child_id, (_, params) in zip(added, request.children):
                    in_flight[child_id], parents[child_id] = request.index, parent
                    self._engine_call(lambda e: e.add_request(child_id, request.prompt, params))
        except Exception as exc:
            if self._closing:  # the LLM's, not the request's
                raise
            self._engine_call(lambda e: e.abort_request(added))
            for child_id in added:
                in_flight.pop(child_id, None)
                parents.pop(child_id, None)
            return exc
        request.grammar = None  # the engine's matchers hold the compiled grammar now; generate holds the request
        return None


@dataclass(slots=True)
class _Request:
    """A prompt that passed every check, ready for ``LLMEngine.add_request`` (once ``grammar``, its
    structured-outputs constraint, set as it joins ``LLM._stream``'s window, has compiled in the
    background)."""

    index: int
    prompt: ParsedPrompt  # tokenized, truncated and checked
    params: SamplingParams
    grammar: Future | None = None
    children: list[tuple[int, SamplingParams]] | None = None  # (offset, params) of its child requests
    request_id: str | None = None  # set by enqueue; else given as it is added

    def error(self, engine: LLMEngine) -> FieldError | None:
        """Why the request cannot run after all, once its constraint has compiled
        (``LLMEngine.check_constraint``), else None."""
        return engine.check_constraint(self.params) if self.grammar is not None else None


@dataclass(slots=True)
class _Rejected:
    index: int
    reason: ValueError  # a FieldError where one input is at fault


_TOKENIZE_CHUNK = 64  # prompts tokenized together (the fast tokenizer batches them in Rust)


def check_engine_args(model: str, engine_kwargs: dict[str, Any]) -> None:
    """Check ``LLM(model, **engine_kwargs)``'s arguments as the constructor does, without loading
    the weights or the tokenizer (for a job whose engines start elsewhere, e.g. Ray actors).

    Raises:
        ValueError: an unknown argument, or one the constructor would refuse (naming it).
    """
    try:
        bound = inspect.signature(LLM.__init__).bind(None, model, **engine_kwargs)
    except TypeError as exc:
        raise ValueError(f"engine arguments: {exc}") from None
    bound.apply_defaults()
    try:
        create_engine_configs(**{name: value for name, value in bound.arguments.items() if name != "self"})
    except TypeError as exc:
        raise ValueError(f"engine arguments: {exc}") from None


_CLOSED = "This LLM is closed (its KV cache and weights were released); create a new LLM."
_ALREADY_RUNNING = ("This LLM is already running a generate/chat/beam_search/generate_as_completed/wait_for_completion; "
                    "finish or close that iterator first (the engine is shared).")
_ENGINE_BUSY = ("This LLM's engine holds unfinished requests added with llm_engine.add_request; step them to the end "
                "or abort them (llm_engine.abort_request) first.")


def _count(n: int, plural: str) -> str:
    """``n`` things: "1 prompt", "2 prompts", "1 entry"."""
    return f"{n} {plural}" if n != 1 else f"1 {plural[:-3] + 'y' if plural.endswith('ies') else plural[:-1]}"


def _check_vllm_only(lora_request: object, priority: object, mm_processor_kwargs: object, num_prompts: int,
                     what: str = "prompts") -> None:
    """vLLM's per-call arguments that pagedlm takes at their no-op values only: no adapter (None, or
    a list of None), priority None or 0 (one, or one per prompt), no multimodal options.

    Raises:
        ValueError: naming the argument and what it may be.
    """
    for name, value, allowed in (("lora_request", lora_request, (None,)), ("priority", priority, (None, 0))):
        if isinstance(value, np.ndarray) and value.ndim == 0:  # a review: len() of an unsized object
            value = value.item()
        listed = isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str)
        values = value if listed else [value]
        if listed and len(values) != num_prompts:
            raise ValueError(f"{name} has {_count(len(values), 'entries')} for {_count(num_prompts, what)}.")
        for v in values:
            # A numpy int is an int (a hunt: np.int64(0) was refused as "takes 0"); a bool is not.
            if not (v is None or (is_integer(v) and v in allowed)):
                why = "runs no LoRA adapters" if name == "lora_request" else "schedules first come, first served"
                raise ValueError(f"{name}: pagedlm {why}; it takes {' or '.join(map(repr, allowed))}, got {v!r}.")
    if mm_processor_kwargs:
        raise ValueError("mm_processor_kwargs: pagedlm runs text-only language models; it takes None or {}.")


def _is_one_prompt(prompts: object) -> bool:
    """Whether ``prompts`` is one prompt, not a list of them: a non-empty list of ints is one prompt
    of token ids (vLLM's)."""
    return isinstance(prompts, (str, dict, RenderedChat)) or (
        isinstance(prompts, (list, tuple)) and bool(prompts) and is_token_ids(prompts))


# vLLM's LLM methods that pagedlm has not, and what to use instead.
_POOLING = "pagedlm runs generative models only (vLLM's pooling runner); use generate"
_VLLM_ONLY_METHODS = {
    **dict.fromkeys(("embed", "encode", "classify", "score", "reward"), _POOLING),
    **dict.fromkeys(("sleep", "wake_up", "release_kv_cache_memory"),
                    "the KV cache and weights are released by close() (or leaving a `with LLM(...)` block); "
                    "create a new LLM to load them again"),
    **dict.fromkeys(("start_profile", "stop_profile"), "run torch.profiler around generate, or "
                                                       "benchmarks/profile_decode.py"),
    **dict.fromkeys(("collective_rpc", "apply_model", "get_world_size"), "one process runs the model "
                                                                          "(llm.llm_engine.model_runner.model)"),
    **dict.fromkeys(("update_weights", "init_weight_transfer_engine", "start_weight_update", "finish_weight_update",
                     "start_draft_weight_update", "get_weight_version", "update_weight_version",
                     "shutdown_weight_transfer_engine"),
                    "weights are loaded once, from the checkpoint: save the new ones and create a new LLM"),
    "get_metrics": "get_stats() gives the KV cache's use and the prefix cache's hit rate",
    "reset_mm_cache": "pagedlm runs text-only models",
}


def _refuse_bytes(prompts: object) -> None:
    """bytes are a sequence of ints, which would read as that many prompts of one token id each."""
    if isinstance(prompts, (bytes, bytearray, memoryview)):
        raise ValueError(f"prompts must be a prompt (a str, a dict or a list of token ids) or a list of prompts, "
                         f"got {type(prompts).__name__}: decode it to a str first.")


def _check_flags(use_tqdm: object, return_errors: object = False) -> None:
    if not (isinstance(use_tqdm, bool) or callable(use_tqdm)):
        raise ValueError(f"use_tqdm must be a bool or a callable that makes a tqdm bar, got {use_tqdm!r}.")
    if not isinstance(return_errors, bool):
        raise ValueError(f"return_errors must be a bool, got {return_errors!r}.")


def _prompt_list(prompts: PromptType | Sequence[PromptType]) -> Sequence[PromptType]:
    """One prompt as a list of one (``_is_one_prompt``)."""
    _refuse_bytes(prompts)
    if _is_one_prompt(prompts):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}.")
    return prompts


def _zip_one_each(prompts: Iterable, sampling_params: Iterable) -> Iterator[tuple[int, object, object]]:
    """``(index, prompt, params)``; a ``ValueError`` when one input runs out before the other."""
    params = iter(sampling_params)
    for index, prompt in enumerate(prompts):
        entry = next(params, _END)
        if entry is _END:
            raise ValueError(f"sampling_params ran out at prompt {index}; give one entry per prompt.")
        yield index, prompt, entry
    if next(params, _END) is not _END:
        raise ValueError("sampling_params has more entries than there are prompts.")


_END = object()


def _chunks(items: Iterator, size: int, prepare) -> Iterator:
    """``prepare`` applied to successive lists of up to ``size`` items, flattened, read lazily."""
    while chunk := list(islice(items, size)):
        yield from prepare(chunk)


def _return_free_heap_to_os() -> None:
    """glibc keeps freed large blocks (the KV cache's, once its mmap threshold has grown) in its
    heap; ``malloc_trim`` hands them back, so the process's RSS drops after ``close``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.malloc_trim(0)
