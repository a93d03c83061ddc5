"""Plain rows (JSONL or Parquet): an ``id``, one prompt column, optional ``sampling_params``.

Input: ``id`` (str or int, unique), exactly one non-null of ``prompt`` (text), ``messages`` (a
conversation, rendered with the model's chat template, under the row's ``CHAT_OPTIONS`` columns) or
``prompt_token_ids``, and optionally ``sampling_params`` (an object of ``SamplingParams`` fields;
null fields are unset). Output: the
input row with ``outputs`` (one entry per completion: ``index``, ``text``, ``token_ids``,
``finish_reason``, ``stop_reason`` as text, ``cumulative_logprob``, ``logprobs``),
``prompt_tokens``, ``completion_tokens``, ``error`` (null, or why the row could not run) and, for a
row that asked for them, ``prompt_logprobs`` (one entry per prompt token, null for the first, as
vLLM's ``RequestOutput.prompt_logprobs``) and ``prompt_token_id_logprobs`` (one list per row of
``sampling_params.prompt_logprob_token_ids``: its ids' log-probabilities, -inf where padded, which
JSON output writes as null; as ``RequestOutput.prompt_token_id_logprobs``).
"""

import logging
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedlm.entrypoints.chat_utils import CHAT_OPTIONS, render_chat
from pagedlm.entrypoints.jobs.rows import (
    INTEGER_SAMPLING_FIELDS, NUMBER_SAMPLING_FIELDS, SAMPLING_FIELDS, JobRow, RowError, RowKey, chat_error, check_request_chat_template,
    json_text, row_names, sampling_params_from, schema_without_nulls, without_nulls,
)
from pagedlm.outputs import CompletionOutput, RequestOutput
from pagedlm.utils import FieldError

logger = logging.getLogger("pagedlm")

PROMPT_COLUMNS = ("prompt", "messages", "prompt_token_ids")
RESULT_COLUMNS = ("outputs", "prompt_tokens", "completion_tokens", "error", "prompt_logprobs",
                  "prompt_token_id_logprobs")
# Top-level columns that would constrain what a completion is (OpenAI's chat request fields, vLLM's
# structured-output fields): a plain row's tools only reach the chat template (as LLM.chat's do) and
# its constraint is sampling_params.structured_outputs, so carrying them would run the row
# unconstrained (a hunt). Each with where it belongs; the values that constrain nothing are carried.
_OPENAI_BATCH = "write the row in the OpenAI batch format (body.{})"
_STRUCTURED = "set sampling_params.structured_outputs"
CONSTRAINT_COLUMNS = {"tool_choice": _OPENAI_BATCH.format("tool_choice"),
                      "parallel_tool_calls": _OPENAI_BATCH.format("parallel_tool_calls"),
                      "response_format": _OPENAI_BATCH.format("response_format") + ", or " + _STRUCTURED,
                      "structured_outputs": _STRUCTURED, "guided_json": _STRUCTURED, "guided_regex": _STRUCTURED,
                      "guided_choice": _STRUCTURED, "guided_grammar": _STRUCTURED}
_UNCONSTRAINED = {"tool_choice": ["auto", "none"], "parallel_tool_calls": [True], "response_format": [{"type": "text"}]}


class PlainFormat:
    """Reads and writes plain rows; ``defaults`` are the job's sampling defaults under each row's.
    ``arrow_rows``: rows are read from Arrow (Parquet, Ray Data), where a null is unset even as a
    schema's ``const`` or ``default`` (``schema_without_nulls``). ``trust_request_chat_template``: a
    row's own ``chat_template`` is taken (vLLM's server flag); else such a row is its error
    (``check_request_chat_template``)."""

    key_field = "id"
    integer_keys = True
    fields_column = "sampling_params"
    integer_fields = INTEGER_SAMPLING_FIELDS
    number_fields = NUMBER_SAMPLING_FIELDS
    column_kinds = {"prompt": "text", "messages": "list", "prompt_token_ids": "integer list", "chat_template": "text",
                    "chat_template_kwargs": "object", "add_generation_prompt": "bool", "continue_final_message": "bool",
                    "tools": "list", "chat_template_content_format": "text"}

    def __init__(self, tokenizer: PreTrainedTokenizerBase, defaults: dict[str, Any], arrow_rows: bool = False,
                 trust_request_chat_template: bool = False) -> None:
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.trust_request_chat_template = trust_request_chat_template
        self.value_nulls = not arrow_rows
        self._warned_columns: set[str] = set()

    @staticmethod
    def key_of(row: Any) -> RowKey:
        key = row.get("id") if isinstance(row, dict) else None
        return key if isinstance(key, (str, int)) and not isinstance(key, bool) else None

    @staticmethod
    def error_of(row: dict) -> str | None:
        error = row.get("error")
        return error if isinstance(error, str) else None

    def parse(self, row: Any, key: RowKey) -> JobRow:
        if not isinstance(row, dict):
            raise RowError(f"a row must be an object with an id and a prompt, got {json_text(row, 60)}")
        if key is None:
            raise RowError(f"id must be a string or an integer, got {json_text(row.get('id'), 40)}", "id")
        reserved = [c for c in RESULT_COLUMNS if c in row]
        if reserved:
            raise RowError(f"column(s) {', '.join(reserved)} are the output's; rename them in the input", reserved[0])
        constraints = without_nulls({c: row.get(c) for c in CONSTRAINT_COLUMNS})
        constraint = next((c for c, v in constraints.items() if v not in _UNCONSTRAINED.get(c, [])), None)
        if constraint:
            raise RowError(f"column {constraint} would constrain the completion, which a plain row's columns do not "
                           f"(its tools only reach the chat template, as LLM.chat's): {CONSTRAINT_COLUMNS[constraint]}, "
                           "or rename the column to carry it", constraint)
        given = [c for c in PROMPT_COLUMNS if row.get(c) is not None]
        if len(given) != 1:
            raise RowError(f"a row needs exactly one of {', '.join(PROMPT_COLUMNS)}; it has "
                           f"{', '.join(given) or 'none'}", given[1] if given else "prompt")
        column = given[0]
        value = row[column]
        options = without_nulls({c: row.get(c) for c in CHAT_OPTIONS})
        if "tools" in options:  # null is unset inside tool definitions too (another Parquet row's keys)
            options["tools"] = schema_without_nulls(options["tools"], self.value_nulls, "tools", "tools")
        if options and column != "messages":
            raise RowError(f"column(s) {', '.join(options)} apply to rows with messages (they render the "
                           f"conversation); this row has {column}", next(iter(options)))
        if column == "prompt":
            if not isinstance(value, str):
                raise RowError(f"prompt must be a string, got {json_text(value, 60)}", "prompt")
            prompt = value
        elif column == "messages":
            check_request_chat_template(options, self.trust_request_chat_template)
            try:
                prompt = render_chat(self.tokenizer, value, **options, template_files=False)
            except FieldError as exc:
                raise chat_error(exc) from None
        else:
            prompt = {"prompt_token_ids": value}
        self._warn_of_sampling_columns(row)
        fields = row.get("sampling_params")
        if fields is None:
            fields = {}
        if not isinstance(fields, dict):
            raise RowError(f"sampling_params must be an object, got {json_text(fields, 60)}", "sampling_params")
        fields = without_nulls(fields)
        names = row_names(fields, column)
        params = sampling_params_from(fields, self.defaults, "sampling_params", names, self.value_nulls)
        return JobRow(key, prompt, params, row, names)

    def _warn_of_sampling_columns(self, row: dict) -> None:
        """Top-level columns named like ``SamplingParams`` fields are carried, not used: say so
        once per column, since they are most likely meant for ``sampling_params``."""
        new = [c for c in row if c in SAMPLING_FIELDS and c not in self._warned_columns]
        if new:
            self._warned_columns.update(new)
            logger.warning("Row column(s) %s are named like sampling parameters but are carried to the output "
                           "unchanged: a plain row sets them in its sampling_params object (or use the job's "
                           "flags, e.g. --max-tokens).", ", ".join(new))

    def result_row(self, job_row: JobRow, output: RequestOutput) -> dict:
        row = {
            **job_row.row,
            "outputs": [_completion(c) for c in output.outputs],
            "prompt_tokens": len(output.prompt_token_ids),
            "completion_tokens": sum(len(c.token_ids) for c in output.outputs),
            "error": None,
        }
        if output.prompt_logprobs is not None:
            row["prompt_logprobs"] = [None if p is None else _logprob_entries(p) for p in output.prompt_logprobs]
        if output.prompt_token_id_logprobs is not None:
            row["prompt_token_id_logprobs"] = output.prompt_token_id_logprobs.tolist()
        return row

    def error_row(self, key: RowKey, row: Any, error: str, param: str | None = None) -> dict:
        carried = {k: v for k, v in row.items() if k not in RESULT_COLUMNS} if isinstance(row, dict) else {}
        # An id that is not a str or int is replaced by null (the error quotes it): the id column
        # then holds only ids that resume can match.
        return {**carried, "id": key, "outputs": None, "prompt_tokens": None, "completion_tokens": None,
                "error": error}


def output_schema(carried=None):
    """The Arrow schema of output rows: the input's columns (``carried``, a schema or None), less
    any named like a result column (those rows fail), then the result columns."""
    import pyarrow as pa

    entries = pa.list_(pa.struct([("token_id", pa.int64()), ("logprob", pa.float64()), ("rank", pa.int64())]))
    completion = pa.struct([
        ("index", pa.int64()), ("text", pa.string()), ("token_ids", pa.list_(pa.int64())),
        ("finish_reason", pa.string()), ("stop_reason", pa.string()), ("cumulative_logprob", pa.float64()),
        ("logprobs", pa.list_(entries)),
    ])
    results = [pa.field("outputs", pa.list_(completion)), pa.field("prompt_tokens", pa.int64()),
               pa.field("completion_tokens", pa.int64()), pa.field("error", pa.string()),
               pa.field("prompt_logprobs", pa.list_(entries)),
               pa.field("prompt_token_id_logprobs", pa.list_(pa.list_(pa.float64())))]
    return pa.schema([f for f in carried or [] if f.name not in RESULT_COLUMNS] + results)


def _completion(c: CompletionOutput) -> dict:
    return {
        "index": c.index,
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "stop_reason": None if c.stop_reason is None else str(c.stop_reason),
        "cumulative_logprob": c.cumulative_logprob,
        "logprobs": None if c.logprobs is None else [_logprob_entries(position) for position in c.logprobs],
    }


def _logprob_entries(position: dict) -> list[dict]:
    """One position's ``{token_id: Logprob}`` as ``[{token_id, logprob, rank}, ...]``."""
    return [{"token_id": t, "logprob": lp.logprob, "rank": lp.rank} for t, lp in position.items()]
