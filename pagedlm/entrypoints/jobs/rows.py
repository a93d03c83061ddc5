"""What the job formats share: a parsed row, a row's error, and JSON fields to ``SamplingParams``."""

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Protocol

from pagedlm.entrypoints.llm import LLM, PromptType
from pagedlm.outputs import RequestOutput
from pagedlm.sampling_params import SamplingParams

# SamplingParams fields a row may set: every one but the callables and output_kind (which JSON
# cannot give, and the job sets).
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in ("logits_processors", "output_kind"))

RowKey = str | int | None  # a row's id; None for a row whose id could not be read


class RowError(ValueError):
    """Why one row cannot run; it becomes that row's error in the output.

    ``param`` names the offending field where there is one (OpenAI's error ``param``).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class JobRow:
    """One input row ready to run: its id, prompt and parameters, the row as read, and what else
    its output row needs."""

    key: RowKey
    prompt: PromptType
    params: SamplingParams
    row: dict
    context: Any = None


class JobFormat(Protocol):
    """A row format (OpenAI batch or plain): input rows in, output rows out."""

    key_field: str  # the field that holds a row's id, in input and output rows alike

    def parse(self, row: Any, key: RowKey) -> JobRow:
        """The row as a request; raises ``RowError`` when it cannot run. ``key`` is ``key_of(row)``."""

    def key_of(self, row: Any) -> RowKey:
        """An input or output row's id, or None when it has none that can be read (never raises);
        resume skips the input rows whose ids the output holds."""

    def result_row(self, job_row: JobRow, output: RequestOutput) -> dict:
        """The output row of a finished request."""

    def error_row(self, key: RowKey, row: Any, error: str, param: str | None = None) -> dict:
        """The output row of a row that could not run; ``row`` is the input row, if it could be read."""


def sampling_defaults(llm: LLM, overrides: dict[str, Any]) -> dict[str, Any]:
    """A job's sampling defaults: the fields the model's generation config sets (what ``LLM`` uses
    when given no ``SamplingParams``), under ``overrides``."""
    model_defaults, plain = llm.get_default_sampling_params(), SamplingParams()
    fields = {f: getattr(model_defaults, f) for f in SAMPLING_FIELDS if getattr(model_defaults, f) != getattr(plain, f)}
    return {**fields, **overrides}


def sampling_params_from(fields: dict[str, Any], defaults: dict[str, Any], where: str,
                         names: dict[str, str] | None = None) -> SamplingParams:
    """``SamplingParams`` from a row's fields over the job's defaults. ``names`` maps a field to
    the name the row gave it (OpenAI's ``max_completion_tokens`` for ``max_tokens``), which errors use.

    Raises:
        RowError: an unknown field (the message lists the allowed ones) or a bad value (it names
            the field), ``where`` saying where the fields came from.
    """
    unknown = sorted(set(fields) - set(SAMPLING_FIELDS))
    if unknown:
        raise RowError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(SAMPLING_FIELDS)}",
                       unknown[0])
    try:
        return SamplingParams(**{**defaults, **fields})
    except ValueError as exc:
        message = str(exc)
        # The field the message starts with (SamplingParams names it first): the longest that fits,
        # so that "stop_token_ids ..." is not taken for "stop".
        field = max((f for f in fields if re.match(rf"{f}\b", message)), key=len, default=None)
        if field is not None and names and field in names:
            message = names[field] + message[len(field):]
            field = names[field]
        raise RowError(f"{where}: {message}", field) from None
