"""Conversations (OpenAI's chat message format) to prompt text through the model's chat template."""

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template  # the environment chats render in

from pagedlm.utils import FieldError

# vLLM's text content part types, each with the key that holds its text.
TEXT_PART_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
                  "thinking": "thinking"}

Conversation = list[dict[str, Any]]

# render_chat's options besides the conversation (OpenAI's and vLLM's chat request fields).
CHAT_OPTIONS = ("chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "tools")
# Each option's type, and its words for messages.
_OPTION_TYPES = {"chat_template": (str, "a string"), "chat_template_kwargs": (dict, "an object"),
                 "add_generation_prompt": (bool, "True or False"), "continue_final_message": (bool, "True or False"),
                 "tools": (list, "a list of tool definitions")}


@dataclass(frozen=True, slots=True)
class RenderedChat:
    """A prompt that a chat template made (``render_chat``): the template has placed its special
    tokens in ``text``, so ``LLM.generate`` tokenizes it without adding any. ``cache_salt`` is a
    prompt dict's (``inputs.TextPrompt``)."""

    text: str
    cache_salt: str | None = None


def is_conversation(messages: object) -> bool:
    """True for one conversation (a list of message dicts), False for a list of conversations
    (an empty list is none, as in vLLM's ``LLM.chat``)."""
    return isinstance(messages, Sequence) and not isinstance(messages, str) and bool(messages) and isinstance(messages[0], dict)


def parse_conversation(conversation: object) -> Conversation:
    """The conversation with every message checked and its content made text, as vLLM's "string"
    content format makes it.

    A message is ``{"role": str, "content": ...}``. Any role goes to the template as it is (e.g.
    Llama 3's "ipython"; "developer" becomes "system" for a template that does not know it). The
    content is a str; null or absent (rendered empty); or a list of parts, each a str or a text
    part (``{"type": "text" | "input_text" | "output_text", "text": str}``,
    ``{"type": "refusal", "refusal": str}``, ``{"type": "thinking", "thinking": str}``), whose
    non-empty texts are joined with newlines. Other keys (``name``, ``tool_calls``,
    ``tool_call_id``) go to the template unchanged, except that a tool call's
    ``function.arguments`` given as JSON text (OpenAI's form) reaches it parsed, and absent or
    empty as ``{}``, as vLLM passes them (templates render them with ``tojson``).

    Raises:
        ValueError: the first problem, naming the message's index and the field; a non-text
            content part (an image, audio, video) among them: pagedlm has no multimodal inputs.
    """
    if not isinstance(conversation, Sequence) or isinstance(conversation, str):
        raise ValueError(f"a conversation must be a list of messages, got {type(conversation).__name__}")
    if not conversation:
        raise ValueError("a conversation must have at least one message")
    messages = []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise ValueError(f"message {i} has no 'role'")
        if not isinstance(role, str):
            raise ValueError(f"message {i}: 'role' must be a str (e.g. 'user'), got {type(role).__name__}")
        # Null fields are unset: a Parquet struct or an OpenAI client writes every key.
        message = {**{k: v for k, v in message.items() if v is not None},
                   "content": _content_text(i, message.get("content"))}
        if role == "assistant" and isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_parse_tool_call(i, call) for call in message["tool_calls"]]
        messages.append(message)
    return messages


def _content_text(i: int, content: object) -> str:
    if content is None:
        return ""  # e.g. OpenAI's assistant turn that only calls tools
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"message {i}: 'content' must be a str, a list of text parts or null, "
                         f"got {type(content).__name__}")
    # vLLM skips a part whose text is empty or null.
    return "\n".join(text for part in content if (text := _part_text(i, part)))


def _part_text(i: int, part: object) -> str | None:
    if isinstance(part, str):
        return part
    part_type = part.get("type") if isinstance(part, dict) else None
    key = TEXT_PART_KEYS.get(part_type) if isinstance(part_type, str) else None
    if key is None:
        raise ValueError(f"message {i}: content part {part!r:.80} is not text, and pagedlm has no multimodal "
                         f"inputs (a part is a str or a dict of type {', '.join(TEXT_PART_KEYS)})")
    text = part.get(key)
    if text is not None and not isinstance(text, str):
        raise ValueError(f"message {i}: a {part_type!r} part's {key!r} must be a str, got {type(text).__name__}")
    return text


def _knows_developer_role(template: str) -> bool:
    return '"developer"' in template or "'developer'" in template


def _developer_as_system(messages: Conversation) -> Conversation:
    """For a template that does not know the "developer" role (vLLM's rule): developer messages
    become system messages, and several system messages, or one after the first message, become
    one at the start, their texts joined by a blank line."""
    if all(m["role"] != "developer" for m in messages):
        return messages
    messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    if systems == [0]:
        return messages
    text = "\n\n".join(messages[i]["content"] for i in systems if messages[i]["content"])
    return [{"role": "system", "content": text}, *(m for m in messages if m["role"] != "system")]


def _parse_tool_call(i: int, call: object) -> object:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    arguments = function.get("arguments")
    if isinstance(arguments, (dict, list)):
        return call
    if not arguments:
        arguments = {}
    else:
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError as exc:
            raise ValueError(f"message {i}: a tool call's function.arguments is not valid JSON ({exc})") from None
        if arguments is None:
            raise ValueError(f"message {i}: a tool call's function.arguments must be JSON text or an object, "
                             f"got {type(function.get('arguments')).__name__}")
    return {**call, "function": {**function, "arguments": arguments}}


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    conversation: object,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> RenderedChat:
    """The prompt the template makes of ``conversation``, checked by ``parse_conversation`` first.
    Its text already holds the template's special tokens (BOS included), so it is tokenized with
    ``add_special_tokens=False``. ``tools`` (OpenAI's tool definitions) go to the template as
    ``tools``. ``chat_template_kwargs`` go to it too, under the arguments: an argument that is not
    None wins over the key of the same name (vLLM's ``merge_kwargs``), so they only fill in
    ``tools`` and ``chat_template`` when those are None (they may not set the conversation or
    ``tokenize``).

    Raises:
        FieldError: its ``field`` the argument at fault: a bad message (``parse_conversation``;
            "messages"), the tokenizer has no template and none is given ("messages"), both
            ``add_generation_prompt`` and ``continue_final_message`` are set, ``chat_template_kwargs``
            sets the conversation or ``tokenize``, the template does not parse ("chat_template"),
            or the template rejects the conversation ("messages"; its message is kept, e.g.
            "Conversation roles must alternate").
    """
    options = {"chat_template": chat_template, "chat_template_kwargs": chat_template_kwargs, "tools": tools,
               "add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message}
    for name, value in options.items():
        kind, words = _OPTION_TYPES[name]
        if value is not None and not isinstance(value, kind):
            raise FieldError(f"{name} must be {words}, got {value!r:.40}", name)
        # The same option as a template variable (it reaches the template where the argument is None).
        inner = (chat_template_kwargs or {}).get(name)
        if name != "chat_template_kwargs" and inner is not None and not isinstance(inner, kind):
            raise FieldError(f"chat_template_kwargs.{name} must be {words}, got {inner!r:.40}", "chat_template_kwargs")
    for where, value in (("tools", tools), ("chat_template_kwargs.tools", (chat_template_kwargs or {}).get("tools"))):
        if isinstance(value, list) and not all(isinstance(tool, dict) for tool in value):
            raise FieldError(f"{where} must be a list of tool definitions (objects), got {value!r:.60}",
                             where.split(".")[0])
    try:
        messages = parse_conversation(conversation)
    except ValueError as exc:
        raise FieldError(str(exc), "messages") from None
    given = chat_template_kwargs or {}
    # The template gets the conversation as "messages", apply_chat_template as "conversation".
    clash = sorted({"messages", "conversation"} & set(given))
    if given.get("tokenize", False) is not False:
        clash.append("tokenize")
    if clash:
        raise FieldError(f"chat_template_kwargs cannot set {', '.join(clash)}: the conversation is the messages "
                         "given, and the rendered text is tokenized afterwards", "chat_template_kwargs")
    kwargs = merge_kwargs(given, {
        "add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
        "tools": tools, "chat_template": chat_template, "tokenize": False,
    })
    chat_template = kwargs.pop("chat_template", None)
    if chat_template is None and tokenizer.chat_template is None:
        raise FieldError("the tokenizer has no chat template; pass chat_template= (a Jinja template string)",
                         "messages")
    if kwargs.get("add_generation_prompt") and kwargs.get("continue_final_message"):
        raise FieldError("add_generation_prompt and continue_final_message cannot both be True",
                         "continue_final_message" if continue_final_message else "chat_template_kwargs")
    template = chat_template or tokenizer.chat_template
    if not _knows_developer_role(template if isinstance(template, str) else " ".join(template.values())):
        messages = _developer_as_system(messages)
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, **kwargs)
    except Exception as exc:  # Jinja's errors (TemplateError, raise_exception in the template) and HF's checks
        field = "messages"
        if isinstance(exc, jinja2.TemplateSyntaxError):
            from_kwargs = options["chat_template"] is None and given.get("chat_template") is not None
            field = "chat_template_kwargs" if from_kwargs else "chat_template"
        raise FieldError(f"the chat template failed: {type(exc).__name__}: {exc}", field) from exc
    if not isinstance(text, str):
        raise FieldError(f"the chat template rendered a {type(text).__name__}, not text", "chat_template")
    # After rendering, which reports a template that does not parse.
    _check_template_reads(tokenizer.get_chat_template(chat_template, kwargs.get("tools")), kwargs,
                          "tools" if tools is not None else "chat_template_kwargs")
    return RenderedChat(text)


# Arguments apply_chat_template acts on itself or every template may leave alone.
_NOT_TEMPLATE_VARIABLES = frozenset({"add_generation_prompt", "continue_final_message", "tokenize"})


def _check_template_reads(template: str, kwargs: dict[str, Any], tools_field: str) -> None:
    """Raises FieldError for ``tools`` or a ``chat_template_kwargs`` key the template never reads:
    the model would not see it (vLLM drops such keys without a word). An empty ``tools`` asks for nothing."""
    given = {name for name, value in kwargs.items() if not (name == "tools" and value == [])}
    unread = sorted(given - _NOT_TEMPLATE_VARIABLES - template_variables(template))
    if unread:
        field = tools_field if unread == ["tools"] else "chat_template_kwargs"
        raise FieldError(f"the chat template does not read {', '.join(unread)}, so it would change nothing; the "
                         f"template reads {', '.join(sorted(template_variables(template))) or 'no variables'}", field)


@functools.lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset[str]:
    """The variables a Jinja chat template reads (those it does not set itself), parsed by the
    environment transformers renders chat templates in (its extensions' tags included)."""
    environment = _compile_jinja_template(template).environment
    return frozenset(jinja2.meta.find_undeclared_variables(environment.parse(template)))


def merge_kwargs(defaults: dict[str, Any] | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with the ``overrides`` that are set (not None), as vLLM merges
    ``chat_template_kwargs`` under ``LLM.chat``'s own arguments."""
    return {**(defaults or {}), **{k: v for k, v in overrides.items() if v is not None}}
