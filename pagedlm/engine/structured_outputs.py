"""Structured outputs through xgrammar: compiled grammars, one matcher per sequence, token bitmasks.

xgrammar (https://github.com/mlc-ai/xgrammar) compiles a JSON schema, regex or EBNF grammar against
the tokenizer's vocabulary once; a ``GrammarMatcher`` then follows one sequence's tokens and fills
its row of a token bitmask (bit ``t % 32`` of word ``t // 32`` set = token ``t`` may come next; stop
tokens only where the output may end). The worker applies the row to the logits before sampling.
"""

import json
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pagedlm.sampling_params import StructuredOutputsParams
from pagedlm.step import unpack_token_bitmask

logger = logging.getLogger("pagedlm")


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:
        raise ValueError(f"structured_outputs needs xgrammar: pip install 'pagedlm[structured]' ({exc})") from None
    return xgrammar


class StructuredOutputManager:
    """Compiles each distinct constraint once (cached by ``StructuredOutputsParams.key``) and makes
    matchers and bitmask rows from it.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: the model's vocabulary (lm_head rows); rows past the tokenizer's stay masked.
        stop_token_ids: the tokens that end a sequence (EOS and the generation config's).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._compiled: dict[tuple[str, str], Future] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedlm-grammar")
        self.bitmask_width = (vocab_size + 31) // 32
        self.compile_seconds = 0.0

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
        if future is None:
            future = self._compiled[params.key] = self._executor.submit(self._compile, params)
        return future

    def _compile(self, params: StructuredOutputsParams) -> Any:
        start = time.perf_counter()
        kind, spec, any_whitespace = params.key
        try:
            if kind == "json":
                schema = json.loads(params.json) if isinstance(params.json, str) else params.json
                unsupported = sorted(_unsupported_keywords(schema))
                if unsupported:
                    raise ValueError(f"keyword(s) {', '.join(unsupported)} cannot be enforced (xgrammar does not "
                                     "support them)")
                # The schema as written: its properties come out in their order (the key sorts them).
                compiled = self._compiler.compile_json_schema(json.dumps(schema, ensure_ascii=False),
                                                              any_whitespace=any_whitespace)
            elif kind == "regex":
                compiled = self._compiler.compile_regex(spec)
            elif kind == "choice":
                compiled = self._compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice))
            elif kind == "grammar":
                compiled = self._compiler.compile_grammar(spec)
            else:  # a JSON object, as OpenAI's json_object promises (the builtin grammar allows arrays too)
                compiled = self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
        except Exception as exc:  # xgrammar raises RuntimeError / its own errors for bad input
            raise ValueError(f"structured_outputs.{kind} does not compile: {_xgrammar_message(exc)}") from None
        self.compile_seconds += time.perf_counter() - start
        return compiled

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def new_matcher(self, params: StructuredOutputsParams) -> Any:
        return self._xgr.GrammarMatcher(self.compile(params))

    @staticmethod
    def allows_other_than(bitmask: torch.Tensor, token_ids: Sequence[int]) -> bool:
        """Whether the row allows some token outside ``token_ids``."""
        allowed = unpack_token_bitmask(bitmask[None], bitmask.shape[0] * 32)[0]
        allowed[[t for t in set(token_ids) if t < allowed.shape[0]]] = False
        return bool(allowed.any())

    def bitmask(self, matcher: Any) -> torch.Tensor:
        """The matcher's allowed next tokens: an int32 row of ``bitmask_width`` words."""
        row = torch.empty((1, self.bitmask_width), dtype=torch.int32)
        matcher.fill_next_token_bitmask(row, 0)  # writes every word
        return row[0]


# JSON Schema keywords xgrammar compiles but does not enforce (vLLM refuses them for xgrammar too).
_UNSUPPORTED = frozenset({
    "multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "allOf", "not", "if", "then", "else",
    "dependentRequired", "dependentSchemas", "patternProperties", "propertyNames", "unevaluatedProperties",
    "unevaluatedItems", "minProperties", "maxProperties",
})


def _unsupported_keywords(schema: Any) -> set[str]:
    """The unsupported keywords used anywhere in ``schema`` (property names are not keywords)."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in _UNSUPPORTED and not (key == "uniqueItems" and value is False):
                found.add(key)
            if key in ("properties", "$defs", "definitions"):
                for sub in (value.values() if isinstance(value, dict) else ()):
                    found |= _unsupported_keywords(sub)
            elif key not in ("enum", "const", "default", "examples", "required"):
                found |= _unsupported_keywords(value)
    elif isinstance(schema, list):
        for item in schema:
            found |= _unsupported_keywords(item)
    return found


def _xgrammar_message(exc: Exception) -> str:
    """xgrammar's error without the log prefix of its C++ check (``[09:08:23] /project/cpp/x.cc:5082: ``)."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip())
