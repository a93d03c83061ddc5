"""What the job formats share: a parsed row, a row's error, and JSON fields to ``SamplingParams``."""

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from pagedlm.engine.structured_outputs import schema_problem
from pagedlm.entrypoints.llm import LLM, PromptType
from pagedlm.outputs import RequestOutput
from pagedlm.sampling_params import SamplingParams
from pagedlm.utils import FieldError, nested_too_deeply, too_deep

logger = logging.getLogger("pagedlm")

# SamplingParams fields a row may set. Not a row's: callables, the engine's streaming (the job
# sets it), fields only one's own code reads, and the Python type of logprobs (a job writes JSON).
_ROW_REFUSED = frozenset({"logits_processors", "output_kind", "stream_interval", "extra_args", "skip_clone",
                          "flat_logprobs"})
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in _ROW_REFUSED)
# Fields of integers, or of lists (of lists) of them.
INTEGER_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name in SAMPLING_FIELDS
                                and f.type in (int, int | None, list[int], list[int] | None)
                                or f.name == "prompt_logprob_token_ids")

NUMBER_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name in SAMPLING_FIELDS
                               and f.type in (float, float | None))

RowKey = str | int | None  # a row's id; None for a row whose id could not be read
_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "seed")  # what a beam search has no use for

# A job's max_logprobs unless --max-logprobs (engine_kwargs on Ray) says otherwise: vLLM's default.
# Without a limit one row asking for every token's logprobs (-1) over a long prompt writes gigabytes
# and can exhaust the machine's memory, ending the job for every row (found by a hunt).
JOB_MAX_LOGPROBS = 20


def json_text(value: Any, width: int = 60) -> str:
    """A row's value as JSON text (the row's own words: ``null``, ``true``, ``{"a": 1}``), cut to
    ``width`` characters; for a row's error messages."""
    return json.dumps(value, ensure_ascii=False, default=repr)[:width]


class RowError(ValueError):
    """Why one row cannot run; it becomes that row's error in the output.

    ``param`` names the offending field where there is one (OpenAI's error ``param``).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class JobRow:
    """One input row ready to run: its id, prompt and parameters, the row as read, the row's name
    for each ``SamplingParams`` field it set and for "prompt" (``row_names``), and what else its
    output row needs."""

    key: RowKey
    prompt: PromptType
    params: SamplingParams
    row: dict
    names: dict[str, str]
    context: Any = None


class JobFormat(Protocol):
    """A row format (OpenAI batch or plain): input rows in, output rows out."""

    key_field: str  # the field that holds a row's id, in input and output rows alike
    integer_keys: bool  # whether an id may be an integer (else strings only)
    # The column that holds a row's request fields (an object), those of its fields that are
    # integers or lists of integers, and those that are numbers.
    fields_column: str
    integer_fields: tuple[str, ...]
    number_fields: tuple[str, ...]
    # Other columns whose values have one kind ("text", "object", "list", "integer list", "bool"),
    # which a Parquet input's column types must allow (``runner.check_column_types``).
    column_kinds: dict[str, str]

    def parse(self, row: Any, key: RowKey) -> JobRow:
        """The row as a request; raises ``RowError`` when it cannot run. ``key`` is ``key_of(row)``."""

    @staticmethod
    def key_of(row: Any) -> RowKey:
        """An input or output row's id, or None when it has none that can be read (never raises);
        resume skips the input rows whose ids the output holds. (A static method: a resumed job's
        output is read before the model, which formats need, loads.)"""

    @staticmethod
    def error_of(row: dict) -> str | None:
        """An output row's error message, None for a result row (never raises)."""

    def result_row(self, job_row: JobRow, output: RequestOutput) -> dict:
        """The output row of a finished request; RowError where the format has no form for it
        (the job writes the row's error instead)."""

    def error_row(self, key: RowKey, row: Any, error: str, param: str | None = None) -> dict:
        """The output row of a row that could not run; ``row`` is the input row, if it could be read."""


def sampling_defaults(llm: LLM, overrides: dict[str, Any]) -> dict[str, Any]:
    """A job's sampling defaults: the fields the model's generation config sets (what ``LLM`` uses
    when given no ``SamplingParams``), under ``overrides``."""
    model_defaults, plain = llm.get_default_sampling_params(), SamplingParams()
    fields = {f: getattr(model_defaults, f) for f in SAMPLING_FIELDS if getattr(model_defaults, f) != getattr(plain, f)}
    return {**fields, **overrides}


def parse_row(fmt: JobFormat, row: Any, key: RowKey) -> JobRow | RowError:
    """``fmt.parse(row, key)``, or why the row cannot run: its ``RowError``, or any other exception
    a check missed (logged with its traceback) as a ``RowError`` too, so that one row of an
    unforeseen shape fails alone instead of ending the job (found by a hunt: a string where an
    object belonged raised out of the parser)."""
    try:
        return fmt.parse(row, key)
    except RowError as exc:
        return exc
    except Exception as exc:
        logger.exception("row %r could not be read", key)
        return RowError(f"the row could not be read: {type(exc).__name__}: {exc}")


def engine_has_reasoning(engine: dict[str, Any]) -> bool:
    """Whether ``LLM(**engine)`` will know the reasoning strings ``thinking_token_budget`` needs."""
    return bool(engine.get("reasoning_parser") or engine.get("reasoning_config"))


def check_thinking_budget(defaults: SamplingParams, has_reasoning: bool, message: str) -> None:
    """A job whose default ``thinking_token_budget`` its engine cannot honour fails before any row
    runs (each row would fail), with ``message``."""
    if defaults.thinking_token_budget is not None and not has_reasoning:
        raise ValueError(message)


def row_names(fields: dict[str, Any], prompt_field: str, renames: dict[str, str] | None = None) -> dict[str, str]:
    """``JobRow.names``: each of ``fields`` (``SamplingParams`` fields the row set) by the row's name
    for it (its own, or the one ``renames`` gives, such as OpenAI's ``max_completion_tokens`` for
    ``max_tokens``), and "prompt" by the row's field that holds the prompt."""
    return {**{f: f for f in fields}, **(renames or {}), "prompt": prompt_field}


def without_nulls(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without null values, at the top level and inside values that are objects: null
    is unset, and Parquet (and Arrow) structs hold every key of every row, null where a row has
    none (``logit_bias`` gets the other rows' token ids as nulls, ``chat_template_kwargs`` the
    other rows' keys)."""
    return {k: {f: x for f, x in v.items() if x is not None} if isinstance(v, dict) else v
            for k, v in fields.items() if v is not None}


def sampling_params_from(fields: dict[str, Any], defaults: dict[str, Any], where: str,
                         names: dict[str, str], value_nulls: bool = True) -> SamplingParams:
    """``SamplingParams`` from a row's fields over the job's defaults; ``names`` is ``row_names``;
    ``value_nulls`` as in ``schema_without_nulls``.

    Raises:
        RowError: an unknown field (the message lists the allowed ones) or a bad value
            (``field_error``), ``where`` saying where the fields came from.
    """
    unknown = sorted(set(fields) - set(SAMPLING_FIELDS))
    if unknown:
        kind = "unknown field(s)" if set(unknown) - _ROW_REFUSED else "SamplingParams field(s) a job row cannot set"
        raise RowError(f"{where}: {kind} {', '.join(unknown)}; allowed: {', '.join(SAMPLING_FIELDS)}", unknown[0])
    if fields.get("use_beam_search") is True:
        # The defaults' sampling (the model's generation config: Qwen3's temperature, top_p, top_k)
        # does not apply to a beam search, which is greedy (vLLM's server ignores them too; found by
        # a hunt: every such row was refused); what the row sets itself still does.
        defaults = {k: v for k, v in defaults.items() if k not in _SAMPLING_ONLY} | {"temperature": 0.0}
    constraint = fields.get("structured_outputs")
    if isinstance(constraint, dict) and isinstance(constraint.get("json"), dict):
        schema = schema_without_nulls(constraint["json"], value_nulls, f"{where}: structured_outputs.json",
                                      names.get("structured_outputs", "structured_outputs"))
        fields = {**fields, "structured_outputs": {**constraint, "json": schema}}
    try:
        params = SamplingParams(**{**defaults, **fields})
    except ValueError as exc:
        raise field_error(exc, names, f"{where}: ") from None
    schema = params.structured_outputs.json if "structured_outputs" in fields else None
    problem = schema_problem(schema) if schema is not None else None
    if problem:  # here, to say where the row set it (the engine would name structured_outputs.json alone)
        raise RowError(f"{where}: structured_outputs.json: {problem}", names.get("structured_outputs", "structured_outputs"))
    return params


def schema_without_nulls(schema: Any, value_nulls: bool, where: str, param: str | None) -> Any:
    """A row's JSON schema without null-valued keys at any depth, but for ``const`` and
    ``default``, where null is a value, unless ``value_nulls`` is False (rows read from Arrow:
    Parquet, Ray Data). Elsewhere a schema has no use for null, and a Parquet struct holds every
    row's keys: each row's ``properties`` gets the other rows' properties as nulls, which xgrammar
    refuses (found by a hunt: every row of such a file failed), and its ``const`` another row's
    ``const`` as null, which would bind the value to null (found by a review). List items (an
    ``enum``'s) stay.

    Raises:
        RowError: the schema nests deeper than ``MAX_JSON_DEPTH`` (found by a hunt: a
            RecursionError naming no field), ``where`` naming it, ``param`` the row's field.
    """
    if nested_too_deeply(schema):
        raise RowError(too_deep(where), param)
    return _without_nulls_at_any_depth(schema, value_nulls)


def _without_nulls_at_any_depth(schema: Any, value_nulls: bool) -> Any:
    if isinstance(schema, dict):
        return {k: _without_nulls_at_any_depth(v, value_nulls) for k, v in schema.items()
                if v is not None or value_nulls and k in ("const", "default")}
    if isinstance(schema, list):
        return [_without_nulls_at_any_depth(v, value_nulls) for v in schema]
    return schema


def unwritable_row(fmt: JobFormat, key: RowKey, exc: Exception, row: dict) -> dict:
    """The error row that replaces an output row the output cannot hold (``exc`` says why). An
    error row's message leads it, which names the position of a row without an id (resume)."""
    why = f"the output row could not be written: {type(exc).__name__}: {exc}"
    error = fmt.error_of(row)
    return fmt.error_row(key, None, f"{error} ({why})" if error else why)


def field_error(exc: ValueError, names: dict[str, str], prefix: str = "") -> RowError:
    """A ``SamplingParams`` or request-check error (``LLM.generate_as_completed``'s) as the row's
    error: the field at fault (a ``FieldError``'s, else the one a ``SamplingParams`` message names
    first) by the row's name for it (``names``, ``row_names``), in the text too, with JSON's words.
    A field the row did not set (a job default) is no ``param``: then the first field the message
    names that the row set is ("temperature must be 0 with use_beam_search"). A prompt error is led
    by the row's prompt field where the message does not name it ("prompt_token_ids: the prompt
    is empty")."""
    message = str(exc)
    field = getattr(exc, "field", None)
    if field not in names:  # none, or a job default: the first field the message names that the row set
        named = _named_fields(message, SAMPLING_FIELDS)
        field = next((f for f in named if f in names), None)
    name = names.get(field)
    if name is not None and field == "prompt" and not re.search(_word(name), message):
        message = f"{name}: {message}"  # "the prompt is empty": name the row's field
    for named, row_name in names.items():  # the row's names in the text, the other fields' too (a hunt:
        # "min_tokens (5) must be <= max_tokens (2)" of a row that set max_completion_tokens)
        if row_name != named and named != "prompt":
            # A renamed field's own keys are not the row's ("structured_outputs.json" from response_format).
            message = re.sub(_word(named) + r"(?:\.\w+)?", row_name, message)
    return RowError(json_words(prefix + message), name)


def check_request_chat_template(options: dict[str, Any], trusted: bool, prefix: str = "") -> None:
    """A row's own ``chat_template`` is taken only where the job trusts request templates (vLLM's
    server flag, ``--trust-request-chat-template``): a template is code the job runs, and a loop in
    one can hold the whole job (a hunt: two nested ``range(100000)`` loops in one row's template).

    Raises:
        RowError: the row has a ``chat_template`` (or a ``chat_template_kwargs`` key of that name,
            which ``render_chat`` takes as one, as vLLM's server checks) and the job does not trust it.
    """
    kwargs = options.get("chat_template_kwargs")
    given = options.get("chat_template") is not None or \
        isinstance(kwargs, dict) and kwargs.get("chat_template") is not None
    if given and not trusted:
        raise RowError(f"{prefix}chat_template: a row's own chat template is taken only with "
                       "--trust-request-chat-template (vLLM's server flag; on Ray, PagedLMProcessorConfig's "
                       "trust_request_chat_template): a template is code the job runs; or give the job's "
                       "--chat-template", "chat_template")


def chat_error(exc: FieldError, prefix: str = "") -> RowError:
    """A ``render_chat`` error as the row's error, naming the row's field (its argument's name)."""
    message = str(exc)
    if not re.match(_word(exc.field), message):
        message = f"{exc.field}: {message}"
    return RowError(json_words(prefix + message), exc.field)


def _word(field: str) -> str:
    """``field`` as a word of a message: not inside a longer name, a dotted path or a flag
    ("--max-logprobs" does not name logprobs)."""
    return rf"(?<![\w.-]){re.escape(field)}\b"


def _named_fields(message: str, fields: tuple[str, ...]) -> list[str]:
    """The ``fields`` that ``message`` names, in the order it first names them (the longest first
    where two start at once)."""
    at = {f: m.start() for f in fields if (m := re.search(_word(f), message))}
    return sorted(at, key=lambda f: (at[f], -len(f)))


_JSON_WORDS = {"None": "null", "True": "true", "False": "false"}


def json_words(message: str) -> str:
    """Python's None, True and False in a message as JSON's null, true and false (rows are JSON);
    quoted text, such as an echoed string, is left as it is."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\b(None|True|False)\b",
                  lambda m: _JSON_WORDS[m.group(1)] if m.group(1) else m.group(0), message)
