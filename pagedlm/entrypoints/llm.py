"""``LLM``: the offline facade (vLLM's ``LLM`` class)."""

import ctypes
import dataclasses
import logging
import numbers
from collections.abc import Iterator, Sequence
from itertools import count

import torch
from tqdm.auto import tqdm

from pagedlm.config import CacheConfig, ModelConfig, SchedulerConfig
from pagedlm.engine.llm_engine import LLMEngine
from pagedlm.outputs import RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.transformers_utils.gguf import resolve_model
from pagedlm.transformers_utils.tokenizer import encode_prompts


logger = logging.getLogger("pagedlm")

PromptType = str | dict


class LLM:
    """Generate completions for many prompts with continuous batching over a paged KV cache.

    Args:
        model: a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)
            or a Llama-architecture ``.gguf`` file (converted once and cached).
        dtype: "auto" (the checkpoint's dtype; float16 runs as bfloat16 on CPU), "float32",
            "bfloat16" or "float16".
        device: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
        max_model_len: longest prompt + completion; defaults to the model's context length.
        block_size: tokens per KV block (8, 16 or 32).
        num_kv_blocks / kv_cache_memory: size the KV cache by blocks or bytes; by default it takes
            the free GPU memory less 10% of the GPU's total on CUDA, and 20% of available RAM on
            CPU (capped at what ``max_num_seqs`` sequences of ``max_model_len`` tokens could use).
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: most tokens (prefill + decode) in one step.
        enable_chunked_prefill: split prompts longer than the step's token budget over steps.
        enable_prefix_caching: reuse the KV blocks of prompt prefixes seen before (within one
            ``generate`` call and across calls).
        generation_config: where the default ``SamplingParams`` (used when a call passes none)
            come from: "auto" takes temperature, top_k, top_p, min_p, repetition_penalty and
            max_new_tokens from the model's generation_config.json, as vLLM does; "vllm" takes
            none; a directory, its generation_config.json. See ``get_default_sampling_params``.

    Raises:
        ValueError: an argument is out of range (the message names it and the allowed values).
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        generation_config: str = "auto",
    ) -> None:
        model_config = ModelConfig.create(resolve_model(model), dtype, max_model_len, device, generation_config)
        cache_config = CacheConfig(block_size, num_kv_blocks, kv_cache_memory, enable_prefix_caching)
        scheduler_config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self._default_sampling_params = model_config.get_diff_sampling_param()
        try:
            SamplingParams(**self._default_sampling_params)
        except ValueError as exc:
            raise ValueError(f"The model's generation config gives unusable sampling defaults ({exc}); "
                             "pass generation_config='vllm' to ignore them.") from exc
        if self._default_sampling_params:
            logger.info("Default sampling parameters from the model's generation config: %s (generation_config='vllm' "
                        "turns them off).", ", ".join(f"{k}={v}" for k, v in self._default_sampling_params.items()))
        self._engine: LLMEngine | None = LLMEngine(model_config, cache_config, scheduler_config)
        self._request_counter = count()

    @property
    def llm_engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("This LLM is closed (its KV cache and weights were released); create a new LLM.")
        return self._engine

    def close(self) -> None:
        """Release the KV cache and the weights now, without waiting for the garbage collector
        (a notebook gets its memory back without a restart). Calling it again does nothing; any
        other use of the LLM afterwards raises ``RuntimeError``. ``with LLM(...) as llm:`` closes
        on leaving the block."""
        if self._engine is None:
            return
        device = self._engine.model_config.device
        self._engine.close()
        self._engine = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            _return_free_heap_to_os()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get_tokenizer(self):
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
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; one ``RequestOutput`` per prompt, in input order.

        A prompt is a string, ``{"prompt": str}`` or ``{"prompt_token_ids": [int, ...]}``. Every
        prompt and parameter is checked before any work starts: bad ones raise one ``ValueError``
        listing each bad prompt's index and why.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}.")
        use_defaults = sampling_params is None
        if use_defaults:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts.")
        texts, token_ids, errors = self._tokenize(prompts)
        if use_defaults and sampling_params and sampling_params[0].max_tokens is not None:
            sampling_params = [self._fit_max_tokens(p, len(ids)) for p, ids in zip(sampling_params, token_ids)]
        for i, params in enumerate(sampling_params):
            if not isinstance(params, SamplingParams):
                errors.setdefault(i, f"sampling_params must be a SamplingParams, got {type(params).__name__}")
            elif i not in errors:
                reason = self.llm_engine.check_request(token_ids[i], params)
                if reason is not None:
                    errors[i] = reason
        if errors:
            lines = "\n".join(f"  prompt {i}: {why}" for i, why in sorted(errors.items()))
            raise ValueError(f"{len(errors)} of {len(prompts)} prompts are invalid; nothing was run:\n{lines}")

        request_ids = [str(next(self._request_counter)) for _ in prompts]
        outputs: dict[str, RequestOutput] = {}
        try:
            for request_id, text, ids, params in zip(request_ids, texts, token_ids, sampling_params):
                self.llm_engine.add_request(request_id, text, params, ids)
            for output in self._run_engine(len(prompts), use_tqdm):
                outputs[output.request_id] = output
        finally:
            # An interrupted call leaves nothing queued for the next one.
            self.llm_engine.abort_request(rid for rid in request_ids if rid not in outputs)
        return [outputs[rid] for rid in request_ids]

    def _fit_max_tokens(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        room = self.llm_engine.model_config.max_model_len - num_prompt_tokens
        if 0 < room < params.max_tokens:
            return dataclasses.replace(params, max_tokens=room)
        return params

    def _tokenize(self, prompts: Sequence[PromptType]) -> tuple[list[str | None], list[list[int]], dict[int, str]]:
        texts: list[str | None] = []
        token_ids: list[list[int]] = []
        errors: dict[int, str] = {}
        for i, prompt in enumerate(prompts):
            text, ids = None, []
            if isinstance(prompt, dict) and set(prompt) == {"prompt"}:
                prompt = prompt["prompt"]
                if not isinstance(prompt, str):
                    errors[i] = f'"prompt" must be a str, got {type(prompt).__name__}'
            if isinstance(prompt, str):
                try:
                    prompt.encode("utf-8")
                    text = prompt
                except UnicodeEncodeError as exc:
                    errors[i] = f"the text is not valid Unicode ({exc.reason} at character {exc.start})"
            elif isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids
                ):
                    errors[i] = "prompt_token_ids must be a list of ints"
                    ids = []
                ids = [int(t) for t in ids]
            elif i not in errors:
                errors[i] = 'a prompt must be a str, {"prompt": str} or {"prompt_token_ids": [int, ...]}'
            texts.append(text)
            token_ids.append(ids)
        # Emptiness is decided on the final ids: "" is the prompt [BOS] for a tokenizer that adds one.
        to_encode = [i for i, t in enumerate(texts) if t is not None]
        for i, ids in zip(to_encode, encode_prompts(self.llm_engine.tokenizer, [texts[i] for i in to_encode])):
            token_ids[i] = ids
        return texts, token_ids, errors

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix; later requests compute their prompts afresh."""
        self.llm_engine.reset_prefix_cache()

    def get_stats(self) -> dict[str, int | float]:
        """KV-cache use: total and free blocks, the peak in use during the last ``generate``, the
        block size, the number of preemptions and the prefix-cache hit rate (tokens served from
        the cache / tokens of admitted sequences) so far."""
        return self.llm_engine.get_stats()

    def _run_engine(self, num_requests: int, use_tqdm: bool) -> Iterator[RequestOutput]:
        """Step the engine until no request is left, yielding each request's output as it finishes."""
        engine = self.llm_engine
        engine.reset_peak_kv_blocks_in_use()
        num_in = num_out = 0
        with tqdm(total=num_requests, desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                finished = [out for out in engine.step() if out.finished]
                for out in finished:
                    num_in += len(out.prompt_token_ids)
                    num_out += sum(len(c.token_ids) for c in out.outputs)
                if finished and use_tqdm:
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix_str(
                        f"est. speed input: {num_in / elapsed:.1f} toks/s, output: {num_out / elapsed:.1f} toks/s",
                        refresh=False,
                    )
                    bar.update(len(finished))
                yield from finished


def _return_free_heap_to_os() -> None:
    """glibc keeps freed large blocks (the KV cache's, once its mmap threshold has grown) in its
    heap; ``malloc_trim`` hands them back, so the process's RSS drops after ``close``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.malloc_trim(0)
