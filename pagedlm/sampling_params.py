"""Sampling parameters for text generation (vLLM's ``SamplingParams``)."""

import copy
import dataclasses
import inspect
import json as _json
import logging
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
import torch

from pagedlm.utils import FieldError, nested_too_deeply, too_deep, unicode_problem


def _check_unicode(field: str, texts: Sequence[str], rule: str) -> None:
    """Raises FieldError (``field``) for a text that is not valid Unicode (a lone surrogate, as a
    JSON input's escape gives), its message ``rule``, the text and why."""
    for text in texts:
        problem = unicode_problem(text)
        if problem is not None:
            raise FieldError(f"{rule}, got {text!r} ({problem}).", field)


_GREEDY_EPS = 1e-5
# The largest |logit_bias|: the biased logits, divided by the smallest temperature, stay finite in
# float32 (3.4e38). Any bias beyond a few hundred decides the token already.
LOGIT_BIAS_LIMIT = 1e30
_MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: a smaller one is raised to it (logits / t would overflow)

logger = logging.getLogger("pagedlm")

# (output_token_ids, logits) -> logits, or (prompt_token_ids, output_token_ids, logits) -> logits.
LogitsProcessor = Callable[..., torch.Tensor]


MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's bound on SamplingParams.logprob_token_ids
# StructuredOutputsParams' constraints, of which a request gives one (its other fields are options).
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _field_of(name: str) -> str:
    """The field a checked value's name is in: "structured_outputs" of "structured_outputs.json[0]"."""
    return re.match(r"\w*", name).group(0)


def _number(name: str, value: Any, *, integer: bool = False) -> int | float:
    """``value`` as a plain int or float, if it behaves as one (numpy scalars included) and fits
    what the engine stores it in (int64, float32); else a ValueError naming the field."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        kind = "an int" if integer else "a number"
        raise FieldError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).", _field_of(name))
    if integer:
        value = int(value)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise FieldError(f"{name} must fit in int64 [{_INT64_MIN}, {_INT64_MAX}], got {value}.", _field_of(name))
        return value
    value = float(value)
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise FieldError(f"{name} must be finite and within float32's range (±{_FLOAT32_MAX:.4g}), got {value!r}.",
                         _field_of(name))
    return value


def _token_ids(name: str, value: Any) -> list[int]:
    """``value`` as a list of token ids (non-negative ints), else a ValueError naming the field."""
    if not isinstance(value, (list, tuple)):
        raise FieldError(f"{name} must be a list of non-negative ints, got {value!r}.", _field_of(name))
    ids = [_number(name, t, integer=True) for t in value]
    if any(t < 0 for t in ids):
        raise FieldError(f"{name} must be a list of non-negative ints, got {ids!r}.", _field_of(name))
    return ids


def _read_only(*args: Any, **kwargs: Any) -> None:
    raise TypeError("this SamplingParams field was checked and is shared by the requests made from the params (their "
                    "copies skip the check): assign a new value instead of changing it in place")


class CheckedDict(dict):
    """``logit_bias`` once checked: read-only, so that every copy of the params (``clone``, one per
    request) shares it without checking it again (a vocabulary-wide bias took ~70 ms a request)."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> tuple:
        return CheckedDict, (dict(self),)


class CheckedList(list):
    """``allowed_token_ids`` once checked, read-only and shared as ``CheckedDict`` is."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = append = extend = insert = pop = remove = clear = sort = \
        reverse = _read_only

    def __reduce__(self) -> tuple:
        return CheckedList, (list(self),)


class CheckedRows(tuple):
    """``prompt_logprob_token_ids`` once checked: a tuple of equal-length tuples of ids (-1 pads),
    shared by the params' copies without checking it again (a long prompt's rows took ~0.5 s)."""

    __slots__ = ()

    def __reduce__(self) -> tuple:
        return CheckedRows, (tuple(self),)


def _checked_rows(rows: Any) -> CheckedRows:
    """``prompt_logprob_token_ids`` given as an integer array or lists of ids, checked."""
    field_name = "prompt_logprob_token_ids"
    if isinstance(rows, np.ndarray):
        if rows.ndim != 2 or rows.dtype.kind not in "iu" or 0 in rows.shape:
            raise FieldError(f"{field_name} must be a non-empty integer array of shape [num_rows, num_ids], got a "
                             f"{rows.dtype} array of shape {list(rows.shape)}.", field_name)
        if rows.min() < -1 or rows.max() > _INT64_MAX:
            raise FieldError(f"{field_name} must be token ids (-1 pads a row), got {rows.min()} to {rows.max()}.",
                             field_name)
        return CheckedRows(map(tuple, rows.tolist()))
    if not isinstance(rows, (list, tuple)):
        raise FieldError(f"{field_name} must be an integer array [num_rows, num_ids] or a list of lists of token ids, "
                         f"got {type(rows).__name__}.", field_name)
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, (list, tuple))), None)
    if bad is not None:
        raise FieldError(f"{field_name} must be an integer array [num_rows, num_ids] or a list of lists of token ids, "
                         f"got a {type(rows).__name__} whose row {bad} is {type(rows[bad]).__name__}.", field_name)
    width = max(map(len, rows), default=0)
    if width == 0:
        raise FieldError(f"{field_name} must hold at least one row with at least one token id.", field_name)
    checked = []
    for row in rows:
        ids = [_number(field_name, t, integer=True) for t in row]
        if any(t < -1 for t in ids):
            raise FieldError(f"{field_name} must be token ids (-1 pads a row), got {min(ids)}.", field_name)
        checked.append((*ids, *(-1,) * (width - len(ids))))
    return CheckedRows(checked)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise FieldError(f"{name} must be a bool, got {value!r}.", _field_of(name))
    return bool(value)


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = _number(name, value)
    # An open bound is checked in float32, which the sampler computes in: 1e-46 is 0 there.
    if not (np.float32(value) > lo if lo_open else lo <= value) or value > hi:
        underflow = " (0 in float32, which the sampler computes in)" if lo_open and lo < value <= hi else ""
        raise FieldError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}{underflow}.",
                         _field_of(name))
    return value


def check_truncate_prompt_tokens(value: Any) -> int | None:
    """A ``truncate_prompt_tokens`` (``SamplingParams``' or ``tokenization_kwargs``'), as an int.

    Raises:
        ValueError: it is not None, -1 (the model's limit) or an int >= 1.
    """
    if value is None:
        return None
    value = _number("truncate_prompt_tokens", value, integer=True)
    if value < 1 and value != -1:
        raise FieldError(f"truncate_prompt_tokens must be None, -1 (the model's limit) or >= 1, got {value}.",
                         "truncate_prompt_tokens")
    return value


class _FieldsOnly:
    """Mixin for a dataclass: setting an attribute that is not one of its fields (a misspelt field,
    or vLLM's older ``guided_decoding``) raises, as vLLM's ``msgspec`` structs do, instead of being
    kept where nothing reads it. Private names (``_x``) are the class's own."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and name not in self.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; its fields are "
                                 f"{', '.join(f for f in self.__dataclass_fields__ if not f.startswith('_'))}.")
        object.__setattr__(self, name, value)


def _check_json_value(value: Any, where: str) -> None:
    """Raises ValueError naming the place in ``value`` that JSON cannot hold: a key that is not a
    str, a non-finite float, or an object of another type (a set, a class)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise FieldError(f"{where} must be JSON: key {key!r} is not a str.", _field_of(where))
            _check_json_value(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise FieldError(f"{where} must be JSON: {value} is not a finite number.", _field_of(where))
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise FieldError(f"{where} must be JSON (dicts, lists, str, int, float, bool, None): got a "
                         f"{type(value).__name__}.", _field_of(where))


def _check_depth(value: Any, where: str) -> None:
    """Raises FieldError where ``value`` (or, as text, the JSON it holds) is ``nested_too_deeply``
    (text that is no JSON is left to the checks that read it)."""
    try:
        deep = nested_too_deeply(_json.loads(value) if isinstance(value, str) else value)
    except ValueError:
        return
    except RecursionError:  # json.loads' own limit
        deep = True
    if deep:
        raise FieldError(f"{too_deep(where)}.", _field_of(where))


class RequestOutputKind(Enum):
    """What ``LLMEngine.step`` returns for a request that took part in the step (vLLM's names).

    ``CUMULATIVE``: everything generated so far, every step. ``DELTA``: only what is new since the
    request's previous output (token ids, text, logprobs and prompt logprobs; the cumulative
    logprob, where reported, stays the running total). ``FINAL_ONLY``: nothing until the request finishes, then
    everything. Until a completion finishes, the last ``max(len(stop)) - 1`` characters of its text
    are held back under the first two (they may be the start of a stop string that is then cut).
    ``LLM``'s methods run every request as ``FINAL_ONLY``, as vLLM's ``LLM`` does.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class StructuredOutputsParams(_FieldsOnly):
    """A constraint every completion must satisfy (vLLM's ``StructuredOutputsParams``): exactly one of

    Args:
        json: a JSON schema (a dict, or its JSON text); the output is a JSON value it validates.
        regex: a regular expression the whole output matches.
        choice: a list of strings; the output is one of them.
        grammar: an EBNF grammar (xgrammar's / GBNF dialect, rule ``root``), or a Lark grammar
            (rule ``start``), which it is read as where no line defines a rule with ``::=``
            (vLLM's rule).
        json_object: True: any JSON object (OpenAI's ``response_format={"type": "json_object"}``).
        disable_any_whitespace: with ``json`` or ``json_object``, compact JSON: no whitespace at
            all between its tokens (vLLM's meaning; vLLM 0.32 ignores the per-request field and
            reads ``LLM(structured_outputs_config={"disable_any_whitespace": True})``, which
            pagedlm takes too, for every request).
        disable_additional_properties: objects take only the properties their schema lists. This is
            xgrammar's strict mode, which pagedlm (like vLLM's xgrammar backend) always uses, so
            False does not allow more; True is refused beside a constraint other than json or
            json_object, which have no properties.
        disable_fallback: older vLLM's "do not fall back to another backend"; there is none here.
        whitespace_pattern, structural_tag: vLLM 0.32's, taken at their default None only (its
            xgrammar backend does not read the first either; ``disable_any_whitespace`` gives
            compact JSON; structural tags are not supported).

    Enforced by masking, at every step, the tokens that cannot continue a valid output (xgrammar);
    end-of-sequence is allowed only where the output may end.

    Raises:
        ValueError: none or several constraints (set: not None), one of the wrong type (the
            message names it), or disable_any_whitespace / disable_additional_properties beside a
            constraint other than json or json_object.
            A schema, regex or grammar that does not compile is refused by ``LLM.generate``, naming
            the prompt.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        if self.whitespace_pattern is not None:
            raise FieldError("structured_outputs.whitespace_pattern must be None: pagedlm's xgrammar constraint "
                             "(like vLLM 0.32's) does not read it; disable_any_whitespace=True gives compact JSON.",
                             "structured_outputs")
        if self.structural_tag is not None:
            raise FieldError("structured_outputs.structural_tag must be None: structural tags are not supported; "
                             "use json, regex, choice, grammar or json_object.", "structured_outputs")
        # Set is not None, as vLLM counts them: a False or 0 beside another kind was compiled as itself.
        given = [name for name in STRUCTURED_OUTPUT_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise FieldError("structured_outputs needs exactly one of json, regex, choice, grammar or json_object; "
                             f"got {', '.join(given) or 'none'}.", "structured_outputs")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json" and not (isinstance(value, dict) or (isinstance(value, str) and value.strip())):
            raise FieldError(f"structured_outputs.json must be a JSON schema (a dict or its non-empty JSON text), "
                             f"got {value!r:.80}.", "structured_outputs")
        if kind == "json":
            _check_depth(value, "structured_outputs.json")
        if kind == "json" and isinstance(value, dict):
            _check_json_value(value, "structured_outputs.json")
        # An empty regex (or choice) matches the empty completion alone, which vLLM takes on purpose.
        if kind == "regex" and not isinstance(value, str):
            raise FieldError(f"structured_outputs.regex must be a str, got {value!r}.", "structured_outputs")
        if kind == "grammar" and not (isinstance(value, str) and value.strip()):
            raise FieldError(f"structured_outputs.grammar must be a non-empty str, got {value!r}.", "structured_outputs")
        if kind == "choice" and not (isinstance(value, (list, tuple)) and value and all(isinstance(c, str) for c in value)):
            raise FieldError(f"structured_outputs.choice must be a non-empty list of strings, got {value!r}.",
                             "structured_outputs")
        if kind == "json_object" and value is not True:
            raise FieldError(f"structured_outputs.json_object must be True, got {value!r}.", "structured_outputs")
        if kind == "choice":
            self.choice = list(value)
        for name in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
            setattr(self, name, _check_bool(f"structured_outputs.{name}", getattr(self, name)))
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if getattr(self, name) and kind not in ("json", "json_object"):
                raise FieldError(f"structured_outputs.{name} applies to json and json_object only, not {kind}.",
                                 "structured_outputs")

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, spec, any whitespace): equal for equal constraints (a dict schema as its JSON text, in
        its own key order, which is the order its properties are generated in)."""
        any_whitespace = not self.disable_any_whitespace
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, kind)
            if value is not None:
                if kind == "json" and isinstance(value, dict):
                    value = _json.dumps(value, ensure_ascii=False)  # in order: the order properties come out
                elif kind == "choice":
                    value = _json.dumps(value)
                return kind, value, any_whitespace
        return "json_object", "", any_whitespace


def _dataclass_field(name: str, value: Any, cls: type) -> Any:
    """A field holding a ``cls`` dataclass (or None): a dict of its fields is built into one (as
    JSON carries it); another value is a ValueError naming the field and its fields."""
    if isinstance(value, dict):
        fields = tuple(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise FieldError(f"{name}: unknown field(s) {', '.join(map(str, unknown))}; allowed: {', '.join(fields)}.",
                             _field_of(name))
        return cls(**value)
    if value is not None and not isinstance(value, cls):
        raise FieldError(f"{name} must be a {cls.__name__} (or a dict of its fields), got {type(value).__name__}.",
                         _field_of(name))
    return value


@dataclass
class RepetitionDetectionParams(_FieldsOnly):
    """vLLM's repetition detection: a completion whose output tokens end in one pattern of
    ``min_pattern_size`` to ``max_pattern_size`` tokens repeated ``min_count`` times in a row
    ends there with ``finish_reason`` ``"repetition"`` and ``stop_reason`` ``"repetition_detected"``
    (checked after ``max_tokens`` and only once ``min_tokens`` are generated, as vLLM's
    ``check_stop``). ``max_pattern_size`` 0 turns it off; ``min_pattern_size`` 0 means 1.

    Raises:
        ValueError: a size is negative or not an int, ``min_pattern_size > max_pattern_size``, or
            ``min_count < 2`` while ``max_pattern_size > 0``.
    """

    max_pattern_size: int = 0
    min_pattern_size: int = 0
    min_count: int = 0

    def __post_init__(self) -> None:
        for name in ("max_pattern_size", "min_pattern_size", "min_count"):
            setattr(self, name, _number(f"repetition_detection.{name}", getattr(self, name), integer=True))
        if self.max_pattern_size < 0 or self.min_pattern_size < 0 or self.min_pattern_size > self.max_pattern_size:
            raise FieldError("repetition_detection: max_pattern_size and min_pattern_size must be >= 0 with "
                             f"min_pattern_size <= max_pattern_size (both 0 turn it off), got "
                             f"{self.min_pattern_size} and {self.max_pattern_size}.", "repetition_detection")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise FieldError(f"repetition_detection.min_count must be >= 2 with max_pattern_size > 0, "
                             f"got {self.min_count}.", "repetition_detection")

    def detects(self, token_ids: list[int]) -> bool:
        """Whether ``token_ids`` ends in a pattern of an allowed size repeated ``min_count`` times."""
        n = len(token_ids)
        for size in range(max(self.min_pattern_size, 1), self.max_pattern_size + 1):
            if size * self.min_count > n:
                return False
            # Token by token from the end, so a mismatch (the usual case) stops at once.
            if all(token_ids[i] == token_ids[i - size] for i in range(n - 1, n - 1 - size * (self.min_count - 1), -1)):
                return True
        return False


# vLLM's limit on n and best_of (its VLLM_MAX_N_SEQUENCES' default): a request's completions are
# made one cloned child request per max_num_seqs of them before anything runs.
MAX_N_SEQUENCES = 16384


def _check_no_watermark(watermarking: Any) -> None:
    """vLLM 0.32's ``watermarking`` at its no-op values only."""
    if watermarking is not None and _check_bool("watermarking", watermarking):
        raise FieldError("watermarking must be None or False: pagedlm has no watermark to apply.", "watermarking")


class _BestOfFromN(int):
    """A ``best_of`` that was not given, taken from ``n``. A copy of the params
    (``dataclasses.replace``, ``clone``) passes it on to its ``__post_init__``, which takes it from
    the copy's ``n`` again: ``replace(SamplingParams(n=3), n=1)`` runs one completion, not the best
    of 3. An int set in its place (``params.best_of = 4``) was given."""

    __slots__ = ()


@dataclass
class SamplingParams(_FieldsOnly):
    """How to generate the completions of one prompt (vLLM's names and meanings; ``best_of``,
    ``use_beam_search``, ``length_penalty``, ``early_stopping`` and ``logits_processors`` are older
    vLLM's fields, which vLLM 0.32 dropped).

    Args:
        n: completions to return.
        best_of: completions to generate, of which the ``n`` with the highest cumulative
            log-probability are returned (the beam width under beam search). Defaults to ``n``.
        temperature: softmax temperature in [0, 2] (vLLM's range); 0 means greedy decoding, and one
            in (0, 0.01) is raised to 0.01 with a warning, as vLLM does.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``, in
            (0, 1], and every token tied with the least likely of them (Hugging Face and vLLM keep
            some of such ties by their sort's order; pagedlm's choice does not depend on it).
        top_k: keep the ``top_k`` most likely tokens; 0 or -1 turns it off.
        min_p: drop tokens less likely than ``min_p`` times the most likely one, in [0, 1]. Top-k,
            top-p and min-p apply in Hugging Face's warper order (min-p last; vLLM applies it
            first, so there ``top_p`` counts only the mass min-p kept, and may keep fewer tokens).
        presence_penalty: subtracted from the logit of every token already generated, in [-2, 2].
        frequency_penalty: subtracted once per earlier occurrence in the output, in [-2, 2].
        repetition_penalty: Hugging Face's: logits of tokens in the prompt or the output are divided
            by it when positive and multiplied when negative; 1 turns it off; must be > 0.
        seed: random seed. Completion ``i`` of a seeded request samples from its own generator
            seeded with ``seed + i``, so its random draws do not depend on what else is in the
            batch; its tokens do not either where the logits do not (fp32 and bf16 on CPU, README).
            -1 is no seed, as in vLLM.
        max_tokens: most tokens to generate per completion. ``None`` (the default) generates until
            EOS, a stop token or string, or the engine's ``max_model_len``, or the KV cache's room
            for the request's sequences where a small cache (``num_kv_blocks``) holds fewer tokens
            than that (then ``"length"``); nothing is cut at an arbitrary small length.
        min_tokens: EOS ids (with ``ignore_eos`` too, as in vLLM) and ``stop_token_ids`` cannot be
            sampled before this many tokens (except where ``structured_outputs``' grammar can only
            end: the completion ends there).
        stop: strings that end a completion; the text is cut before the stop string unless
            ``include_stop_str_in_output``.
        include_stop_str_in_output: keep the stop string, or the stop token's text, in ``text``.
        stop_token_ids: token ids that end a completion (kept in ``token_ids``; their text, like an
            EOS token's, is left out of ``text`` unless ``include_stop_str_in_output``).
        ignore_eos: keep generating after the end-of-sequence token (a completion whose
            ``structured_outputs`` grammar can only end still ends).
        logprobs: return the top-``logprobs`` log-probabilities of each generated position (plus
            the sampled token's); 0 returns just the sampled token's, -1 every token's (vLLM's).
            Without it (or ``logprob_token_ids``) a completion's ``cumulative_logprob`` is None, as
            in vLLM, unless ``best_of > n`` or beam search ranks by it; a batch of such greedy
            requests then samples without the softmax.
        prompt_logprobs: the same for each prompt position.
        flat_logprobs: return ``logprobs`` and ``prompt_logprobs`` as a ``FlatLogprobs`` (vLLM's):
            six flat lists that read like the list of dicts, a few objects per request instead of
            two per entry (less for the garbage collector to walk across a million outputs).
        logprob_token_ids: instead of the top ones, return the log-probabilities of these ids (at
            most ``MAX_LOGPROB_TOKEN_IDS``, no repeats) at each generated position, plus the
            sampled token's (vLLM's, for scoring label tokens; ``logprobs``, if set too, must
            equal its length). Their ranks are their places in the vocabulary, as the sampled
            token's is (vLLM numbers them 1, 2, ... in the order given).
        skip_special_tokens: leave special tokens out of the output text.
        spaces_between_special_tokens: with ``skip_special_tokens=False``, False drops the space a
            tokenizer's decoder puts between two consecutive special tokens (vLLM's fast
            detokenizer's reading; byte-level BPE decoders put none, so it changes nothing there).
        use_beam_search: beam search of width ``best_of``; needs ``temperature=0``.
        length_penalty: beam search scores finished beams by ``logprob / length ** length_penalty``,
            ``length`` counting the generated tokens only (Hugging Face's ``BeamHypotheses.add``).
        early_stopping: beam search stops as soon as ``best_of`` beams are finished (True), by a
            heuristic (False, the default), or only when no better beam can exist ("never").
        logits_processors: callables ``f(output_token_ids, logits)`` or
            ``f(prompt_token_ids, output_token_ids, logits)`` returning the new logits row. Each
            gets copies of the token id lists and one row ``[vocab_size]`` of float32 logits (under
            beam search, log-probabilities, as Hugging Face's), after ``allowed_token_ids``,
            ``logit_bias`` and the penalties, with a structured-outputs grammar's banned tokens at
            -inf; it must return a float tensor of that shape without NaN, else the step raises a
            ``ValueError`` naming the processor (``apply_logits_processors``).
        logit_bias: ``{token_id: bias}`` added to the logits before sampling (OpenAI's and vLLM's;
            string ids, as OpenAI's JSON gives them, are read as ints; biases as given, as vLLM's
            ``LLM`` adds them, up to ``LOGIT_BIAS_LIMIT`` (1e30) in magnitude: vLLM's OpenAI server
            clamps them to [-100, 100], the range OpenAI takes).
            Kept checked as a read-only ``CheckedDict``, which the params' copies share (assign a
            new dict to change it; changing it in place is a TypeError).
        allowed_token_ids: sampling picks only among these ids (vLLM's); ``None`` allows all. Kept
            as a read-only ``CheckedList``, as ``logit_bias``.
        bad_words: words no completion may generate (vLLM's; ``engine.bad_words`` says how they
            are matched).
        truncate_prompt_tokens: keep only the prompt's last this many tokens (left truncation,
            vLLM's; a text prompt keeps the BOS its tokenizer adds); -1 keeps as many as
            ``max_model_len`` leaves room for (one token to generate). vLLM 0.32 moved it to
            ``LLM.generate``'s ``tokenization_kwargs``, which pagedlm takes too.
        detokenize: produce ``text``; with False only token ids come back.
        structured_outputs: a ``StructuredOutputsParams`` (or a dict of its fields) every
            completion must satisfy: a JSON schema, regex, choice, EBNF grammar or any JSON object.
        output_kind: a ``RequestOutputKind``: what ``LLMEngine.step`` returns for the request while
            it runs. ``DELTA`` needs ``best_of == n`` and no beam search (the completions returned
            are then the ones generated, and their tokens are never replaced).
        repetition_detection: a ``RepetitionDetectionParams`` (or a dict of its fields): end a
            completion stuck repeating a pattern of tokens (vLLM's), with ``"repetition"``.
        extra_args: a dict for one's own code (vLLM's: no sampling implementation reads it); kept
            on the params, ``clone`` copies it.
        skip_clone: vLLM's promise that the object is not shared: ``clone`` (which the engine
            takes of every request's params) then keeps ``extra_args`` itself instead of a deep copy.
        thinking_token_budget: the most tokens a thinking section may hold before the end of the
            reasoning is forced, token by token (vLLM's; needs ``LLM(reasoning_parser=...)`` or
            ``reasoning_config``, ``engine.thinking_budget`` says how it counts); -1 or None: no
            limit. Not with beam search; with ``structured_outputs`` only where the grammar waits
            for the end of the reasoning (``engine.reasoning_gate``).
        skip_reading_prefix_cache: compute the whole prompt even where the prefix cache holds its
            first blocks (the request's blocks still enter the cache). ``None`` (the default) means
            True with ``prompt_logprobs`` (cached tokens have none), else False (vLLM's); False
            with ``prompt_logprobs`` is refused. vLLM sets the field to that value at
            construction; here it stays None and ``reads_prefix_cache`` says which. The same holds
            for ``prompt_logprob_token_ids``.
        prompt_logprob_token_ids: token ids to score at each prompt position (vLLM's, for scoring
            without returning the vocabulary): an integer array ``[num_rows, num_ids]`` or a list of
            lists (shorter rows padded with -1, which scores -inf), row ``i`` scoring its ids as
            prompt token ``prompt_logprob_start + i + 1``; so ``num_rows`` must be
            ``len(prompt) - 1 - prompt_logprob_start``, and ``num_ids`` at most the LLM's
            ``max_logprobs``. Kept as a ``CheckedRows`` (a tuple of equal-length tuples, which copies
            of the params share). The scores come back in
            ``RequestOutput.prompt_token_id_logprobs``.
        prompt_logprob_start: the first prompt position ``prompt_logprob_token_ids`` scores
            (None: 0); only with it.
        trace_decode_token_ids: the completion's tokens, forced one per step instead of sampled
            (vLLM's trace replay, for debugging and reinforcement learning; needs
            ``LLM(enable_trace_replay=True)``). The reported log-probabilities are the model's for
            those tokens, as if sampled; the trace is cut to what ``max_model_len`` leaves after
            the prompt and ``max_tokens`` to its length, and the completion ends where they do (an
            EOS in the trace does not end it: vLLM replays with ``ignore_eos``). Needs ``n=1``; not
            with beam search, ``prompt_logprobs``, ``prompt_logprob_token_ids``,
            ``structured_outputs``, ``repetition_detection``, ``thinking_token_budget`` or
            ``bad_words`` (vLLM's list), nor ``stop``, ``stop_token_ids`` or ``min_tokens`` (which
            vLLM drops from a trace's request).
        stream_interval: ``LLMEngine.step`` returns the running request's output once at least this
            many tokens came since its last one (and always its first and final ones, and one when
            a completion finishes); None or below the LLM's ``stream_interval`` takes the LLM's.
            vLLM's, which spaces out ``DELTA`` outputs only (a ``CUMULATIVE`` request there still
            gets one every step); pagedlm spaces out both.
        routed_experts_prompt_start: 0 only (vLLM's, for the routed experts of mixture-of-experts
            models, which pagedlm does not run).

    Raises:
        ValueError: at construction (and in ``clone``/``dataclasses.replace``), naming the field: a
            value of the wrong type or out of its range above, fields that contradict each other
            (e.g. beam search with sampling, ``DELTA`` with ``best_of > n``).
        TypeError: an unknown field name, as from vLLM's ``SamplingParams``. Its ``watermarking``
            is taken at its no-op values, None and False (pagedlm has no watermark; vLLM too goes
            on without one when none is configured).
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    logits_processors: list[LogitsProcessor] | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    bad_words: list[str] | None = None
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    repetition_detection: RepetitionDetectionParams | None = None
    extra_args: dict[str, Any] | None = None
    skip_clone: bool = False
    flat_logprobs: bool = False
    skip_reading_prefix_cache: bool | None = None
    thinking_token_budget: int | None = None
    watermarking: bool | None = None
    prompt_logprob_token_ids: "np.ndarray | list[list[int]] | tuple[tuple[int, ...], ...] | None" = None
    prompt_logprob_start: int | None = None
    trace_decode_token_ids: list[int] | None = None
    stream_interval: int | None = None
    routed_experts_prompt_start: int = 0

    def __post_init__(self) -> None:
        self.n = _number("n", self.n, integer=True)
        if not 1 <= self.n <= MAX_N_SEQUENCES:
            raise FieldError(f"n must be in [1, {MAX_N_SEQUENCES}] (vLLM's VLLM_MAX_N_SEQUENCES), got {self.n}.", "n")
        if self.best_of is None or type(self.best_of) is _BestOfFromN:  # not given (a copy's: see _BestOfFromN)
            self.best_of = _BestOfFromN(self.n)
        else:
            self.best_of = _number("best_of", self.best_of, integer=True)
            if not self.n <= self.best_of <= MAX_N_SEQUENCES:
                raise FieldError(f"best_of must be >= n and at most {MAX_N_SEQUENCES}, got best_of={self.best_of} and "
                                 f"n={self.n}.", "best_of")
        self.temperature = _number("temperature", self.temperature)
        if not 0 <= self.temperature <= 2:
            raise FieldError(f"temperature must be in [0, 2] (0 means greedy; vLLM's and OpenAI's range), "
                             f"got {self.temperature}.", "temperature")
        if 0 < self.temperature < _MIN_TEMPERATURE:
            logger.warning("temperature %s is less than %s, which is used instead (as vLLM does: logits divided by "
                           "a smaller one can overflow); use 0 for greedy decoding", self.temperature, _MIN_TEMPERATURE)
            self.temperature = _MIN_TEMPERATURE
        self.top_p = _check_range("top_p", self.top_p, 0, 1, lo_open=True)
        self.top_k = _number("top_k", self.top_k, integer=True)
        if self.top_k < -1:
            raise FieldError(f"top_k must be -1 or 0 (off) or a positive int, got {self.top_k}.", "top_k")
        self.top_k = max(self.top_k, 0)
        self.min_p = _check_range("min_p", self.min_p, 0, 1)
        if self.greedy:  # vLLM's: greedy sampling takes the top token whatever these say
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self.presence_penalty = _check_range("presence_penalty", self.presence_penalty, -2, 2)
        self.frequency_penalty = _check_range("frequency_penalty", self.frequency_penalty, -2, 2)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty)
        if not np.float32(self.repetition_penalty) > 0:
            underflow = " (0 in float32, which the sampler computes in)" if self.repetition_penalty > 0 else ""
            raise FieldError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}{underflow}.",
                             "repetition_penalty")
        if self.seed is not None:
            self.seed = _number("seed", self.seed, integer=True)
            if self.seed == -1:  # vLLM's "no seed"
                self.seed = None
        if self.max_tokens is not None:
            self.max_tokens = _number("max_tokens", self.max_tokens, integer=True)
            if self.max_tokens < 1:
                raise FieldError(f"max_tokens must be None or at least 1, got {self.max_tokens}.", "max_tokens")
        self.min_tokens = _number("min_tokens", self.min_tokens, integer=True)
        if self.min_tokens < 0:
            raise FieldError(f"min_tokens must be >= 0, got {self.min_tokens}.", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise FieldError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens}).", "min_tokens")
        self._verify_stop()
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens", "use_beam_search", "detokenize", "skip_clone",
                     "flat_logprobs"):
            setattr(self, name, _check_bool(name, getattr(self, name)))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is True:  # vLLM's: the sampled token's logprob and the top one
                value = 1
            if value is not None:
                value = _number(name, value, integer=True)
                setattr(self, name, value)
                if value < -1:
                    raise FieldError(f"{name} must be None, -1 (the whole vocabulary) or >= 0, got {value}.",
                                     _field_of(name))
        self._verify_logprob_token_ids()
        self._verify_prompt_logprob_token_ids()
        if self.skip_reading_prefix_cache is not None:
            self.skip_reading_prefix_cache = _check_bool("skip_reading_prefix_cache", self.skip_reading_prefix_cache)
            if not self.skip_reading_prefix_cache and self.scores_prompt:
                field = "prompt_logprobs" if self.prompt_logprobs is not None else "prompt_logprob_token_ids"
                raise FieldError(f"skip_reading_prefix_cache=False cannot be set with {field}: prompt tokens read "
                                 "from the prefix cache are not computed, so they would have no logprobs.",
                                 "skip_reading_prefix_cache")
        if self.stream_interval is not None:
            self.stream_interval = _number("stream_interval", self.stream_interval, integer=True)
            if self.stream_interval < 1:
                raise FieldError(f"stream_interval must be None or at least 1, got {self.stream_interval}.",
                                 "stream_interval")
        if _number("routed_experts_prompt_start", self.routed_experts_prompt_start, integer=True) != 0:
            raise FieldError(f"routed_experts_prompt_start must be 0, got {self.routed_experts_prompt_start!r}: it "
                             "skips prompt tokens of the routed experts that LLM(enable_return_routed_experts=True) "
                             "returns, and pagedlm runs no mixture-of-experts models.", "routed_experts_prompt_start")
        if self.thinking_token_budget is not None:
            budget = self.thinking_token_budget = _number("thinking_token_budget", self.thinking_token_budget,
                                                          integer=True)
            if budget < -1:
                raise FieldError(f"thinking_token_budget must be None, -1 (no limit) or >= 0, got {budget}.",
                                 "thinking_token_budget")
            if budget == -1:  # vLLM's "no limit"
                self.thinking_token_budget = None
        self.length_penalty = _number("length_penalty", self.length_penalty)
        if self.early_stopping != "never":
            try:
                self.early_stopping = _check_bool("early_stopping", self.early_stopping)
            except ValueError:
                raise FieldError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}.",
                                 "early_stopping") from None
        self._verify_logits_processors()
        self._verify_logit_bias()
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise FieldError(f"allowed_token_ids must be None or a non-empty list of token ids, "
                             f"got {self.allowed_token_ids!r}.", "allowed_token_ids")
        if self.allowed_token_ids is not None and type(self.allowed_token_ids) is not CheckedList:
            self.allowed_token_ids = CheckedList(_token_ids("allowed_token_ids", self.allowed_token_ids))
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
                raise FieldError(f"bad_words must be None or a list of non-blank strings, got {self.bad_words!r}.",
                                 "bad_words")
            # the engine tokenizes them as the request is added
            _check_unicode("bad_words", self.bad_words, "bad_words must be text the tokenizer can encode")
            self.bad_words = list(dict.fromkeys(self.bad_words))  # vLLM's: each once
        self.truncate_prompt_tokens = check_truncate_prompt_tokens(self.truncate_prompt_tokens)
        self.structured_outputs = _dataclass_field("structured_outputs", self.structured_outputs,
                                                   StructuredOutputsParams)
        if self.thinking_token_budget is not None and self.use_beam_search:
            raise FieldError("thinking_token_budget is not supported with use_beam_search.", "thinking_token_budget")
        self.repetition_detection = _dataclass_field("repetition_detection", self.repetition_detection,
                                                     RepetitionDetectionParams)
        _check_no_watermark(self.watermarking)
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise FieldError(f"extra_args must be None or a dict, got {type(self.extra_args).__name__}.", "extra_args")
        if self.use_beam_search:
            self._verify_beam_search()
        else:
            if self.length_penalty != 1.0 or self.early_stopping is not False:
                raise FieldError("length_penalty and early_stopping apply only with use_beam_search=True.",
                                 "length_penalty")
            if self.greedy and self.best_of > 1:
                raise FieldError(f"{self.best_of_field} must be 1 with greedy sampling (temperature=0), "
                                 f"got {self.best_of}.", self.best_of_field)
        self._verify_output_kind()
        self._verify_trace_decode_token_ids()

    def clone(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes`` applied, every field checked and normalised again as the
        constructor does: a field assigned after construction (``params.temperature = -1``,
        ``params.structured_outputs.regex = None``) is checked here too. A ``best_of`` that was
        never given, at construction or after it, follows ``n`` (``params.n = 3`` on
        ``SamplingParams(temperature=0.8)`` gives best_of 3, and ``params.n = 1`` after it best_of
        1, as ``SamplingParams(n=1)`` has); otherwise ``best_of`` stays as it is. Lists (but the
        read-only ``logit_bias`` and ``allowed_token_ids`` once checked, which copies share) and the
        structured-outputs and repetition-detection params are copied, and ``extra_args`` deeply
        unless ``skip_clone`` (vLLM's ``clone``); the logits processors themselves are shared.
        ``LLMEngine.add_request`` keeps such a copy of each request's params (as vLLM's input
        processor does), so later changes to the caller's object do not reach a queued request.

        Raises:
            ValueError: a field is invalid; the message names it and what it allows.
        """
        for name in ("structured_outputs", "repetition_detection"):
            if dataclasses.is_dataclass(getattr(self, name)):
                changes.setdefault(name, replace(getattr(self, name)))
        if isinstance(self.extra_args, dict) and not self.skip_clone:
            changes.setdefault("extra_args", copy.deepcopy(self.extra_args))
        return replace(self, **changes)

    def _verify_logprob_token_ids(self) -> None:
        ids = self.logprob_token_ids
        if ids is None:
            return
        ids = self.logprob_token_ids = _token_ids("logprob_token_ids", ids)
        if not 0 < len(ids) <= MAX_LOGPROB_TOKEN_IDS or len(set(ids)) < len(ids):
            raise FieldError(f"logprob_token_ids must be None or 1 to {MAX_LOGPROB_TOKEN_IDS} distinct token ids, "
                             f"got {len(ids)} ({len(set(ids))} distinct).", "logprob_token_ids")
        if self.logprobs is not None and self.logprobs != len(ids):
            raise FieldError(f"logprobs must equal len(logprob_token_ids) when both are set (vLLM's rule), got "
                             f"logprobs={self.logprobs} and {len(ids)} ids.", "logprobs")

    def _verify_prompt_logprob_token_ids(self) -> None:
        rows = self.prompt_logprob_token_ids
        if rows is None:
            if self.prompt_logprob_start is not None:
                raise FieldError("prompt_logprob_start needs prompt_logprob_token_ids.", "prompt_logprob_start")
            return
        if type(rows) is not CheckedRows:
            self.prompt_logprob_token_ids = _checked_rows(rows)
        start = self.prompt_logprob_start
        if start is not None:
            start = self.prompt_logprob_start = _number("prompt_logprob_start", start, integer=True)
            if start < 0:
                raise FieldError(f"prompt_logprob_start must be None or >= 0, got {start}.", "prompt_logprob_start")

    def _verify_trace_decode_token_ids(self) -> None:
        if self.trace_decode_token_ids is None:
            return
        ids = self.trace_decode_token_ids = _token_ids("trace_decode_token_ids", self.trace_decode_token_ids)
        if not ids:
            raise FieldError("trace_decode_token_ids must be None or a non-empty list of token ids.",
                             "trace_decode_token_ids")
        if self.best_of != 1:
            raise FieldError(f"trace_decode_token_ids needs n=1 (one completion replays the trace), got "
                             f"{self.best_of_field}={self.best_of}.", "trace_decode_token_ids")
        # vLLM's list: what would change or check the tokens the trace forces.
        for name in ("use_beam_search", "prompt_logprobs", "prompt_logprob_token_ids", "structured_outputs",
                     "repetition_detection", "thinking_token_budget", "bad_words"):
            value = getattr(self, name)
            if value is not None and value is not False and value != []:
                raise FieldError(f"trace_decode_token_ids is not supported with {name}.", "trace_decode_token_ids")
        # vLLM drops these from a trace's request: the trace replays to its end.
        for name in ("stop", "stop_token_ids", "min_tokens"):
            if getattr(self, name):
                raise FieldError(f"trace_decode_token_ids replays the whole trace, so {name} would change "
                                 f"nothing (vLLM drops it); leave it out.", "trace_decode_token_ids")

    @property
    def scores_prompt(self) -> bool:
        """Whether the request returns log-probabilities of prompt positions (``prompt_logprobs``
        or ``prompt_logprob_token_ids``), which prompt tokens read from the prefix cache lack."""
        return self.prompt_logprobs is not None or self.prompt_logprob_token_ids is not None

    @property
    def num_logprobs(self) -> int | None:
        """How many log-probabilities each generated position returns besides the sampled
        token's (``logprobs``, else the number of ``logprob_token_ids``); None for none (vLLM's)."""
        if self.logprobs is not None:
            return self.logprobs
        return len(self.logprob_token_ids) if self.logprob_token_ids else None

    @property
    def reports_cumulative_logprob(self) -> bool:
        """Whether completions report ``cumulative_logprob`` (and the sampler computes the sampled
        tokens' log-probabilities): with ``logprobs`` or ``logprob_token_ids`` (vLLM's rule), and
        where the completions are ranked by it (``best_of > n``, beam search)."""
        return self.num_logprobs is not None or self.best_of > self.n or self.use_beam_search

    @property
    def reads_prefix_cache(self) -> bool:
        """Whether the request may take its first blocks from the prefix cache
        (``skip_reading_prefix_cache``)."""
        if self.skip_reading_prefix_cache is None:
            return not self.scores_prompt
        return not self.skip_reading_prefix_cache

    def _verify_output_kind(self) -> None:
        if not isinstance(self.output_kind, RequestOutputKind):
            allowed = ", ".join(f"RequestOutputKind.{k.name}" for k in RequestOutputKind)
            raise FieldError(f"output_kind must be one of {allowed}, got {self.output_kind!r}.", "output_kind")
        if self.output_kind is RequestOutputKind.DELTA:
            if self.use_beam_search:
                raise FieldError("output_kind=DELTA is not supported with use_beam_search (beams are replaced).",
                                 "output_kind")
            if self.best_of != self.n:
                raise FieldError(f"output_kind=DELTA needs best_of == n (the n best are known only at the end), "
                                 f"got best_of={self.best_of} and n={self.n}.", "output_kind")

    def _verify_stop(self) -> None:
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise FieldError(f"stop must be a non-empty string or a list of them, got {self.stop!r}.", "stop")
        # the output's text is valid Unicode: a stop string that is not could never be found
        _check_unicode("stop", stop, "stop strings must be valid Unicode")
        self.stop = list(stop)
        self.stop_token_ids = _token_ids("stop_token_ids", [] if self.stop_token_ids is None else self.stop_token_ids)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))  # vLLM's: each once
        if self.stop and not self.detokenize:
            raise FieldError("stop strings need detokenize=True.", "stop")

    def _verify_logits_processors(self) -> None:
        processors = self.logits_processors or []
        if not isinstance(processors, (list, tuple)) or not all(callable(p) for p in processors):
            raise FieldError(f"logits_processors must be a list of callables, got {self.logits_processors!r}.",
                             "logits_processors")
        self._processor_takes_prompt = []
        for p in processors:
            num_args = len(inspect.signature(p).parameters)
            if num_args not in (2, 3):
                raise FieldError(
                    "logits_processors take (output_token_ids, logits) or "
                    f"(prompt_token_ids, output_token_ids, logits); {p!r} takes {num_args} arguments.",
                    "logits_processors")
            self._processor_takes_prompt.append(num_args == 3)
        self.logits_processors = list(processors)

    def _verify_logit_bias(self) -> None:
        if self.logit_bias is None or type(self.logit_bias) is CheckedDict:
            return
        if not isinstance(self.logit_bias, dict):
            raise FieldError(f"logit_bias must be None or a dict of token id -> bias, got {type(self.logit_bias).__name__}.",
                             "logit_bias")
        bias = {}
        for token, value in self.logit_bias.items():
            # OpenAI's JSON gives the ids as strings.
            token = _number("logit_bias keys (token ids)",
                            int(token) if isinstance(token, str) and token.isdecimal() else token, integer=True)
            if token < 0:
                raise FieldError(f"logit_bias keys must be non-negative token ids, got {token}.", "logit_bias")
            bias[token] = _number("logit_bias values (biases)", value)
            if abs(bias[token]) > LOGIT_BIAS_LIMIT:
                raise FieldError(f"logit_bias values must be within +-{LOGIT_BIAS_LIMIT:g}, got {value} for token "
                                 f"{token}: a larger one overflows float32 once divided by the temperature (every "
                                 "probability NaN).", "logit_bias")
        self.logit_bias = CheckedDict(bias)

    def apply_logits_processors(self, prompt_token_ids: list[int], output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Run the processors in order on one row of logits ``[vocab]``. Each gets copies of the
        token lists (what it does to them changes nothing) and must return a float tensor of the
        row's shape without NaN (-inf removes a token; a NaN has no probability the sampler could
        draw by); anything else is a ValueError naming the processor."""
        for fn, takes_prompt in zip(self.logits_processors, self._processor_takes_prompt):
            outputs = list(output_token_ids)
            new = fn(list(prompt_token_ids), outputs, logits) if takes_prompt else fn(outputs, logits)
            if not isinstance(new, torch.Tensor) or new.shape != logits.shape or not new.is_floating_point():
                got = f"{new.dtype} tensor of shape {list(new.shape)}" if isinstance(new, torch.Tensor) else type(new).__name__
                raise FieldError(f"logits processor {fn!r} must return a float tensor of shape {list(logits.shape)} "
                                 f"(the logits row it was given), got {got}.", "logits_processors")
            nan = new.isnan().nonzero()[:, 0]
            if len(nan):
                raise FieldError(f"logits processor {fn!r} returned NaN for token id(s) {nan[:5].tolist()} "
                                 f"({len(nan)} in all); a logit must be a number (-inf removes the token).",
                                 "logits_processors")
            logits = new
        return logits

    def _verify_beam_search(self) -> None:
        if self.best_of < 2:
            raise FieldError(f"use_beam_search needs a beam width above 1: n or best_of > 1 (got "
                             f"{self.best_of_field}={self.best_of}).", "use_beam_search")
        if not self.greedy:
            raise FieldError("temperature must be 0 with use_beam_search.", "temperature")
        if self.logprob_token_ids is not None:
            raise FieldError("logprob_token_ids is not supported with use_beam_search.", "logprob_token_ids")
        if self.repetition_detection is not None:
            raise FieldError("repetition_detection is not supported with use_beam_search.", "repetition_detection")
        if self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0:
            raise FieldError("top_p, top_k and min_p must be off with use_beam_search.", "top_p")
        if self.seed is not None:
            raise FieldError("seed has no meaning with use_beam_search (it is deterministic).", "seed")

    @property
    def output_text_buffer_length(self) -> int:
        """Characters of an unfinished completion's text held back from its outputs: a stop
        string that is cut from the text may have begun in them."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    @property
    def best_of_field(self) -> str:
        """The field ``best_of`` came from, for messages: "n" when ``best_of`` was not given."""
        return "n" if type(self.best_of) is _BestOfFromN else "best_of"

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def changes_logits(self) -> bool:
        """Whether sampling sees logits other than the model's (vLLM applies these before
        penalties): ``allowed_token_ids`` or ``logit_bias``."""
        return self.allowed_token_ids is not None or bool(self.logit_bias)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0


@dataclass
class BeamSearchParams:
    """The parameters of ``LLM.beam_search`` (vLLM's ``BeamSearchParams``).

    The search keeps the ``beam_width`` most likely continuations for up to ``max_tokens`` tokens,
    with Hugging Face's semantics (``generate(num_beams=beam_width, do_sample=False)``,
    ``early_stopping=False``; ``beam_width=1`` is greedy decoding). A finished beam scores
    ``cum_logprob / generated_tokens ** length_penalty``, as in HF; vLLM's own search counts the
    prompt's tokens in that length too. ``ignore_eos`` keeps beams going past EOS;
    ``skip_special_tokens`` applies to the returned text. ``structured_outputs`` (a
    ``StructuredOutputsParams`` or a dict of its fields) holds every beam to its grammar: beams rank
    by the model's log-probabilities of the tokens the grammar allows (vLLM's offline search
    filters them so), which are also what ``cum_logprob`` and ``logprobs`` report (a sampled
    request under a grammar reports them renormalised over what the grammar allows, as vLLM's
    does), and a search returns fewer than ``beam_width`` sequences where the grammar allows fewer.
    vLLM's ``include_stop_str_in_output`` and ``watermarking``, which its offline search does not
    apply, are taken at their no-op values only (False, and None or False: pagedlm has no
    watermark).

    Raises:
        ValueError: a field has the wrong type or is out of range (the message names it);
            ``temperature`` other than 0 (the search is deterministic here); one of vLLM's two
            fields above set.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    skip_special_tokens: bool = True
    watermarking: bool | None = None

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = _number(name, getattr(self, name), integer=True)
            if value < 1:
                raise FieldError(f"{name} must be at least 1, got {value}.", _field_of(name))
            setattr(self, name, value)
        if _number("temperature", self.temperature) != 0:
            raise FieldError(f"temperature must be 0.0 (pagedlm's beam search is deterministic), got {self.temperature}.",
                             "temperature")
        self.length_penalty = _number("length_penalty", self.length_penalty)
        self.ignore_eos = _check_bool("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _check_bool("skip_special_tokens", self.skip_special_tokens)
        if _check_bool("include_stop_str_in_output", self.include_stop_str_in_output):
            raise FieldError("include_stop_str_in_output must be False: beam search runs without stop strings "
                             "(as vLLM's offline search, which ignores it).", "include_stop_str_in_output")
        self.structured_outputs = _dataclass_field("structured_outputs", self.structured_outputs,
                                                   StructuredOutputsParams)
        _check_no_watermark(self.watermarking)

    def sampling_params(self, vocab_size: int) -> SamplingParams:
        """What the engine runs: ``beam_width`` beams, each token with the log-probabilities of the
        ``2 * beam_width`` most likely ones (vLLM's beam search returns those), no detokenization."""
        beams = dict(n=self.beam_width, use_beam_search=True, length_penalty=self.length_penalty) if self.beam_width > 1 else {}
        return SamplingParams(temperature=0.0, max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                              logprobs=min(2 * self.beam_width, vocab_size), detokenize=False,
                              output_kind=RequestOutputKind.FINAL_ONLY, structured_outputs=self.structured_outputs,
                              **beams)
