"""Conversations (OpenAI's chat message format) to prompt text through the model's chat template."""

import functools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template  # the environment chats render in

from pagedlm.config import load_chat_template
from pagedlm.transformers_utils.tokenizer import configured_chat_template
from pagedlm.utils import FieldError, nested_too_deeply, too_deep

# vLLM's text content part types, each with the key that holds its text.
TEXT_PART_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
                  "thinking": "thinking"}

# A message's keys: vLLM's (its CustomChatCompletionMessageParam), the older names of ``reasoning``
# that transformers' apply_chat_template takes as it (reasoning_content, thinking), and the fields of
# an OpenAI response's assistant message that a conversation hands back (the OpenAI SDK's
# ``message.model_dump()``) and that vLLM does not render (refusal, annotations, audio,
# function_call). Any other key is refused: a misspelt "content" would leave its message empty.
_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning", "tools", "task",
                 "refusal", "annotations", "audio", "function_call", "reasoning_content", "thinking")
# The names of an assistant's past reasoning (transformers' _REASONING_FIELDS).
_REASONING_KEYS = ("reasoning", "reasoning_content", "thinking")
# Keys only one role's messages take (vLLM drops them from any other role's).
_ROLE_KEYS = {**dict.fromkeys(("tool_calls", *_REASONING_KEYS, "refusal", "annotations", "audio", "function_call"),
                              "assistant"),
              "tool_call_id": "tool", "tools": "developer"}

# A text part's keys that are not passed on to the template with it (vLLM's content part fields).
_PART_KEYS = frozenset({"type", "text", "refusal", "thinking", "name", "uuid", "closed", "data", "file",
                        "prompt_cache_breakpoint", "image_url", "image_pil", "image_embeds", "audio_url",
                        "audio_embeds", "input_audio", "video_url", "video_embeds"})
_BILLING_HEADER = "x-anthropic-billing-header"
# vLLM's chat_template_content_format values: "auto" detects the template's (detect_content_format).
CONTENT_FORMATS = ("auto", "string", "openai")

logger = logging.getLogger("pagedlm")

Conversation = list[dict[str, Any]]

# render_chat's options besides the conversation (OpenAI's and vLLM's chat request fields).
CHAT_OPTIONS = ("chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "tools",
                "chat_template_content_format")
# Each option's type, and its words for messages.
_OPTION_TYPES = {"chat_template": (str, "a string"), "chat_template_kwargs": (dict, "an object"),
                 "add_generation_prompt": (bool, "True or False"), "continue_final_message": (bool, "True or False"),
                 "tools": (list, "a list of tool definitions"),
                 "chat_template_content_format": (str, "a string")}


@dataclass(frozen=True, slots=True)
class RenderedChat:
    """A prompt that a chat template made (``render_chat``): the template has placed its special
    tokens in ``text``, so ``LLM.generate`` tokenizes it without adding any, unless
    ``add_special_tokens`` (vLLM's chat request field: the tokenizer's on top of the template's; a
    call's ``tokenization_kwargs`` decides over it). ``cache_salt`` is a prompt dict's
    (``inputs.TextPrompt``)."""

    text: str
    cache_salt: str | None = None
    add_special_tokens: bool = False


def is_conversation(messages: object) -> bool:
    """True for one conversation (a list of message dicts), False for a list of conversations
    (an empty list is none, as in vLLM's ``LLM.chat``)."""
    return isinstance(messages, Sequence) and not isinstance(messages, str) and bool(messages) and isinstance(messages[0], dict)


def parse_conversation(conversation: object, content_format: str = "string") -> Conversation:
    """The conversation as vLLM hands it to a chat template: every message checked, its content
    made text, and only the fields vLLM keeps.

    A message is ``{"role": str, "content": ...}``. Any role goes to the template as it is (e.g.
    Llama 3's "ipython"; "developer" becomes "system" for a template that does not know it). The
    content is a str; null or absent; or a list of parts, each a str or a text part
    (``{"type": "text" | "input_text" | "output_text", "text": str}``, ``{"type": "refusal",
    "refusal": str}``, ``{"type": "thinking", "thinking": str}``) or vLLM's ``{"type":
    "tool_reference", "name": str}`` (a deferred tool the template expands). In the "string" content
    format the texts (empty ones skipped, a tool reference's name) are joined with newlines, null
    content is ""; in the "openai" format (a template that loops over a message's content,
    ``detect_content_format``) the content is a list of ``{"type": "text", "text": str}`` parts, with
    a part's other keys, and tool references, and null content is ``[]``; a tool message's content
    is text in both, unless it holds a tool reference ("openai": its parts, as vLLM keeps them).

    Besides role and content a message keeps only what vLLM's ``parse_chat_messages`` keeps: a
    str ``name`` or ``task``; an assistant's ``tool_calls`` (dropped when empty, each of type
    "function", its ``function.arguments`` given as JSON text parsed, and anything that is not a
    JSON object, absent or empty as ``{}``, as templates render them with ``tojson``) and
    ``reasoning`` (also passed as ``reasoning_content``; either name, or ``thinking``, gives it, as
    transformers reads them, where vLLM drops the older names); a tool message's ``tool_call_id``;
    a developer message's ``tools`` (null where absent). Other null fields are absent (a Parquet
    struct or an OpenAI client writes every key), and another role's field is refused unless
    empty (vLLM drops it). A system message's text part that starts with
    Claude Code's "x-anthropic-billing-header" line loses that line, as in vLLM.

    Raises:
        ValueError: the first problem, naming the message's index and the field; a non-text
            content part (an image, audio, video) among them: pagedlm has no multimodal inputs.
    """
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"content_format must be one of {', '.join(CONTENT_FORMATS)}, got {content_format!r}")
    return _in_format(_parse_messages(conversation), content_format)


def _parse_messages(conversation: object) -> Conversation:
    """``parse_conversation``'s messages, their content still a list of text parts."""
    if not isinstance(conversation, Sequence) or isinstance(conversation, str):
        got = "None" if conversation is None else type(conversation).__name__  # a row's null, not "NoneType"
        raise ValueError(f"a conversation must be a list of messages, got {got}")
    if not conversation:
        raise ValueError("a conversation must have at least one message")
    return [_parse_message(i, message) for i, message in enumerate(conversation)]


def _in_format(messages: Conversation, content_format: str) -> Conversation:
    """Parsed messages with their content in ``content_format``: text (the non-empty parts joined
    by newlines, a tool reference by its name) in "string", parts in "openai", where a tool
    message's is text all the same unless it holds a tool reference, which its template expands
    (vLLM's)."""
    if content_format == "openai":
        return [m if m["role"] != "tool" or any(p["type"] != "text" for p in m["content"])
                else {**m, "content": "\n".join(p["text"] for p in m["content"])} for m in messages]
    return [{**m, "content": "\n".join(t for p in m["content"] if (t := _part_text(p)))} for m in messages]


def _part_text(part: dict[str, Any]) -> str:
    """A parsed part as text: a text part's text, a tool reference's name."""
    return part["name"] if part["type"] == "tool_reference" else part["text"]


def _parse_message(i: int, message: object) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role is None:
        raise ValueError(f"message {i} has no 'role'")
    if not isinstance(role, str):
        raise ValueError(f"message {i}: 'role' must be a str (e.g. 'user'), got {type(role).__name__}")
    # Null is absent (a Parquet struct gives each row's messages the other rows' keys as nulls).
    unknown = [key for key, value in message.items() if key not in _MESSAGE_KEYS and value is not None]
    if unknown:
        raise ValueError(f"message {i} has unknown key(s) {', '.join(map(repr, unknown))}; a message takes "
                         f"{', '.join(map(repr, _MESSAGE_KEYS))}")
    # Another role's key is refused unless it is empty (a dataset's column of "" or [] says nothing).
    misplaced = [key for key, owner in _ROLE_KEYS.items() if role != owner and not _empty(message.get(key))]
    if misplaced:
        owners = "; ".join(f"{key!r} is a{'n' * (_ROLE_KEYS[key] == 'assistant')} {_ROLE_KEYS[key]} message's"
                           for key in misplaced)
        raise ValueError(f"message {i} is a {role!r} message: {owners}")
    for key in ("name", "task", *_REASONING_KEYS):
        if message.get(key) is not None and not isinstance(message[key], str):
            raise ValueError(f"message {i}: {key!r} must be a str, got {type(message[key]).__name__}")
    content = _content_parts(i, message.get("content"), billed=role == "system")
    parsed: dict[str, Any] = {"role": role, "content": content}
    # In vLLM's order, which a template that dumps a message as JSON shows.
    tool_calls = message.get("tool_calls")
    if role == "assistant" and tool_calls is not None:
        if isinstance(tool_calls, (dict, str, bytes)) or not isinstance(tool_calls, Iterable):
            # vLLM takes any other iterable (list(...)); a dict's iteration would give its keys as calls
            raise ValueError(f"message {i}: tool_calls must be a list of tool calls, got "
                             f"{type(tool_calls).__name__} {tool_calls!r:.80}")
        calls = [_parse_tool_call(i, call) for call in tool_calls]
        if calls:  # an empty list would take a template off its plain assistant path
            parsed["tool_calls"] = calls
    given = [key for key in _REASONING_KEYS if message.get(key) is not None]
    if len({message[key] for key in given}) > 1:
        raise ValueError(f"message {i}: {', '.join(map(repr, given))} are names of one field, the message's "
                         "reasoning, and differ; give one")
    if role == "assistant" and given:
        parsed["reasoning"] = parsed["reasoning_content"] = message[given[0]]
    if role == "tool" and "tool_call_id" in message:
        parsed["tool_call_id"] = message["tool_call_id"]
    parsed.update({key: message[key] for key in ("name", "task") if message.get(key) is not None})
    if role == "developer":  # vLLM passes it even when absent
        parsed["tools"] = message.get("tools")
    return parsed


def _empty(value: object) -> bool:
    """None, or an empty str, list, tuple or dict."""
    return value is None or isinstance(value, (str, list, tuple, dict)) and not value


def _content_parts(i: int, content: object, billed: bool) -> list[dict[str, Any]]:
    """The content's text parts as ``{"type": "text", "text": str, **other keys}``; parts whose
    text is null are skipped (vLLM's). With ``billed`` (a system message), a str or "text" part
    that starts with Claude Code's billing header loses that line, and the part if nothing is
    left: it changes every request and would end its prefix-cache hits (vLLM drops it)."""
    if content is None:
        return []  # e.g. OpenAI's assistant turn that only calls tools
    if isinstance(content, str):
        content = [content]
    if not isinstance(content, list):
        raise ValueError(f"message {i}: 'content' must be a str, a list of text parts or null, "
                         f"got {type(content).__name__}")
    parts = []
    for raw in content:
        part = _text_part(i, raw)
        if part is not None and billed and part["type"] == "text" and part["text"].startswith(_BILLING_HEADER) and (
                isinstance(raw, str) or raw.get("type") == "text"):
            rest = part["text"].partition("\n")[2]
            part = {**part, "text": rest} if rest else None
        if part is not None:
            parts.append(part)
    return parts


def _text_part(i: int, part: object) -> dict[str, Any] | None:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    part_type = part.get("type") if isinstance(part, dict) else None
    if part_type == "tool_reference":  # a deferred tool's name, for the template to expand (vLLM's)
        if not isinstance(part.get("name"), str):
            raise ValueError(f"message {i}: a 'tool_reference' part's 'name' must be a str, got {part.get('name')!r:.40}")
        return {"type": "tool_reference", "name": part["name"]}
    key = TEXT_PART_KEYS.get(part_type) if isinstance(part_type, str) else None
    if key is None:
        raise ValueError(f"message {i}: content part {part!r:.80} is not text, and pagedlm has no multimodal "
                         f"inputs (a part is a str or a dict of type {', '.join(TEXT_PART_KEYS)} or tool_reference)")
    if key not in part:
        raise ValueError(f"message {i}: a {part_type!r} part has no {key!r}")
    text = part[key]
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"message {i}: a {part_type!r} part's {key!r} must be a str, got {type(text).__name__}")
    return {"type": "text", "text": text, **{k: v for k, v in part.items() if k not in _PART_KEYS and v is not None}}


def _knows_developer_role(template: str) -> bool:
    return '"developer"' in template or "'developer'" in template


def _developer_as_system(messages: Conversation) -> Conversation:
    """For a template that does not know the "developer" role (vLLM's rule): developer messages
    become system messages (without their ``tools``), and several system messages, or one after
    the first message, become one at the start, their texts joined by a blank line. Takes and
    gives content as text parts (``_parse_messages``), so that the merged message reaches the
    template in either content format (a hunt: as text in "openai", a template that loops over
    the parts rendered none of it)."""
    if all(m["role"] != "developer" for m in messages):
        return messages
    messages = [{k: v for k, v in m.items() if k != "tools"} | {"role": "system"} if m["role"] == "developer" else m
                for m in messages]
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    if systems == [0]:
        return messages
    texts = ("\n".join(t for p in messages[i]["content"] if (t := _part_text(p))) for i in systems)
    return [{"role": "system", "content": [{"type": "text", "text": "\n\n".join(t for t in texts if t)}]},
            *(m for m in messages if m["role"] != "system")]


def _parse_tool_call(i: int, call: object) -> dict[str, Any]:
    """A tool call with its ``function.arguments`` an object: JSON text parsed; anything that is
    not an object (invalid JSON, a number, a list, absent) becomes ``{}`` with a warning, as vLLM
    coerces it so that a conversation whose history holds one can go on."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise ValueError(f"message {i}: each of tool_calls must be an object of type 'function' with a "
                         f"'function' object, got {call!r:.80}")
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments:
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    if not isinstance(arguments, dict):
        if function.get("arguments"):
            logger.warning("message %d: tool call %r has arguments that are not a JSON object; the template "
                           "gets {} instead", i, function.get("name"))
        arguments = {}
    return {**call, "function": {**function, "arguments": arguments}}


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    conversation: object,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    chat_template_content_format: str = "auto",
    template_files: bool = True,
) -> RenderedChat:
    """The prompt the template makes of ``conversation``, checked by ``parse_conversation`` first.
    Its text already holds the template's special tokens (BOS included), so it is tokenized with
    ``add_special_tokens=False``. ``tools`` (OpenAI's tool definitions) go to the template as
    ``tools``. ``chat_template_kwargs`` go to it too, under the arguments: an argument that is not
    None wins over the key of the same name (vLLM's ``merge_kwargs``), so they only fill in
    ``tools`` and ``chat_template`` when those are None (they may not set the conversation or
    ``tokenize``); the template the tokenizer was loaded with (``configured_chat_template``) is
    the ``chat_template`` argument's default. A ``chat_template_content_format`` other than the
    template's (``detect_content_format``) is used, with vLLM's warning. ``chat_template`` names a file only with ``template_files``: a job row's
    template is template text or one of the tokenizer's template names, never a local file that
    a row of data would read into its prompt.

    Raises:
        FieldError: its ``field`` the argument at fault: a bad message (``parse_conversation``;
            "messages"), the tokenizer has no template and none is given ("messages"), both
            ``add_generation_prompt`` and ``continue_final_message`` are set, ``chat_template_kwargs``
            sets the conversation or ``tokenize``, the template does not parse ("chat_template"),
            or the template rejects the conversation ("messages"; its message is kept, e.g.
            "Conversation roles must alternate").
    """
    options = {"chat_template": chat_template, "chat_template_kwargs": chat_template_kwargs, "tools": tools,
               "add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
               "chat_template_content_format": chat_template_content_format}
    for name, value in options.items():
        kind, words = _OPTION_TYPES[name]
        if value is not None and not isinstance(value, kind):
            raise FieldError(f"{name} must be {words}, got {value!r:.40}", name)
    bad_keys = [key for key in chat_template_kwargs or {} if not isinstance(key, str)]
    if bad_keys:
        raise FieldError(f"chat_template_kwargs' keys must be strings (the template's variable names), got "
                         f"{bad_keys[0]!r:.40}", "chat_template_kwargs")
    for name in options:
        kind, words = _OPTION_TYPES[name]
        # The same option as a template variable (it reaches the template where the argument is None).
        inner = (chat_template_kwargs or {}).get(name)
        if name != "chat_template_kwargs" and inner is not None and not isinstance(inner, kind):
            raise FieldError(f"chat_template_kwargs.{name} must be {words}, got {inner!r:.40}", "chat_template_kwargs")
    for where, value in (("tools", tools), ("chat_template_kwargs.tools", (chat_template_kwargs or {}).get("tools"))):
        if isinstance(value, list) and not all(isinstance(tool, dict) for tool in value):
            raise FieldError(f"{where} must be a list of tool definitions (objects), got {value!r:.60}",
                             where.split(".")[0])
    if chat_template_content_format not in CONTENT_FORMATS:
        raise FieldError(f"chat_template_content_format must be one of {', '.join(CONTENT_FORMATS)}, got "
                         f"{chat_template_content_format!r:.40}", "chat_template_content_format")
    # Before the template walks them (found by a hunt: "the chat template failed: RecursionError").
    for name, value in (("messages", conversation), ("tools", tools), ("chat_template_kwargs", chat_template_kwargs)):
        if nested_too_deeply(value):
            raise FieldError(too_deep(name), name)
    try:
        messages = _parse_messages(conversation)
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
    # The LLM's own template (text already) wins over the kwargs' as a call's does.
    configured = configured_chat_template(tokenizer) if chat_template is None else None
    kwargs = merge_kwargs(given, {
        "add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
        "tools": tools, "chat_template": chat_template if configured is None else configured, "tokenize": False,
    })
    from_kwargs = chat_template is None and configured is None and given.get("chat_template") is not None
    template_field = "chat_template_kwargs" if from_kwargs else "chat_template"
    chat_template = kwargs.pop("chat_template", None)
    if configured is None:
        chat_template = _resolve_template(tokenizer, chat_template, template_field, template_files)
    if kwargs.get("add_generation_prompt") and kwargs.get("continue_final_message"):
        raise FieldError("add_generation_prompt and continue_final_message cannot both be True",
                         "continue_final_message" if continue_final_message else "chat_template_kwargs")
    template = tokenizer.get_chat_template(chat_template, kwargs.get("tools"))
    detected = detect_content_format(template)
    if chat_template_content_format == "auto":
        chat_template_content_format = detected
    elif chat_template_content_format != detected:
        _warn_content_format(chat_template_content_format, detected, template)
    if not _knows_developer_role(template):
        messages = _developer_as_system(messages)
    messages = _in_format(messages, chat_template_content_format)
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, **kwargs)
    except Exception as exc:  # Jinja's errors (TemplateError, raise_exception in the template) and HF's checks
        field, hint = "messages", ""
        if isinstance(exc, jinja2.TemplateSyntaxError):
            field = template_field
        elif options["chat_template_content_format"] == "openai" and detected == "string":
            field, hint = "chat_template_content_format", (" (content was a list of parts, chat_template_content_format "
                                                           "'openai'; this template reads text: 'string' or 'auto')")
        raise FieldError(f"the chat template failed: {type(exc).__name__}: {exc}{hint}", field) from exc
    if not isinstance(text, str):
        raise FieldError(f"the chat template rendered a {type(text).__name__}, not text", "chat_template")
    # After rendering, which reports a template that does not parse.
    _check_template_reads(template, kwargs, "tools" if tools is not None else "chat_template_kwargs")
    return RenderedChat(text)


def _resolve_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None, field: str,
                      files: bool) -> str | None:
    """``chat_template`` as ``apply_chat_template`` takes it: the name of one of the tokenizer's
    templates, the text of a file it names (with ``files``), or template text as given
    (``config.load_chat_template``)."""
    own = tokenizer.chat_template
    if chat_template is None:
        if own is None:
            raise FieldError("the tokenizer has no chat template; pass chat_template= (a Jinja template string)",
                             "messages")
        return None
    if isinstance(own, dict) and chat_template in own:
        return chat_template
    try:
        return load_chat_template(chat_template, files)
    except ValueError as exc:
        names = f"; or name one of the tokenizer's templates: {', '.join(own)}" if isinstance(own, dict) else ""
        raise FieldError(f"{str(exc).rstrip('.')}{names}", field) from None


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
def _warn_content_format(given: str, detected: str, template: str) -> None:
    """vLLM's warning, once per template: the detection may miss how a template reads content, so the format given
    is used; where it is wrong the messages' text is lost from the prompt."""
    logger.warning("chat_template_content_format %r is not the format detected from the chat template (%r); "
                   "it is used as given: where the template does not read content that way, the messages' text "
                   "is missing from the prompt", given, detected)


@functools.lru_cache(maxsize=16)
def detect_content_format(template: str) -> str:
    """The content format a chat template expects (vLLM's "auto"): "openai" (a list of parts) where
    it loops over a message's content, directly (``{% for part in message['content'] %}``, the
    message from a loop over ``messages`` or a variable set from it), as a macro's parameter the
    content is passed to, or as a variable named ``content`` outside a macro; else "string",
    which is also the answer, as in vLLM, for a template that does not parse or that assigns or
    unpacks what it reads from the messages into anything but a plain variable."""
    try:
        return _content_format(_compile_jinja_template(template).environment.parse(template))
    except (jinja2.TemplateError, _Unfollowed):
        return "string"


class _Unfollowed(Exception):
    """A template stores messages or content where the detection does not follow them."""


def _content_format(root: jinja2.nodes.Template) -> str:
    sources, grew = {"messages"}, True
    while grew:  # every variable set from the messages, in whatever order the template sets them
        grew = False
        for assign in root.find_all(jinja2.nodes.Assign):
            if _reads(assign.node, sources):
                if not isinstance(assign.target, jinja2.nodes.Name):
                    raise _Unfollowed
                grew |= assign.target.name not in sources
                sources.add(assign.target.name)
    loops = list(root.find_all(jinja2.nodes.For))
    messages = set()
    for loop in loops:
        if _reads(loop.iter, sources):
            if not isinstance(loop.target, jinja2.nodes.Name):
                raise _Unfollowed
            messages.add(loop.target.name)
    in_macros, macro_params = set(), {}
    for macro in root.find_all(jinja2.nodes.Macro):
        names = [arg.name for arg in macro.args]
        passed = set()
        for call in root.find_all(jinja2.nodes.Call):
            if isinstance(call.node, jinja2.nodes.Name) and call.node.name == macro.name:
                passed |= {names[i] for i, arg in enumerate(call.args[:len(names)]) if _reads(arg, messages, "content")}
                passed |= {kw.key for kw in call.kwargs if kw.key in names and _reads(kw.value, messages, "content")}
        for loop in macro.find_all(jinja2.nodes.For):  # an inner macro's loops too
            in_macros.add(id(loop))
            if passed:
                macro_params[id(loop)] = passed
    for loop in loops:
        name = loop.iter.name if isinstance(loop.iter, jinja2.nodes.Name) else None
        if _reads(loop.iter, messages, "content") or name in macro_params.get(id(loop), ()) or (
                name == "content" and id(loop) not in in_macros):
            if not isinstance(loop.target, jinja2.nodes.Name):
                raise _Unfollowed
            return "openai"
    return "string"


def _reads(node: jinja2.nodes.Node, names: set[str], key: str | None = None) -> bool:
    """Whether ``node`` is one of the variables ``names`` (with ``key``: its item or attribute
    ``key``), through filters, tests and slices."""
    while isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) or (
            isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice)):
        node = node.node
        if node is None:
            return False
    if key is not None:
        if isinstance(node, jinja2.nodes.Getattr) and node.attr == key:
            node = node.node
        elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key:
            node = node.node
        else:
            return False
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name in names


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
