"""Structured outputs through xgrammar: compiled grammars, one matcher per sequence, token bitmasks.

xgrammar (https://github.com/mlc-ai/xgrammar) compiles a JSON schema, regex, EBNF or Lark grammar against
the tokenizer's vocabulary once; a ``GrammarMatcher`` then follows one sequence's tokens and fills
its row of a token bitmask (bit ``t % 32`` of word ``t // 32`` set = token ``t`` may come next; stop
tokens only where the output may end). The worker applies the row to the logits before sampling.
"""

import functools
import json
import logging
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from pagedlm.engine import xgrammar_regex
from pagedlm.sampling_params import StructuredOutputsParams
from pagedlm.step import unpack_token_bitmask

logger = logging.getLogger("pagedlm")

# Bounds of the compiled-grammar caches, ours and xgrammar's: vLLM's VLLM_XGRAMMAR_CACHE_MB default,
# and a count for the constraints that did not compile (they hold their error only). A job whose
# every row has its own schema grew by ~250 KB a schema without them (a soak hunt: 1,500 schemas, +400 MB).
CACHE_BYTES = 512 << 20
CACHE_ENTRIES = 10_000


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:
        raise ValueError(f"structured_outputs needs xgrammar: pip install 'pagedlm[structured]' ({exc})") from None
    return xgrammar


class StructuredOutputManager:
    """Compiles each distinct constraint once (cached by ``StructuredOutputsParams.key``, the least
    recently used dropped past ``CACHE_BYTES`` or ``CACHE_ENTRIES``) and makes matchers and bitmask
    rows from it.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: the model's vocabulary (lm_head rows); rows past the tokenizer's stay masked.
        stop_token_ids: the tokens that end a sequence (EOS and the generation config's).
        disable_any_whitespace: every JSON constraint compact (the engine's setting).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 disable_any_whitespace: bool = False) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        self._compact = disable_any_whitespace
        info = _tokenizer_info(xgr, tokenizer, vocab_size, stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)
        self._stop_token_ids = stop_token_ids
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()  # least recently used first
        self._sizes: dict[tuple[str, str], int] = {}  # bytes of the compiled ones, once measured
        self._unmeasured: set[tuple[str, str]] = set()  # added, not measured yet (compiling, or just done)
        self._cached_bytes = 0
        # Every future still held elsewhere (a request waiting to join): one the cache dropped is
        # not compiled again while a request holds it (generate compiles every prompt's first).
        self._alive: weakref.WeakValueDictionary[tuple[str, str], Future] = weakref.WeakValueDictionary()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedlm-grammar")
        self.bitmask_width = (vocab_size + 31) // 32
        self.compile_seconds = 0.0
        self.tokenizer_problem = _tokenizer_problem(tokenizer)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar of ``params`` (compiled on first use, waiting for it).

        Raises:
            ValueError: the schema, regex or grammar does not compile (xgrammar's message kept).
        """
        return self.compile_async(params).result()

    def compile_async(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar, compiling on a background thread on first use (its
        exception: the ``ValueError`` of ``compile``)."""
        future = self._compiled.get(params.key)
        if future is not None:
            self._compiled.move_to_end(params.key)
            return future
        future = self._alive.get(params.key)
        if future is None:
            future = self._alive[params.key] = self._executor.submit(self._compile, params)
        self._compiled[params.key] = future
        self._unmeasured.add(params.key)
        self._evict()
        return future

    def _evict(self) -> None:
        """Drop the least recently used compiled constraints past the cache's bounds; the newest
        and those still compiling stay (and a dropped one lives on while a request or a matcher
        holds it)."""
        for key in [key for key in self._unmeasured if self._compiled[key].done()]:
            self._unmeasured.discard(key)
            self._sizes[key] = _size(self._compiled[key])
            self._cached_bytes += self._sizes[key]
        victims = []
        count = len(self._compiled)
        newest = next(reversed(self._compiled))
        for key in self._compiled:
            if key == newest or self._cached_bytes <= CACHE_BYTES and count <= CACHE_ENTRIES:
                break
            if key in self._sizes:
                victims.append(key)
                self._cached_bytes -= self._sizes.pop(key)
                count -= 1
        for key in victims:
            del self._compiled[key]

    def _compile(self, params: StructuredOutputsParams) -> Any:
        start = time.perf_counter()
        kind, spec, any_whitespace = params.key
        compact = self._compact or not any_whitespace
        lark = kind == "grammar" and is_lark(spec)
        try:
            if kind == "json":
                schema = json.loads(params.json) if isinstance(params.json, str) else params.json
                grammar = _json_grammar(self._xgr, schema, compact)
                compiled = self._compiler.compile_grammar(_json_grammar_text(grammar))
            elif kind == "regex":
                compiled = self._compiler.compile_regex(xgrammar_regex.check(spec))
            elif kind == "choice":
                compiled = self._compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice))
            elif lark:
                compiled = self._compiler.compile_lark(xgrammar_regex.check_grammar(spec, lark=True))
            elif kind == "grammar":
                compiled = self._compiler.compile_grammar(xgrammar_regex.check_grammar(spec, lark=False))
            else:  # a JSON object, as OpenAI's json_object promises (the builtin grammar allows arrays too)
                compiled = self._compiler.compile_grammar(_json_grammar_text(_json_grammar(self._xgr, {"type": "object"},
                                                                                           compact)))
        except Exception as exc:  # xgrammar raises RuntimeError / its own errors for bad input
            read_as = ""
            if kind == "grammar":
                read_as = (" (read as Lark: no line defines a rule with '::=')" if lark else
                           " (read as EBNF: a line defines a rule with '::=')")
            raise ValueError(f"structured_outputs.{kind} does not compile{read_as}: {_xgrammar_message(exc)}") from None
        self.compile_seconds += time.perf_counter() - start
        first = self.bitmask(self._xgr.GrammarMatcher(compiled))
        # A JSON document is never empty: a schema whose grammar may only stop at once admits none.
        if not (self.allows_other_than(first, self._stop_token_ids) if kind in ("json", "json_object")
                else bool(first.any())):
            # e.g. the grammar "root ::= root" or the schema {"anyOf": []}: every completion would end
            # at once with no text, as if it had run
            raise ValueError(f"structured_outputs.{kind} admits no output at all (no token can begin one)")
        return compiled

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def new_matcher(self, params: StructuredOutputsParams) -> Any:
        return self._xgr.GrammarMatcher(self.compile(params))

    @staticmethod
    def allows_other_than(bitmask: torch.Tensor, token_ids: Sequence[int]) -> bool:
        """Whether the row allows some token outside ``token_ids``."""
        allowed, ids = _allowed_and_ids(bitmask, token_ids)
        allowed[ids] = False
        return bool(allowed.any())

    @staticmethod
    def allows_any_of(bitmask: torch.Tensor, token_ids: Sequence[int]) -> bool:
        """Whether the row allows some token of ``token_ids``."""
        allowed, ids = _allowed_and_ids(bitmask, token_ids)
        return bool(allowed[ids].any())

    @property
    def end_token_id(self) -> int | None:
        """A token that ends every grammar where it can end (an EOS id), None without one."""
        return self._stop_token_ids[0] if self._stop_token_ids else None

    def end_at(self, bitmask: torch.Tensor, token_ids: Sequence[int]) -> None:
        """Make ``token_ids`` (a request's own stop ids, beside the EOS ids) end the grammar, as
        vLLM's xgrammar backend makes them (``override_stop_tokens``, which xgrammar 0.2.8 masks as
        text and 0.2.9 no longer does): allowed where the grammar can end (it allows an EOS id),
        masked where it cannot, so a stop id never cuts a constrained output short. In place."""
        words = bitmask.numpy().view(np.uint32)  # the row's own memory: a few bits read and set
        can_end = any(words[t >> 5] >> (t & 31) & 1 for t in self._stop_token_ids)
        for token_id in token_ids:
            word, bit = token_id >> 5, np.uint32(1 << (token_id & 31))
            words[word] = words[word] | bit if can_end else words[word] & ~bit

    def bitmask(self, matcher: Any) -> torch.Tensor:
        """The matcher's allowed next tokens: an int32 row of ``bitmask_width`` words."""
        row = torch.empty((1, self.bitmask_width), dtype=torch.int32)
        matcher.fill_next_token_bitmask(row, 0)  # writes every word
        return row[0]


def _size(future: Future) -> int:
    """The bytes a cached compiled grammar holds (0 while compiling, or for an error)."""
    return future.result().memory_size_bytes if future.done() and future.exception() is None else 0


def _tokenizer_info(xgr: Any, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's ``TokenizerInfo`` for ``tokenizer``, with its special tokens (the added tokens
    marked special, BOS and the stop tokens) as xgrammar's special tokens, which no grammar matches
    as text. ``TokenizerInfo.from_huggingface`` finds none in a byte-level vocabulary such as
    SmolLM2's, so "<|im_end|>" counted as ten characters: a regex ``.{10}`` or a JSON string could
    take the EOS token (or ``<|endoftext|>``) as text, and a completion end empty with "stop"
    (vLLM 0.32 builds its TokenizerInfo so and has this fault). xgrammar reads a token whose text
    is empty as special."""
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = {i for i, token in added.items() if getattr(token, "special", False)}
    special |= {i for i in (*stop_token_ids, getattr(tokenizer, "bos_token_id", None)) if i is not None}
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or not special - set(info.special_token_ids):
        return info  # from_huggingface reads a fast tokenizer's vocabulary from get_vocab(), as below
    encoded = [""] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and i not in special:
            encoded[i] = token
    return xgr.TokenizerInfo(encoded, info.vocab_type, vocab_size=vocab_size, stop_token_ids=stop_token_ids,
                             add_prefix_space=info.add_prefix_space)


def _tokenizer_problem(tokenizer: Any) -> str | None:
    """Why no constraint can hold over ``tokenizer``'s text, or None: a WordPiece decoder puts a
    space before each word's first token, which xgrammar (matching the tokens' own texts, as vLLM's
    backend does) does not see, so a choice ended "stop" outside its list (found by a hunt)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "WordPiece":
        return ("structured_outputs cannot hold over this tokenizer's text: its WordPiece decoder puts spaces "
                "between words that the tokens xgrammar matches do not hold")
    return None


def _allowed_and_ids(bitmask: torch.Tensor, token_ids: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """A bitmask row as one bool per token, and the distinct ``token_ids`` that row covers."""
    allowed = unpack_token_bitmask(bitmask[None], bitmask.shape[0] * 32)[0]
    return allowed, [t for t in set(token_ids) if t < allowed.shape[0]]


# Where a schema holds schemas under names (property names are not keywords), and keywords whose
# values are JSON values, not schemas: both walks below (_unenforceable, _as_xgrammar_enforces).
_SCHEMAS_BY_NAME = ("properties", "$defs", "definitions")
_VALUE_KEYWORDS = ("enum", "const", "default", "examples", "required")

# JSON Schema keywords xgrammar compiles but does not enforce (vLLM refuses them for xgrammar too).
_UNSUPPORTED = frozenset({
    "multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
    "dependencies", "dependentRequired", "dependentSchemas", "patternProperties", "propertyNames",
    "unevaluatedProperties", "unevaluatedItems", "minProperties", "maxProperties", "$dynamicRef", "$recursiveRef",
})

# Keywords that constrain a value (the others annotate it: title, description, default, examples, ...).
_CONSTRAINING = frozenset({
    "type", "enum", "const", "allOf", "anyOf", "oneOf", "$ref", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "format", "items", "prefixItems", "minItems", "maxItems", "properties",
    "required", "additionalProperties",
})
# Keywords xgrammar applies only where "type" names their type (it ignores {"minimum": 5}).
_TYPED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "pattern", "format")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
# The formats xgrammar 0.2.9 enforces (vLLM 0.32's STRING_SUPPORTED_FORMATS); it takes others as any string.
_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                      "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
# Formats that bind nothing beyond their type (pydantic's bytes, SecretStr and Path, OpenAPI's
# float and double, pydantic v1's timedelta): kept as the annotations JSON Schema makes of formats.
_ANNOTATION_FORMATS = frozenset({"binary", "password", "path", "float", "double", "time-delta"})
# OpenAPI's integer formats: enforced as the bounds they are (_as_xgrammar_enforces).
_INTEGER_FORMATS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# What _satisfies checks of a listed value.
_CHECKABLE = frozenset({"type", "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum",
                        "exclusiveMaximum"})
_TYPE_OF = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}


def _integer_bounds(schema: dict) -> tuple[int, int] | None:
    """The bounds an OpenAPI integer ``format`` (int32, int64) stands for, where the schema's type
    allows integers and no other numbers (``"integer"``, or a list such as OpenAPI's nullable
    ``["integer", "null"]``, where ``minimum`` / ``maximum`` bind the integers alone)."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "integer" not in kinds or "number" in kinds:
        return None
    return _INTEGER_FORMATS.get(schema.get("format"))


def _of_type(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    own = _TYPE_OF.get(type(value))
    return own in kinds or own == "integer" and "number" in kinds or (
        own == "number" and "integer" in kinds and float(value).is_integer())


def _satisfies(value: Any, schema: dict) -> bool:
    """Whether a listed ``value`` meets the keywords of ``_CHECKABLE`` in ``schema`` (each binds its
    own type only, as JSON Schema's do; a ``pattern`` is a search, as JSON Schema's is)."""
    if "type" in schema and not _of_type(value, schema["type"]):
        return False
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            return False
        try:
            return "pattern" not in schema or re.search(schema["pattern"], value) is not None
        except re.error:
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        return ((low is None or value >= low) and (high is None or value <= high)
                and (above is None or value > above) and (below is None or value < below))
    return True


def _wrong_keyword_types(schema: dict) -> set[str]:
    """The keywords of ``_CHECKABLE`` and ``format`` whose values are of no type JSON Schema allows."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    kinds = {**dict.fromkeys(_COUNTS, "a count"),
             **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"), "a number"),
             "pattern": "a string", "format": "a string"}
    ok = {"a count": lambda v: number(v) and float(v).is_integer(), "a number": number,
          "a string": lambda v: isinstance(v, str)}
    return {f"{key} {schema[key]!r} (must be {kind})" for key, kind in kinds.items()
            if key in schema and not ok[kind](schema[key])}


def _ignored_beside(schema: dict, root: Any) -> set[str]:
    """What xgrammar would drop from one schema object: keywords beside ``enum``/``const``,
    ``allOf``/``anyOf``/``oneOf`` or ``$ref`` (it enforces those alone; beside a list of values, or
    a ``$ref`` to one, keywords every listed value meets are kept), a ``pattern`` beside a
    ``format``, typed keywords without a ``type``, a format it does not know, an empty ``type``
    list, negative counts and listed integers a double cannot hold."""
    found: set[str] = set()
    wrong_type = _wrong_keyword_types(schema)
    if wrong_type:
        return wrong_type
    constraining = _CONSTRAINING & set(schema)
    alone = next((k for k in ("enum", "const", "allOf", "anyOf", "oneOf", "$ref") if k in schema), None)
    if alone is not None:
        beside = sorted(constraining - {alone})
        listing = schema if alone in ("enum", "const") else _resolve_local_ref(schema, root) if alone == "$ref" else None
        values = _listed(listing)
        if beside and values is not None and set(beside) <= _CHECKABLE:
            wrong = [v for v in values if not _satisfies(v, schema)]
            if wrong:
                found.add(f"{alone} value(s) {', '.join(map(repr, wrong[:5]))} beside {', '.join(beside)}, which they "
                          f"do not satisfy (xgrammar enforces the {alone} alone: list only the values that satisfy them)")
        elif beside:
            found.add(f"{alone} beside {', '.join(beside)} (xgrammar enforces the {alone} alone: "
                      + ("list only the values that satisfy them)" if alone in ("enum", "const") else
                         "move them into each branch)" if alone in ("allOf", "anyOf", "oneOf") else
                         "move them into the referenced schema)"))
    if "pattern" in schema and "format" in schema:
        found.add("pattern beside format (xgrammar enforces the format alone)")
    if "type" not in schema and not constraining & {"enum", "const", "allOf", "anyOf", "oneOf", "$ref"}:
        typed = [key for key in _TYPED if key in schema]
        if typed:
            found.add(f"{', '.join(typed)} without a type (xgrammar applies them only beside \"type\")")
    if "format" in schema and schema["format"] not in _FORMATS | _ANNOTATION_FORMATS and _integer_bounds(schema) is None:
        found.add(f"format {schema['format']!r} (xgrammar enforces {', '.join(sorted(_FORMATS))}; "
                  f"{', '.join(sorted(_ANNOTATION_FORMATS))} are kept as annotations, int32 and int64 of a type that "
                  "allows integers but no other numbers as their bounds)")
    if schema.get("type") == []:
        found.add("type [] (no value has no type)")
    huge = [v for v in _listed(schema) or () if type(v) is int and abs(v) > 2**53]
    if huge:
        found.add(f"integer {huge[0]} in enum/const (past 2**53: xgrammar writes it rounded to a double)")
    for key in _COUNTS:
        if isinstance(schema.get(key), int) and schema[key] < 0:
            found.add(f"{key} {schema[key]} (a count: 0 or more)")
    return found


def schema_problem(schema: Any) -> str | None:
    """Why the JSON ``schema`` (or its JSON text, as ``StructuredOutputsParams.json`` may be)
    would not be enforced as written, or None: text that is no JSON, what xgrammar would ignore
    (``unenforceable``), else its schema converter's error (without xgrammar installed, the first
    two alone). For a job row's schema, checked before its request is queued, so that the error
    names the row's own field. Cached by the schema's JSON text (rows often repeat one)."""
    return _schema_problem(schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False, default=repr))


@functools.lru_cache(maxsize=256)
def _schema_problem(text: str) -> str | None:
    try:
        schema = json.loads(text)
    except ValueError as exc:
        return f"not JSON text ({exc})"
    try:
        import xgrammar
    except ImportError:  # the engine names the missing extra when a request needs it
        return unenforceable(schema)
    try:
        _json_grammar(xgrammar, schema)
    except ValueError as exc:
        return str(exc)
    return None


def is_lark(grammar: str) -> bool:
    """Whether a grammar is read as Lark rather than EBNF: no line (comments aside) defines a rule
    with ``::=`` (vLLM's ``grammar_is_likely_lark``)."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in grammar.split("\n"))


def _whitespace(compact: bool) -> dict[str, Any]:
    """xgrammar's JSON options: compact JSON has no whitespace at all (its ``any_whitespace=False``
    alone still writes ", " and ": "), else any whitespace between tokens."""
    return {"any_whitespace": False, "separators": (",", ":")} if compact else {"any_whitespace": True}


def _json_grammar(xgr: Any, schema: Any, compact: bool = False) -> Any:
    """xgrammar's grammar of the JSON ``schema``, its properties in the schema's order.

    Raises:
        ValueError: what xgrammar would not enforce (``unenforceable``), or its converter's error.
    """
    problem = unenforceable(schema)
    if problem:
        raise ValueError(problem)
    try:
        return xgr.Grammar.from_json_schema(json.dumps(_as_xgrammar_enforces(schema), ensure_ascii=False),
                                            **_whitespace(compact))
    except Exception as exc:  # xgrammar raises RuntimeError / its own errors for bad input
        raise ValueError(_xgrammar_message(exc)) from None


def unenforceable(schema: Any) -> str | None:
    """Why xgrammar would accept the JSON ``schema`` without enforcing all of it, or None: what
    ``_unenforceable`` finds, as one message."""
    found = sorted(_unenforceable(schema, schema))
    return f"{'; '.join(found)}: cannot be enforced (xgrammar does not support it)" if found else None


def _unenforceable(schema: Any, root: Any) -> set[str]:
    """What in ``schema`` (a part of ``root``) xgrammar would accept without enforcing it: the
    keywords above, a ``$ref`` outside the document, a ``required`` property its ``properties`` do
    not define (strict mode generates no other), a ``oneOf`` whose branches may overlap (xgrammar
    enforces ``anyOf``). Property names are not keywords."""
    found: set[str] = set()
    if isinstance(schema, dict):
        found |= _ignored_beside(schema, root)
        for key, value in schema.items():
            if key in _UNSUPPORTED and not (key == "uniqueItems" and value is False):
                found.add(f"keyword {key}")
            elif key in ("anyOf", "oneOf") and value == []:
                found.add(f"{key} [] (no value meets it, and xgrammar writes no value where it stands: "
                          "'{\"a\":}' for a property)")
            elif key == "allOf" and not (isinstance(value, list) and len(value) == 1):
                found.add("keyword allOf of more than one schema (xgrammar enforces none of them; one schema, as "
                          "pydantic writes a $ref with a default, is kept)")
            elif key == "$ref" and not (isinstance(value, str) and (value == "#" or value.startswith("#/"))):
                found.add(f"$ref {value!r} (only JSON pointers within the schema, '#/...')")
            elif key == "required" and isinstance(value, list):
                defined = schema.get("properties")
                missing = [name for name in value if not (isinstance(defined, dict) and name in defined)]
                if missing:
                    found.add(f"required {missing} not in properties")
            elif key in ("minLength", "maxLength") and ("pattern" in schema or "format" in schema):
                beside = "pattern" if "pattern" in schema else "format"
                found.add(f"{key} beside {beside} (xgrammar enforces the {beside} alone; drop the length, e.g. "
                          "pydantic HttpUrl's maxLength 2083, or write it into a pattern)")
            elif key == "oneOf" and not _exclusive_branches(value, root):
                found.add("oneOf whose branches may overlap (use anyOf, or give every branch its own type, its own "
                          "const or enum values, or its own const or enum values of a required property)")
            if key in _SCHEMAS_BY_NAME:
                for sub in (value.values() if isinstance(value, dict) else ()):
                    found |= _unenforceable(sub, root)
            elif key not in _VALUE_KEYWORDS:
                found |= _unenforceable(value, root)
    elif isinstance(schema, list):
        for item in schema:
            found |= _unenforceable(item, root)
    return found


def _as_xgrammar_enforces(schema: Any) -> Any:
    """``schema`` with its ``pattern``s as xgrammar enforces them (``xgrammar_regex.check``: a
    pattern xgrammar would not enforce as written is refused, and the characters JSON escapes are
    matched as their escapes). A string's ``minLength`` / ``maxLength`` (whole numbers, min <= max)
    in a schema that allows other types too (``"type": ["string", "null"]``, or no type: the
    lengths bind strings only) becomes an ``anyOf`` of the bounded string and the other types,
    which xgrammar would otherwise generate strings of any length for (``_json_grammar_text``
    then corrects the bounded string's characters). An array's missing ``items`` beside its
    other keywords is written as ``{}``, JSON Schema's default (xgrammar's is false there)."""
    if isinstance(schema, list):
        return [_as_xgrammar_enforces(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _VALUE_KEYWORDS:
            out[key] = value
        elif key in _SCHEMAS_BY_NAME and isinstance(value, dict):
            out[key] = {name: _as_xgrammar_enforces(sub) for name, sub in value.items()}
        elif key == "pattern" and isinstance(value, str) and not {"enum", "const", "$ref"} & set(schema):
            # (beside a list of values, or a reference to one, every value meets it: _ignored_beside)
            try:
                out[key] = xgrammar_regex.check(value, json_string=True)
            except xgrammar_regex.RegexError as exc:
                raise ValueError(f"pattern {value!r}: {exc}") from None
        else:
            out[key] = _as_xgrammar_enforces(value)
    kind = schema.get("type")
    arrays = kind == "array" or isinstance(kind, list) and "array" in kind
    if arrays and "items" not in schema and {"minItems", "maxItems", "uniqueItems", "prefixItems"} & set(schema):
        out["items"] = {}  # JSON Schema's default; xgrammar reads a missing one there as false ("[]" only)
    bounds = _integer_bounds(schema)
    if bounds is not None:
        del out["format"]
        out["minimum"] = max(schema.get("minimum", bounds[0]), bounds[0])
        out["maximum"] = min(schema.get("maximum", bounds[1]), bounds[1])
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    whole = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (low, high) if n is not None)
    bounded = ("minLength" in schema or high is not None) and whole and (high is None or low <= high)
    types = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else list(_JSON_TYPES)
    if not bounded or "string" not in types or {"pattern", "format", "enum", "const", "$ref"} & set(schema):
        return out
    string = {"type": "string", "minLength": low, **({} if high is None else {"maxLength": high})}
    rest = {k: v for k, v in out.items() if k not in ("type", "minLength", "maxLength")}
    others = [t for t in types if t != "string"]
    if not others:
        return out
    if any(k in rest for k in ("anyOf", "oneOf")):  # the other types' keywords cannot be split off
        return out
    return {"anyOf": [string, {**rest, "type": others}]}


# The character class of xgrammar 0.2.9's length-bounded strings, as its grammar prints it (a rule
# of its own, or inline for lengths up to 1), and what a JSON string may hold raw instead: no
# control characters (it let U+0000-U+001F but CR and LF through: no JSON) and no surrogates (no
# UTF-8). Its unbounded strings' class, [^\0-\x1f\"\\\r\n], is another text.
_BOUNDED_STRING_CHARACTER = r'[^\"\\\r\n]'
_JSON_STRING_CHARACTER = r'[^\0-\u001f\"\\\ud800-\udfff]'
# An escaped backslash, or a \xHH escape (group 2) in xgrammar's printed grammar.
_HEX_ESCAPE = re.compile(r"\\(\\|x([0-9A-Fa-f]{2}))")


def _json_grammar_text(grammar: Any) -> str:
    """``grammar`` (xgrammar's, of a JSON schema) as EBNF text that xgrammar reads back as it is,
    its length-bounded strings' characters as JSON allows them. A pattern of the same lengths
    would hold too, but xgrammar's masks for a bounded repetition in a pattern take ~15 ms a fill at
    400 characters, against ~10 us for its own bounded strings (docs/performance.md).

    xgrammar compiles a grammar from its text, where it prints U+0080-U+00FF and control
    characters as ``\\xHH`` and then reads ``\\x`` on into a next hex digit ("année" as
    "ann\\u0e9e": found by a hunt): they are written ``\\u00HH``, which it reads as four digits."""
    text = _HEX_ESCAPE.sub(lambda m: m.group(0) if m.group(2) is None else "\\u00" + m.group(2), str(grammar))
    # Its other negated classes (unbounded strings', property names') without surrogates, too.
    return xgrammar_regex.check_grammar(text.replace(_BOUNDED_STRING_CHARACTER, _JSON_STRING_CHARACTER), lark=False)


# JSON Schema's types but "integer" (a number); a schema without "type" allows them all.
_JSON_TYPES = ("string", "number", "boolean", "null", "array", "object")


def _exclusive_branches(branches: Any, root: Any) -> bool:
    """Whether no JSON value can match two of the ``oneOf`` branches, so that ``anyOf`` means the
    same: each branch a distinct single ``type`` (integer and number overlap); or each branch's
    ``const`` / ``enum`` values apart from the others'; or, for one property every branch
    requires, each branch's ``const`` / ``enum`` values of it apart from the others' (a
    discriminated union, pydantic's included). Values compare as JSON does (1 equals 1.0)."""
    if not isinstance(branches, list):
        return False
    resolved = [_resolve_local_ref(branch, root) for branch in branches]
    if not all(isinstance(branch, dict) for branch in resolved):
        return False
    types = [branch.get("type") for branch in resolved]
    if all(isinstance(t, str) for t in types) and len(set(types)) == len(types) and not {"integer", "number"} <= set(types):
        return True
    if _apart([_listed_values(branch) for branch in resolved]):
        return True
    shared = set.intersection(*(set(branch.get("required", ())) for branch in resolved)) if resolved else set()
    return any(_apart([_listed_values(_resolve_local_ref((branch.get("properties") or {}).get(name), root))
                       for branch in resolved]) for name in shared)


def _listed(schema: Any) -> list | None:
    """The values a schema lists (``const``, or ``enum``); None if it lists none."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if isinstance(schema.get("enum"), list) else None


def _listed_values(schema: Any) -> set[str] | None:
    """``_listed`` as canonical JSON."""
    values = _listed(schema)
    return None if values is None else {_canonical(value) for value in values}


def _apart(value_sets: list[set[str] | None]) -> bool:
    """Whether every set is known and no value is in two of them."""
    if not value_sets or any(values is None for values in value_sets):
        return False
    return sum(len(values) for values in value_sets) == len(set().union(*value_sets))


def _canonical(value: Any) -> str:
    """A JSON value's text, equal for equal values: numbers as floats (JSON's 1 is 1.0), keys sorted."""
    def numbers_as_floats(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dict):
            return {k: numbers_as_floats(item) for k, item in v.items()}
        if isinstance(v, list):
            return [numbers_as_floats(item) for item in v]
        return v

    return json.dumps(numbers_as_floats(value), sort_keys=True)


def _resolve_local_ref(schema: Any, root: Any) -> Any:
    """``schema``, or the part of ``root`` its ``$ref`` (a JSON pointer, ``#/$defs/Name``) names;
    None where the pointer leads nowhere."""
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#") and seen < 32:
        node = root
        for part in schema["$ref"][1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        schema, seen = node, seen + 1
    return schema


def _xgrammar_message(exc: Exception) -> str:
    """xgrammar's error without the log prefix of its C++ check (``[09:08:23] /project/cpp/x.cc:5082: ``)."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip())
