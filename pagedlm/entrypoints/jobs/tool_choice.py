"""OpenAI's ``tools`` and ``tool_choice`` in a chat body, without a parser of any model's tool-call
syntax: a named function or "required" becomes a structured-outputs constraint (vLLM 0.32's
``get_json_schema_from_tools``) and the constrained text the response's ``tool_calls``; "none"
shows the tools to the chat template only; "auto" (the default beside tools) needs a parser of the
model's own tool-call syntax, which pagedlm does not have, and is refused, as vLLM's server
refuses it without ``--tool-call-parser``.

The request fields and the ``tool_calls`` objects are OpenAI's (API reference, "Create chat
completion"); ``finish_reason`` is "tool_calls" for "required" and the output's own for a named
function, as OpenAI and vLLM write them.
"""

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pagedlm.engine.structured_outputs import schema_problem, unenforceable
from pagedlm.entrypoints.jobs.rows import RowError, json_text, schema_without_nulls
from pagedlm.utils import unicode_problem

_TOOL_KEYS = {"type", "function"}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
_CHOICES = ("none", "auto", "required")
# A function without parameters takes an empty object (vLLM's _params_or_empty_object).
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """A chat row's tools as checked: ``tools`` for the chat template, ``choice`` "none",
    "required" or the named function's name, and ``schema`` the constraint that makes the model
    call them (None for "none")."""

    tools: list[dict[str, Any]]
    choice: str
    schema: dict[str, Any] | None

    @property
    def calls(self) -> bool:
        return self.schema is not None

    def message(self, text: str | None, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The response's ``message`` fields and ``finish_reason`` for one completion's ``text``
        (None: a reasoning that never ended). Where the model was made to call: ``content`` None
        and the calls as ``tool_calls``; a "required" text that is no list of calls (cut off by
        ``max_tokens``) stays the content, and an empty text makes no call. A message without
        calls has no ``tool_calls`` (as OpenAI and vLLM write it)."""
        if not self.calls:
            return {"content": text}, finish_reason
        if self.choice != "required":
            calls = [(self.choice, text)] if text and text.strip() else []
        else:
            try:
                calls = [(call["name"], json.dumps(call["parameters"], ensure_ascii=False)) for call in json.loads(text)]
            except (ValueError, TypeError, KeyError):
                return {"content": text}, finish_reason
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        if not calls:
            return {"content": None}, finish_reason
        tool_calls = [{"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
                       "function": {"name": name, "arguments": arguments}} for name, arguments in calls]
        return {"content": None, "tool_calls": tool_calls}, finish_reason


def tool_choice_of(body: dict[str, Any], value_nulls: bool = True) -> ToolChoice | None:
    """The body's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked, or None where it
    gives no tools and no choice (``tool_choice: "none"`` alone asks for nothing). Null is unset
    at any depth (``schema_without_nulls``, whose ``value_nulls`` this is).

    Raises:
        RowError: naming the field: tools not a non-empty list of ``{"type": "function",
            "function": {"name", "description", "parameters", "strict"}}`` with distinct names,
            a choice other than "none", "required" or ``{"type": "function", "function":
            {"name"}}`` naming one of them, "auto" (no tool-call parser), a choice without tools,
            ``parallel_tool_calls`` not true or false, a function's ``parameters`` xgrammar would
            not enforce (``structured_outputs.unenforceable``) or, for the functions the choice
            compiles, cannot read (``structured_outputs.schema_problem``), or functions' ``$defs``
            that clash.
    """
    tools = schema_without_nulls(body.get("tools"), value_nulls, "body.tools", "tools")
    choice = schema_without_nulls(body.get("tool_choice"), value_nulls, "body.tool_choice", "tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RowError(f"body.parallel_tool_calls must be true or false, got {json_text(parallel, 40)}", "parallel_tool_calls")
    if tools is None:
        if choice in (None, "none"):
            return None
        raise RowError("body.tool_choice needs body.tools", "tool_choice")
    functions = _functions(tools)
    if choice is None or choice == "auto":
        raise RowError('body.tool_choice "auto" (the default beside tools) needs a parser of the model\'s tool-call '
                       'syntax, which pagedlm does not have: give tool_choice "required", '
                       '{"type": "function", "function": {"name": ...}} or "none"', "tool_choice")
    if choice == "none":
        return ToolChoice(tools, "none", None)
    if choice == "required":
        _check_compiles(functions, functions)
        return ToolChoice(tools, "required", _calls_schema(functions, parallel is not False))
    name = _named(choice)
    if name not in functions:
        raise RowError(f"body.tool_choice names function {json_text(name)}, which is not in body.tools (they define "
                       f"{', '.join(map(json_text, functions))})", "tool_choice")
    _check_compiles(functions, [name])
    return ToolChoice(tools, name, functions[name])


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    """Each function's parameters schema by its name (an empty object where it has none)."""
    if not isinstance(tools, list) or not tools:
        raise RowError(f"body.tools must be a non-empty list of tool definitions, got {json_text(tools, 60)}", "tools")
    functions = {}
    for i, tool in enumerate(tools):
        where = f"body.tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - _TOOL_KEYS:
            raise RowError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}} (the only tool type "
                           f"of chat completions), got {json_text(tool, 60)}", "tools")
        function = tool.get("function")
        if not isinstance(function, dict) or set(function) - _FUNCTION_KEYS:
            raise RowError(f"{where}.function must be an object with {', '.join(sorted(_FUNCTION_KEYS))}, got "
                           f"{json_text(function, 60)}", "tools")
        name, parameters = function.get("name"), function.get("parameters")
        if not isinstance(name, str) or not name:
            raise RowError(f"{where}.function.name must be a non-empty string, got {json_text(name, 40)}", "tools")
        if problem := unicode_problem(name):  # a hunt: named the schema of the calls, which the row never set
            raise RowError(f"{where}.function.name is not valid Unicode ({problem})", "tools")
        if name in functions:
            raise RowError(f"body.tools defines function {json_text(name)} twice", "tools")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise RowError(f"{where}.function.description must be a string, got {json_text(function['description'], 40)}",
                           "tools")
        if parameters is not None and not isinstance(parameters, dict):
            raise RowError(f"{where}.function.parameters must be a JSON schema object, got {json_text(parameters, 40)}", "tools")
        problem = unenforceable(parameters) if parameters else None
        if problem:  # here, to name the function (the engine would name the schema of the calls)
            raise RowError(f"{where}.function.parameters ({json_text(name)}): {problem}", "tools")
        if function.get("strict") is not None and not isinstance(function["strict"], bool):
            raise RowError(f"{where}.function.strict must be true or false, got {json_text(function['strict'], 40)}", "tools")
        functions[name] = parameters or dict(_NO_PARAMETERS)
    return functions


def _check_compiles(functions: dict[str, dict[str, Any]], names: Iterable[str]) -> None:
    """Refuse the parameters of ``names``, the functions the choice compiles, that xgrammar
    cannot read, naming the function (the engine would name the schema of the calls)."""
    names = set(names)
    for i, (name, parameters) in enumerate(functions.items()):
        problem = schema_problem(parameters) if name in names else None
        if problem:
            raise RowError(f"body.tools[{i}].function.parameters ({json_text(name)}): {problem}", "tools")


def _named(choice: Any) -> str:
    if not isinstance(choice, dict):
        raise RowError(f"body.tool_choice must be one of {', '.join(map(json_text, _CHOICES))} or {{\"type\": \"function\", "
                       f"\"function\": {{\"name\": ...}}}}, got {json_text(choice, 60)}", "tool_choice")
    function = choice.get("function")
    if choice.get("type") != "function" or set(choice) != {"type", "function"} or not isinstance(function, dict) \
            or set(function) != {"name"} or not isinstance(function["name"], str):
        raise RowError(f"body.tool_choice must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} to name a "
                       f"function, got {json_text(choice, 80)}", "tool_choice")
    return function["name"]


def _calls_schema(functions: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """vLLM's schema of "required": a list of one or more ``{"name", "parameters"}`` objects, one
    call where ``parallel_tool_calls`` is false. The functions' ``$defs`` move to the list's root,
    where their ``#/$defs/...`` references then point."""
    defs: dict[str, Any] = {}
    calls = []
    for name, parameters in functions.items():
        parameters = dict(parameters)
        own = parameters.pop("$defs", {})
        stray = next((ref for ref in _refs([parameters, own]) if not ref.startswith("#/$defs/")), None)
        if not isinstance(own, dict) or stray is not None:
            raise RowError(f'function {json_text(name)}: with tool_choice "required" a function\'s parameters are one part of '
                           "a schema of calls, where only references into its $defs (an object) still hold"
                           + (f", not {json_text(stray)}" if stray is not None else ""), "tools")
        for def_name, schema in own.items():
            if defs.setdefault(def_name, schema) != schema:
                raise RowError(f'body.tools define $defs {json_text(def_name)} twice, differently (tool_choice "required" '
                               "puts every function's $defs in one schema)", "tools")
        calls.append({"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return {**schema, "$defs": defs} if defs else schema


def _refs(schema: Any) -> list[str]:
    """Every ``$ref`` string in ``schema``, at any depth."""
    if isinstance(schema, dict):
        own = [schema["$ref"]] if isinstance(schema.get("$ref"), str) else []
        return own + [ref for value in schema.values() for ref in _refs(value)]
    if isinstance(schema, list):
        return [ref for value in schema for ref in _refs(value)]
    return []
