"""Prompts and tokenization options as vLLM's offline API takes them (vLLM's ``vllm.inputs``)."""

from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from pagedlm.sampling_params import check_truncate_prompt_tokens
from pagedlm.utils import FieldError, is_integer, unicode_problem


class TextPrompt(TypedDict):
    """A prompt as text, tokenized with the model's tokenizer (its special tokens added, unless
    ``tokenization_kwargs`` says ``add_special_tokens=False``)."""

    prompt: str
    cache_salt: NotRequired[str]  # requests share prefix-cache blocks only with requests of the same salt


class TokensPrompt(TypedDict):
    """A prompt as token ids; ``prompt``, when given, is the text outputs echo for it."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    cache_salt: NotRequired[str]


PromptType = str | TextPrompt | TokensPrompt | list[int]

# Keys of vLLM's prompt dicts for inputs other than text, taken when they hold nothing (None or {}).
_EMPTY_ONLY = {"multi_modal_data": "multimodal data", "mm_processor_kwargs": "multimodal processor options",
               "multi_modal_uuids": "multimodal data ids", "media_io_kwargs": "media loading options"}
_PROMPT_KEYS = ("prompt", "prompt_token_ids", "cache_salt", *_EMPTY_ONLY)


@dataclass
class ParsedPrompt:
    """One prompt, checked: ``token_ids`` as given, or None for ``text`` to be tokenized; with
    ``token_ids``, ``text`` is the text outputs echo (None: none given)."""

    text: str | None
    token_ids: list[int] | None
    cache_salt: str | None = None

    def tokens_input(self) -> dict[str, Any]:
        """The tokenized prompt as vLLM's engine input (``vllm.inputs.tokens_input``): ``{"type":
        "token", "prompt_token_ids"}``, with ``prompt`` and ``cache_salt`` where they are set."""
        assert self.token_ids is not None, "tokenize the prompt first"
        return {"type": "token", "prompt_token_ids": list(self.token_ids),
                **({"prompt": self.text} if self.text is not None else {}),
                **({"cache_salt": self.cache_salt} if self.cache_salt is not None else {})}


def is_token_ids(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(is_integer(t) for t in value)


def parse_prompt(prompt: object) -> ParsedPrompt:
    """A str, ``TextPrompt``, ``TokensPrompt`` or list of token ids, checked (a ``ParsedPrompt``
    is already checked: ``LLM`` passes its prompts on to the engine so).

    Raises:
        FieldError: the prompt is none of these (field "prompt"), or one of its keys is bad
            (the field is the key: an unknown key, text that is not valid Unicode, ids that are not
            ints, a non-empty ``multi_modal_data``).
    """
    if isinstance(prompt, ParsedPrompt):
        return prompt
    if isinstance(prompt, str):
        return ParsedPrompt(_checked_text(prompt, "prompt"), None)
    if is_token_ids(prompt):  # vLLM takes a bare list of token ids too
        return ParsedPrompt(None, [int(t) for t in prompt])
    if not isinstance(prompt, dict) or ("prompt" not in prompt and "prompt_token_ids" not in prompt):
        raise FieldError('a prompt must be a str, {"prompt": str}, {"prompt_token_ids": [int, ...]} (with an '
                         'optional "prompt" text) or a list of token ids', "prompt")
    unknown = [key for key in prompt if key not in _PROMPT_KEYS]
    if unknown:
        raise FieldError(f"unknown prompt key {unknown[0]!r}; a prompt dict takes {', '.join(map(repr, _PROMPT_KEYS))}",
                         str(unknown[0]))
    for key, what in _EMPTY_ONLY.items():
        if prompt.get(key) is not None and prompt[key] != {}:
            raise FieldError(f"{key}: pagedlm runs text-only language models (a multimodal checkpoint's language "
                             f"model), so a prompt cannot carry {what}", key)
    salt = prompt.get("cache_salt")
    if salt is not None and not (isinstance(salt, str) and salt):
        raise FieldError(f"cache_salt must be a non-empty str, got {salt!r}", "cache_salt")
    text = prompt.get("prompt")
    if text is not None or "prompt_token_ids" not in prompt:
        if not isinstance(text, str):
            where = ' beside "prompt_token_ids"' if "prompt_token_ids" in prompt else ""
            raise FieldError(f'"prompt"{where} must be a str, got {type(text).__name__}', "prompt")
        text = _checked_text(text, "prompt")
    if "prompt_token_ids" not in prompt:
        return ParsedPrompt(text, None, salt)
    ids = prompt["prompt_token_ids"]
    if not is_token_ids(ids):
        raise FieldError("prompt_token_ids must be a list of ints", "prompt_token_ids")
    return ParsedPrompt(text, [int(t) for t in ids], salt)


def _checked_text(text: str, field: str) -> str:
    problem = unicode_problem(text)
    if problem is not None:
        raise FieldError(f"the text is not valid Unicode ({problem})", field)
    return text


@dataclass(frozen=True)
class TokenizationKwargs:
    """vLLM's ``tokenization_kwargs``, the keys pagedlm takes: ``truncate_prompt_tokens`` (k >= 1:
    a prompt's last k tokens; -1: as many as ``max_model_len`` leaves room for), ``truncation_side``
    (vLLM's "left" or "right": the last or first k of the ids, a BOS cut as any token; None: the
    last k, a text prompt keeping its BOS, ``LLMEngine.truncate_prompt``) and
    ``add_special_tokens`` (whether text gets the tokenizer's special tokens, a BOS; None: yes for
    prompts, no for chats, whose template places them)."""

    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = None
    truncation_side: str | None = None


def parse_tokenization_kwargs(kwargs: dict[str, Any] | None, max_model_len: int) -> TokenizationKwargs:
    """Raises: ValueError: not a dict, another key, or a value out of range (named)."""
    if kwargs is None:
        return TokenizationKwargs()
    if not isinstance(kwargs, dict):
        raise ValueError(f"tokenization_kwargs must be a dict, got {type(kwargs).__name__}.")
    allowed = ("truncate_prompt_tokens", "truncation_side", "add_special_tokens")
    unknown = sorted(map(repr, set(kwargs) - set(allowed)))
    if unknown:
        raise ValueError(f"tokenization_kwargs: unknown key(s) {', '.join(unknown)}; pagedlm takes "
                         f"{', '.join(map(repr, allowed))}.")
    truncate = check_truncate_prompt_tokens(kwargs.get("truncate_prompt_tokens"))
    if truncate is not None and truncate > max_model_len:
        raise ValueError(f"tokenization_kwargs: truncate_prompt_tokens ({truncate}) cannot be greater than "
                         f"max_model_len ({max_model_len}).")
    special = kwargs.get("add_special_tokens")
    if special is not None and not isinstance(special, bool):
        raise ValueError(f"tokenization_kwargs: add_special_tokens must be a bool, got {special!r}.")
    side = kwargs.get("truncation_side")
    if side not in (None, "left", "right"):
        raise ValueError(f"tokenization_kwargs: truncation_side must be 'left' or 'right', got {side!r}.")
    return TokenizationKwargs(truncate, special, side)
