"""OpenAI's Batch API format, as vLLM's ``run-batch`` reads and writes it.

Input line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}``. Output line: ``{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`` where a 200 body is a ``chat.completion`` or ``text_completion`` object (OpenAI's
API reference, https://platform.openai.com/docs/api-reference/batch/request-output) and a row that
cannot run gets status 400, OpenAI's error object as the body, and ``error`` set.
"""

import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedlm.engine.detokenizer import decode_completion
from pagedlm.engine.reasoning_gate import ReasoningParser, ReasoningSplit
from pagedlm.engine.structured_outputs import schema_problem
from pagedlm.entrypoints.chat_utils import CHAT_OPTIONS, parse_conversation, render_chat
from pagedlm.entrypoints.jobs.rows import (
    JobRow, RowError, RowKey, chat_error, check_request_chat_template, field_error, json_text, row_names,
    sampling_params_from, schema_without_nulls, without_nulls,
)
from pagedlm.entrypoints.jobs.tool_choice import ToolChoice, tool_choice_of
from pagedlm.inputs import parse_prompt
from pagedlm.logprobs import Logprob
from pagedlm.outputs import CompletionOutput, RequestOutput
from pagedlm.sampling_params import STRUCTURED_OUTPUT_KINDS, SamplingParams
from pagedlm.transformers_utils.tokenizer import TokenBytes, encode_prompts
from pagedlm.utils import FieldError

logger = logging.getLogger("pagedlm")

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
ROW_FIELDS = ("custom_id", "method", "url", "body")
# OpenAI's documented default for /v1/completions (chat has none: it runs to the end).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Body fields that are SamplingParams fields under the same name (OpenAI's, then vLLM's extras).
_SAME_NAME = (
    "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "stop", "logit_bias",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "allowed_token_ids",
    "bad_words", "truncate_prompt_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "use_beam_search", "length_penalty", "repetition_detection", "thinking_token_budget", "logprob_token_ids",
    "prompt_logprobs",
)
_CHAT_ONLY = ("messages", "max_completion_tokens", "logprobs", "top_logprobs", "chat_template",
              "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "chat_template_content_format",
              "tools", "tool_choice", "parallel_tool_calls")
_COMPLETIONS_ONLY = ("prompt", "logprobs", "best_of", "suffix")
_COMMON = ("model", "max_tokens", "stream", "user", "response_format", "structured_outputs", "cache_salt", "echo",
           "return_token_ids", "return_tokens_as_token_ids", "add_special_tokens", "request_id", "priority", *_SAME_NAME)
BODY_FIELDS = {CHAT_URL: set(_COMMON + _CHAT_ONLY), COMPLETIONS_URL: set(_COMMON + _COMPLETIONS_ONLY)}
# Body fields whose type OpenAI's API reference gives and nothing else checks (a truthy "no" is not
# true; user reaches no SamplingParams), with their words for messages.
_COMMON_TYPES = {"user": (str, "a string"), "cache_salt": (str, "a string"), "echo": (bool, "true or false"),
                 "return_token_ids": (bool, "true or false"), "return_tokens_as_token_ids": (bool, "true or false"),
                 "add_special_tokens": (bool, "true or false"), "request_id": (str, "a string")}
_TYPES = {CHAT_URL: {"logprobs": (bool, "true or false"), **_COMMON_TYPES},
          COMPLETIONS_URL: _COMMON_TYPES}
# OpenAI's limit (its API reference) on a field SamplingParams takes wider: logit_bias in [-100, 100]
# (SamplingParams takes any finite bias, as vLLM's LLM does; vLLM's server clamps). top_logprobs
# and completions' logprobs are bounded by the job's max_logprobs, as vLLM's server bounds them
# (both default to 20, OpenAI's cap; OpenAI caps completions' logprobs at 5).
LOGIT_BIAS_RANGE = (-100, 100)


MODEL_PARAM = "model"  # the param of a row whose body names a model the job does not serve (404)
# Response keys a 200 body holds as null where nothing sets them, as vLLM's run-batch writes them
# (its pydantic models dumped whole; vllm/entrypoints/openai/chat_completion/protocol.py and
# completion/protocol.py): OpenAI's own and vLLM's extras that pagedlm can fill. Left out: vLLM's
# disaggregated-serving and metrics keys (kv_transfer_params, ec_transfer_params, metrics,
# routed_experts, prompt_text), which no pagedlm request can set.
_PROMPT_EXTRAS_UNSET = {"prompt_logprobs": None, "prompt_token_ids": None}
_MESSAGE_UNSET = {"content": None, "refusal": None, "annotations": None, "audio": None, "function_call": None}


@dataclass(slots=True)
class _Context:
    custom_id: str
    url: str
    model: str
    tool_choice: ToolChoice | None = None
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids in the response
    echo: str | None = None  # completions': "prompt" alone (max_tokens 0) or "both", before the output
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs' tokens as "token_id:<id>"
    role: str = "assistant"  # chat's message role (vLLM's: the last message's without a generation prompt)
    echo_text: str = ""  # chat's echo: the last message's content, before each choice's (vLLM's)
    request_id: str | None = None  # the body's (vLLM's): the response's id is "chatcmpl-" or "cmpl-" and it


class OpenAIBatchFormat:
    """Reads and writes OpenAI Batch API rows.

    Args:
        tokenizer: renders chat rows with its chat template, and gives logprobs' token bytes.
        served_model_names: the names a body's ``model`` may give (vLLM refuses others); the first
            is written as ``model`` in the responses.
        defaults: the job's sampling defaults, under each body's own fields.
        names_given: the names came from ``--served-model-name`` (a refused ``model``'s error then
            does not suggest that flag).
        reasoning_parser: the LLM's reasoning parser (the one its structured outputs wait for,
            ``LLMEngine.reasoning_gate_parser``, where they do): chat messages then hold the text
            before its end as ``reasoning`` (vLLM's field) and the rest as ``content``
            (``ReasoningParser.split``).
        arrow_rows: rows are read from Arrow (Parquet), where a null is unset even as a schema's
            ``const`` or ``default`` (``schema_without_nulls``).
        trust_request_chat_template: a body's own ``chat_template`` is taken (vLLM's server flag);
            else such a row is its error (``check_request_chat_template``).
    """

    key_field = "custom_id"
    integer_keys = False  # OpenAI's custom_id is a string
    fields_column = "body"
    column_kinds = {"method": "text", "url": "text"}
    integer_fields = ("max_tokens", "max_completion_tokens", "n", "best_of", "seed", "logprobs", "top_logprobs",
                      "top_k", "min_tokens", "truncate_prompt_tokens", "thinking_token_budget", "stop_token_ids",
                      "allowed_token_ids", "logprob_token_ids")
    number_fields = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                     "length_penalty")

    def __init__(self, tokenizer: PreTrainedTokenizerBase, served_model_names: list[str],
                 defaults: dict[str, Any], names_given: bool = False,
                 reasoning_parser: ReasoningParser | None = None, arrow_rows: bool = False,
                 trust_request_chat_template: bool = False) -> None:
        self.tokenizer = tokenizer
        self.trust_request_chat_template = trust_request_chat_template
        self._token_bytes = TokenBytes(tokenizer)
        self.served_model_names = served_model_names
        self.names_given = names_given
        self.defaults = defaults
        self.reasoning_parser = reasoning_parser
        self.value_nulls = not arrow_rows
        self._warned_unread_tools = False

    @staticmethod
    def key_of(row: Any) -> RowKey:
        key = row.get("custom_id") if isinstance(row, dict) else None
        return key if isinstance(key, str) else None

    @staticmethod
    def error_of(row: dict) -> str | None:
        error = row.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        return message if isinstance(message, str) else None

    def parse(self, row: Any, key: RowKey) -> JobRow:
        if not isinstance(row, dict):
            raise RowError(f"a row must be a JSON object with {', '.join(ROW_FIELDS)}, got {json_text(row, 60)}")
        unknown = sorted(set(row) - set(ROW_FIELDS))
        if unknown:
            raise RowError(f"unknown row field(s) {', '.join(unknown)}; a row has {', '.join(ROW_FIELDS)}", unknown[0])
        if not key:
            raise RowError(f"custom_id must be a non-empty string, got {json_text(row.get('custom_id'), 40)}",
                           "custom_id")
        if row.get("method") != "POST":
            raise RowError(f'method must be "POST", got {json_text(row.get("method"), 40)}', "method")
        url, body = row.get("url"), row.get("body")
        if not isinstance(url, str) or url not in BODY_FIELDS:
            raise RowError(f"url must be {json_text(CHAT_URL)} or {json_text(COMPLETIONS_URL)}, "
                           f"got {json_text(url, 60)}", "url")
        if not isinstance(body, dict):
            raise RowError(f"body must be a JSON object, got {json_text(body, 60)}", "body")
        # Null fields are unset, as OpenAI reads them (SDK dumps and Parquet structs write every key).
        body = without_nulls(body)
        unknown = sorted(set(body) - BODY_FIELDS[url])
        if unknown:
            raise RowError(f"body field(s) {', '.join(unknown)} are not supported for {url}; supported: "
                           f"{', '.join(sorted(BODY_FIELDS[url]))}", unknown[0])
        model = body.get("model", self.served_model_names[0])
        if model not in self.served_model_names:
            hint = "" if self.names_given else " (or start the job with --served-model-name)"
            raise RowError(f"body.model {json_text(model, 60)} is not the model this job serves; use one of "
                           f"{', '.join(map(json_text, self.served_model_names))}{hint}", MODEL_PARAM)
        if body.get("stream", False) is not False:  # null was dropped above
            raise RowError("body.stream must be false in a batch", "stream")
        for name, (kind, words) in _TYPES[url].items():
            if name in body and not isinstance(body[name], kind):
                raise RowError(f"body.{name} must be {words}, got {json_text(body[name], 40)}", name)
        if "priority" in body and (type(body["priority"]) is not int or body["priority"] != 0):
            raise RowError(f"body.priority must be 0 (pagedlm schedules first come, first served; vLLM refuses "
                           f"another priority without priority scheduling), got {json_text(body['priority'], 40)}",
                           "priority")
        _check_limits(body)
        _check_unread_integers(url, body)
        fields = {k: body[k] for k in _SAME_NAME if body.get(k) is not None}
        if fields.get("logprob_token_ids") == []:  # vLLM's server reads an empty list as none
            del fields["logprob_token_ids"]
        renames = {}  # SamplingParams field -> the body's name for it
        tool_choice = None
        echo = None  # completions' echo: "prompt" (max_tokens 0) or "both"
        role, echo_text = "assistant", ""
        if url == CHAT_URL:
            tool_choice = tool_choice_of(body, self.value_nulls)
            options = {k: body[k] for k in CHAT_OPTIONS if k in body}
            check_request_chat_template(options, self.trust_request_chat_template, "body.")
            if tool_choice is not None:
                options["tools"] = tool_choice.tools
            prompt = self._render_chat(body.get("messages"), options, tool_choice)
            # vLLM's: this row's prefix-cache blocks are its salt's; the tokenizer's special tokens
            # on top of the template's (off by default)
            prompt = replace(prompt, cache_salt=body.get("cache_salt"),
                             add_special_tokens=body.get("add_special_tokens", False))
            role = "assistant" if body.get("add_generation_prompt", True) else body["messages"][-1]["role"]
            if body.get("echo"):  # vLLM's: the last message's content before the output, if it is the role's
                last = parse_conversation(body["messages"])[-1]
                echo_text = last["content"] if last["role"] == role else ""
                if "prompt_logprobs" not in fields:  # vLLM's server asks for them at top_logprobs (default 0)
                    fields["prompt_logprobs"] = body.get("top_logprobs", 0)
                    if "top_logprobs" in body:
                        renames["prompt_logprobs"] = "top_logprobs"
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            if "max_completion_tokens" in body:
                renames["max_tokens"] = "max_completion_tokens"
            if "logprob_token_ids" in fields:  # vLLM's: these ids instead of the top ones
                if not body.get("logprobs"):
                    raise RowError("body.logprob_token_ids needs logprobs: true", "logprob_token_ids")
                if body.get("top_logprobs") is not None:
                    raise RowError("body.top_logprobs and body.logprob_token_ids: give one (the ids replace the "
                                   "top ones)", "top_logprobs")
            elif body.get("logprobs"):
                fields["logprobs"] = body.get("top_logprobs", 0)
                if "top_logprobs" in body:
                    renames["logprobs"] = "top_logprobs"
            elif body.get("top_logprobs") is not None and not (type(body["top_logprobs"]) is int
                                                               and body["top_logprobs"] == 0):
                # vLLM's server takes 0 without logprobs (clients that send every default do).
                raise RowError("body.top_logprobs needs logprobs: true", "top_logprobs")
        else:
            prompt = _completion_prompt(body.get("prompt"))
            if body.get("suffix") is not None:
                raise RowError("body.suffix is not supported", "suffix")
            if body.get("add_special_tokens") is False and "prompt" in prompt:  # token ids are taken as given
                try:  # the engine's checks of a text before the tokenizer's (a hunt: a lone surrogate's TypeError)
                    parse_prompt(prompt)
                except FieldError as exc:
                    raise field_error(exc, {"prompt": "prompt"}) from None
                ids = encode_prompts(self.tokenizer, [prompt["prompt"]], add_special_tokens=False)[0]
                prompt = {"prompt_token_ids": ids, "prompt": prompt["prompt"]}
            if "cache_salt" in body:
                prompt = {**prompt, "cache_salt": body["cache_salt"]}
            max_tokens = body.get("max_tokens", self.defaults.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS))
            if isinstance(body.get("logprobs"), bool):  # an integer here (SamplingParams would read true as 1)
                raise RowError(f"body.logprobs must be an integer, got {json_text(body['logprobs'])}", "logprobs")
            for name in ("logprobs", "best_of"):
                if body.get(name) is not None:
                    fields[name] = body[name]
            if "logprob_token_ids" in fields:  # vLLM's server: logprobs switches them on, its count unused
                if fields.pop("logprobs", None) is None:
                    raise RowError("body.logprob_token_ids needs logprobs set (vLLM's server)", "logprob_token_ids")
            if body.get("echo"):  # vLLM's: the prompt (its logprobs too) before the output, none with max_tokens 0
                if "logprob_token_ids" in fields or (body.get("use_beam_search") and "logprobs" in fields):
                    raise RowError("body.echo is not supported with logprob_token_ids, nor with logprobs under beam "
                                   "search (vLLM's rules)", "echo")
                if "logprobs" in fields:
                    fields.setdefault("prompt_logprobs", fields["logprobs"])
                if max_tokens == 0:
                    max_tokens, echo = 1, "prompt"
                else:
                    echo = "both"
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        constraint = _response_format(body["response_format"], self.value_nulls) if "response_format" in body else None
        if constraint is not None and tool_choice is not None and tool_choice.calls:
            raise RowError("body.response_format and body.tool_choice both constrain the output: give one",
                           "response_format")
        own = body.get("structured_outputs")  # vLLM's field; a response_format or tool call takes its options
        if own is not None and not isinstance(own, dict):
            raise RowError(f"body.structured_outputs must be an object, got {json_text(own, 40)}", "structured_outputs")
        given = ", ".join(kind for kind in STRUCTURED_OUTPUT_KINDS if (own or {}).get(kind) is not None)
        if given and tool_choice is not None and tool_choice.calls:
            raise RowError("body.structured_outputs and body.tool_choice both constrain the output: give one "
                           "(vLLM's rule)", "structured_outputs")
        if given and constraint is not None:
            raise RowError(f"body.response_format and body.structured_outputs ({given}) both constrain the output: "
                           "give one (a response_format takes structured_outputs' options alone, such as "
                           "disable_any_whitespace)", "response_format")
        if constraint is not None:
            fields["structured_outputs"] = {**(own or {}), **constraint}
            renames["structured_outputs"] = "structured_outputs" if own else "response_format"
        elif tool_choice is not None and tool_choice.calls:
            fields["structured_outputs"], renames["structured_outputs"] = {**(own or {}), "json": tool_choice.schema}, "tools"
        elif own is not None:
            fields["structured_outputs"] = own
        names = row_names(fields, "messages" if url == CHAT_URL else "prompt", renames)
        if "cache_salt" in body:  # a prompt's field, which the engine checks (an empty salt)
            names["cache_salt"] = "cache_salt"
        params = sampling_params_from(fields, self.defaults, "body", names, self.value_nulls)
        return JobRow(key, prompt, params, row, names, _Context(key, url, self.served_model_names[0], tool_choice,
                                                                 body.get("return_token_ids", False), echo,
                                                                 body.get("return_tokens_as_token_ids", False),
                                                                 role, echo_text, body.get("request_id")))

    def _render_chat(self, messages: Any, options: dict[str, Any], tool_choice: ToolChoice | None) -> Any:
        """The row's prompt. Tools the template does not read are refused unless the model is made
        to call them: then the grammar still holds the call to a function's parameters, and the
        job warns once that the model does not see the definitions (vLLM drops them silently)."""
        try:
            return render_chat(self.tokenizer, messages, **options, template_files=False)
        except FieldError as exc:
            if not (exc.field == "tools" and tool_choice is not None and tool_choice.calls):
                raise chat_error(exc, "body.") from None
        if not self._warned_unread_tools:
            self._warned_unread_tools = True
            logger.warning("the chat template does not read tools: the model does not see the tool definitions, "
                           "only the grammar holds its calls to their parameters")
        try:
            return render_chat(self.tokenizer, messages, **{**options, "tools": None}, template_files=False)
        except FieldError as exc:
            raise chat_error(exc, "body.") from None

    def _own_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (``TokenBytes``), else its text's."""
        data = self._token_bytes(token_id)
        return self.tokenizer.decode([token_id]).encode("utf-8") if data is None else data

    def _echoed(self, output: RequestOutput, c: CompletionOutput, echo: str | None,
                return_token_ids: bool) -> CompletionOutput:
        """A completion choice as ``echo`` shows it (vLLM's server): the prompt's text (none with
        ``return_token_ids``, whose ids hold the prompt: vLLM's), ids and logprobs (the first position
        has none), then the choice's own unless only the prompt."""
        if echo is None:
            return c
        prompt_text = "" if return_token_ids else (
            output.prompt if output.prompt is not None else self.tokenizer.decode(output.prompt_token_ids))
        own = echo == "both"
        logprobs = None if c.logprobs is None else [*output.prompt_logprobs, *(c.logprobs if own else [])]
        return replace(c, text=prompt_text + (c.text if own else ""), logprobs=logprobs,
                       token_ids=[*output.prompt_token_ids, *(c.token_ids if own else [])])

    def _text_before(self, prompt_token_ids: list[int], token_ids: list[int],
                     params: SamplingParams) -> Callable[[int], str]:
        """``k`` -> the text a completion's first ``k`` tokens made, as the detokenizer made it, with
        the ``\ufffd`` of a character they leave unfinished (which the next token's text begins with)."""
        def text_before(k: int) -> str:
            texts, end = decode_completion(self.tokenizer, prompt_token_ids, token_ids[:k], params)
            return "".join(texts) + end

        return text_before

    def result_row(self, job_row: JobRow, output: RequestOutput) -> dict:
        """The row's response; RowError for a completion the engine aborted (no token was left to
        sample under its constraint and bans), whose finish_reason "abort" OpenAI's responses have
        no value for: vLLM's server answers such a request with an error too (found by a hunt)."""
        if any(c.finish_reason == "abort" for c in output.outputs):
            raise RowError("no token was left to sample for the completion (its constraint, tool_choice, bad_words, "
                           "logit_bias or stop tokens ruled them all out), so it was aborted")
        ctx: _Context = job_row.context
        chat = ctx.url == CHAT_URL
        params = job_row.params
        # -1 (vLLM's): the whole vocabulary, every rank
        k = float("inf") if params.logprobs == -1 else params.logprobs or 0
        top = functools.partial(_top, k=k, token_ids=params.logprob_token_ids)
        splits = [None] * len(output.outputs)
        if chat and self.reasoning_parser is not None:
            splits = [self.reasoning_parser.split(output.prompt_token_ids, c.token_ids, c.text,
                                                  self._text_before(output.prompt_token_ids, c.token_ids, params))
                      for c in output.outputs]
        # Numbered by place: with best_of > n the engine's indices of the n kept are not 0..n-1.
        token_bytes, decode = self._token_bytes, self.tokenizer.decode
        sampled_bytes = token_bytes
        if ctx.tokens_as_ids:  # the placeholder's own bytes, but the sampled token's (vLLM's server's)
            token_bytes, decode = (lambda token_id: None), (lambda ids: _token_id_text(ids[0]))
            sampled_bytes = self._own_bytes
        shown = [self._echoed(output, c, ctx.echo, ctx.return_token_ids) for c in output.outputs]  # (chat's: its text)
        if ctx.tokens_as_ids:
            shown = [_as_token_ids(c) for c in shown]
        choices = [_chat_choice(i, c, top, token_bytes, sampled_bytes, ctx.tool_choice, split, ctx.role, ctx.echo_text)
                   if chat else
                   _completion_choice(i, c, top, decode)
                   for i, (c, split) in enumerate(zip(shown, splits))]
        num_prompt = len(output.prompt_token_ids)
        num_generated = sum(len(c.token_ids) for c in output.outputs)
        usage = {"prompt_tokens": num_prompt, "completion_tokens": num_generated, "total_tokens": num_prompt + num_generated,
                 # OpenAI's: prompt tokens read from the prefix cache (vLLM's server, with --enable-prompt-tokens-details);
                 # vLLM's: those the prefill wrote into it (its chat endpoint fills them, its completions one not),
                 # and no multimodal input (a hunt: the two keys were missing)
                 "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens or 0,
                                           "created_cache_tokens": output.num_cache_creation_tokens if chat else None,
                                           "multimodal_tokens": None},
                 "completion_tokens_details": None}
        if chat and self.reasoning_parser is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(split.num_tokens for split in splits)}
        # vLLM's extras: chat's prompt ids and logprobs in the body, a completion's in each choice.
        prompt_extras = {}
        if ctx.return_token_ids:
            prompt_extras["prompt_token_ids"] = output.prompt_token_ids
        if output.prompt_logprobs is not None:
            prompt_extras["prompt_logprobs"] = [None if position is None else _prompt_position(position)
                                                for position in output.prompt_logprobs]
        for choice, c in zip(choices, output.outputs):
            choice.update({"token_ids": c.token_ids if ctx.return_token_ids else None,
                           **({} if chat else _PROMPT_EXTRAS_UNSET), **({} if chat else prompt_extras)})
        body = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-"
                  f"{ctx.request_id if ctx.request_id is not None else f'{output.request_id}-{uuid.uuid4().hex[:12]}'}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": ctx.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage,
            **({**_PROMPT_EXTRAS_UNSET, **prompt_extras} if chat else {}),
        }
        return _line(ctx.custom_id, 200, body, None)

    def error_row(self, key: RowKey, row: Any, error: str, param: str | None = None) -> dict:
        """An error row in OpenAI's form: status 400, or 404 for a ``model`` the job does not serve
        (vLLM's server's NotFoundError; found by a hunt: 400)."""
        body = {"error": {"message": error, "type": "invalid_request_error", "param": param, "code": None}}
        # A custom_id that is not a string is echoed, to join on; resume reads it as no id (None).
        custom_id = key if key is not None or not isinstance(row, dict) else row.get("custom_id")
        if not isinstance(custom_id, (str, int, float, type(None))) or isinstance(custom_id, bool):
            custom_id = None
        return _line(custom_id, 404 if param == MODEL_PARAM else 400, body, {"code": "invalid_request_error", "message": error})


def _completion_prompt(prompt: Any) -> dict[str, Any]:
    """A completions body's ``prompt`` as a prompt dict: OpenAI's text or token ids (a list of
    ints), or a list of one of those; a list of several prompts (several requests) is refused."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return {"prompt_token_ids": prompt}
    raise RowError(f"body.prompt must be a string or a non-empty list of token ids, got {json_text(prompt, 60)} "
                   "(one prompt per row: give each of several prompts its own row)", "prompt")


def _check_limits(body: dict) -> None:
    """Refuse values vLLM's server or OpenAI refuse that SamplingParams would take (see
    ``LOGIT_BIAS_RANGE``)."""
    for name in ("top_logprobs", "logprobs", "prompt_logprobs"):
        value = body.get(name)
        if type(value) is int and value < -1:  # chat's logprobs is a bool; -1 is the whole vocabulary (vLLM's)
            raise RowError(f"body.{name} must be at least 0, or -1 for the whole vocabulary (within the job's "
                           f"--max-logprobs), got {value}", name)
    bias = body.get("logit_bias")
    low, high = LOGIT_BIAS_RANGE
    for token, value in bias.items() if isinstance(bias, dict) else ():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
            raise RowError(f"body.logit_bias values must be in [{low}, {high}], got {value} for token {token}",
                           "logit_bias")


def _check_unread_integers(url: str, body: dict) -> None:
    """Refuse, as written (docs/jobs.md: field types are OpenAI's, where vLLM's server coerces),
    integer fields that SamplingParams would not check: chat's ``max_tokens`` beside
    ``max_completion_tokens``, which replaces it (a value below 1 too, which vLLM ignores there),
    and completions' ``logprobs`` beside ``logprob_token_ids``, whose count it does not read; and
    true for ``top_logprobs`` or ``prompt_logprobs``, which SamplingParams reads as 1 (vLLM's Python
    API, and its server). A hunt: each was accepted and ignored, or taken as 1."""
    shadowed = {CHAT_URL: ("max_tokens", "max_completion_tokens"), COMPLETIONS_URL: ("logprobs", "logprob_token_ids")}[url]
    names = ["top_logprobs", "prompt_logprobs"] + [shadowed[0]] * (shadowed[1] in body)
    for name in names:
        if name in body and type(body[name]) is not int:
            raise RowError(f"body.{name} must be an integer, got {json_text(body[name], 40)}", name)
    if url == CHAT_URL and "max_completion_tokens" in body and body.get("max_tokens", 1) < 1:
        raise RowError(f"body.max_tokens must be at least 1, got {body['max_tokens']} (max_completion_tokens "
                       "replaces it: give one)", "max_tokens")


# Each response_format type's keys (OpenAI's API reference).
_RESPONSE_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}


_JSON_SCHEMA_TYPES = {"name": (str, "a string (required)"), "description": (str, "a string"),
                      "schema": (dict, "an object"), "strict": (bool, "true, false or null")}


def _response_format(response_format: Any, value_nulls: bool) -> dict | None:
    """OpenAI's ``response_format`` as ``StructuredOutputsParams`` fields (None for plain text)."""
    if not isinstance(response_format, dict):
        raise RowError(f"response_format must be an object such as {{\"type\": \"json_object\"}}, got "
                       f"{json_text(response_format, 60)}", "response_format")
    kind = response_format.get("type")
    if kind not in _RESPONSE_FORMAT_KEYS:
        raise RowError(f"response_format.type must be one of {', '.join(map(json_text, _RESPONSE_FORMAT_KEYS))}, "
                       f"got {json_text(kind, 40)}", "response_format")
    extra = sorted(k for k, v in response_format.items() if v is not None and k not in _RESPONSE_FORMAT_KEYS[kind])
    if extra:
        raise RowError(f"response_format of type {json_text(kind, 40)} takes no {', '.join(extra)} "
                       "(it would be ignored)", "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise RowError("response_format.json_schema must be an object with a 'schema' object", "response_format")
    # OpenAI's (and vLLM's JsonSchemaResponseFormat) fields; the schema is enforced whatever strict says, as in vLLM.
    unknown = sorted(k for k in spec if k not in _JSON_SCHEMA_TYPES)
    if unknown:
        raise RowError(f"response_format.json_schema takes {', '.join(_JSON_SCHEMA_TYPES)}; it has "
                       f"{', '.join(map(json_text, unknown))}", "response_format")
    for name, (kind, words) in _JSON_SCHEMA_TYPES.items():
        value = spec.get(name)
        if (value is not None or name == "name") and not isinstance(value, kind):
            raise RowError(f"response_format.json_schema.{name} must be {words}, got {json_text(value, 40)}",
                           "response_format")
    schema = schema_without_nulls(spec["schema"], value_nulls, "response_format.json_schema.schema", "response_format")
    problem = schema_problem(schema)
    if problem:  # here, to name the row's field (the engine would name structured_outputs.json)
        raise RowError(f"response_format.json_schema.schema: {problem}", "response_format")
    return {"json": schema}


def _line(custom_id: RowKey, status: int, body: dict, error: dict | None) -> dict:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": error,
    }


def _chat_choice(index: int, c: CompletionOutput, top: Callable, token_bytes: Callable[[int], bytes | None],
                 sampled_bytes: Callable[[int], bytes | None], tool_choice: ToolChoice | None,
                 split: ReasoningSplit | None, role: str, echo_text: str) -> dict:
    """A chat choice; ``echo_text`` (chat's ``echo``) goes before the message's content, as
    vLLM's server puts it (a null content becomes the text alone). A logprob's ``bytes`` are
    ``token_bytes``', the sampled token's ``sampled_bytes``'."""
    logprobs = None
    if c.logprobs is not None:
        logprobs = {"content": [
            {**_token_logprob(token_id, position[token_id], sampled_bytes),
             "top_logprobs": [_token_logprob(t, lp, token_bytes) for t, lp in top(position)]}
            for token_id, position in zip(c.token_ids, c.logprobs)
        ], "refusal": None}
    content = split.content if split is not None else c.text
    message, finish_reason = (tool_choice.message(content, c.finish_reason) if tool_choice is not None
                              else ({"content": content}, c.finish_reason))
    message["reasoning"] = split.reasoning if split is not None else None
    if echo_text:
        message["content"] = echo_text + (message["content"] or "")
    return {"index": index, "message": {"role": role, **_MESSAGE_UNSET, **message},
            "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": c.stop_reason}


def _completion_choice(index: int, c: CompletionOutput, top: Callable, decode: Callable[[list[int]], str]) -> dict:
    """A completions choice; a position without logprobs (an echoed prompt's first) has its token's
    text alone, with null logprob and top logprobs (vLLM's server's)."""
    logprobs = None
    if c.logprobs is not None:
        positions = list(zip(c.token_ids, c.logprobs))
        tokens = [decode([t]) if position is None else position[t].decoded_token or "" for t, position in positions]
        offsets = [0]
        for token in tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        logprobs = {
            "tokens": tokens,
            "token_logprobs": [None if position is None else _logprob(position[t]) for t, position in positions],
            # OpenAI's completions: the k most likely and the sampled token (up to k + 1).
            "top_logprobs": [None if position is None else
                             {lp.decoded_token or "": _logprob(lp) for _, lp in top(position, sampled=t)}
                             for t, position in positions],
            "text_offset": offsets[: len(tokens)],
        }
    return {"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason}


def _top(position: dict[int, Logprob], k: float, token_ids: list[int] | None = None,
         sampled: int | None = None) -> list[tuple[int, Logprob]]:
    """The ``k`` most likely tokens of a position and the ``sampled`` one if given, best first (the
    dict holds the sampled token too, which may rank lower); with ``token_ids``
    (``logprob_token_ids``) the whole dict: the sampled token, then those ids in their order."""
    if token_ids is not None:  # the sampled token, then the ids (vLLM's server lists the whole dict)
        return list(position.items())
    return sorted(((t, lp) for t, lp in position.items() if lp.rank <= k or t == sampled), key=lambda item: item[1].rank)


def _token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"  # vLLM's placeholder


def _as_token_ids(c: CompletionOutput) -> CompletionOutput:
    """``c`` with each logprob's token text its id's placeholder (vLLM's
    ``return_tokens_as_token_ids``: ids that several tokens' texts cannot be told apart by)."""
    if c.logprobs is None:
        return c
    return replace(c, logprobs=[None if position is None else
                                {t: replace(lp, decoded_token=_token_id_text(t)) for t, lp in position.items()}
                                for position in c.logprobs])


def _token_logprob(token_id: int, lp: Logprob, token_bytes: Callable[[int], bytes | None]) -> dict:
    token = lp.decoded_token or ""
    data = token_bytes(token_id)
    return {"token": token, "logprob": _logprob(lp), "bytes": list(token.encode("utf-8") if data is None else data)}


def _prompt_position(position: dict[int, Logprob]) -> dict[int, dict]:
    """One prompt position's logprobs as vLLM's server writes them: token id -> ``logprob``,
    ``rank`` and ``decoded_token``."""
    return {t: {"logprob": _logprob(lp), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for t, lp in position.items()}


def _logprob(lp: Logprob) -> float:
    """A logprob as OpenAI's schema types it, a number: a token the grammar forbids (``-inf``)
    reads -9999.0, as vLLM's server writes it."""
    return max(lp.logprob, -9999.0)
