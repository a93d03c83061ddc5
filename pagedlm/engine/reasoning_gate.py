"""Structured outputs after the reasoning: with a reasoning parser (``LLM(reasoning_parser=...)``),
a request's grammar holds only from the token after its reasoning ends, as vLLM 0.32's
structured-outputs manager gates it (``vllm/v1/structured_output/__init__.py``,
``_get_constraint_bounds`` and ``accept_tokens``).

Reasoning has ended in the prompt where the parser's ``is_reasoning_end`` says so of the prompt's
tokens; then the grammar holds from the first token. Otherwise the output's tokens are free (no
bitmask, nothing fed to the grammar) until the parser sees the end: the end token itself is free
too, and the grammar holds from the next token on, for good (a later start token reopens
nothing). qwen3's ``<tool_call>`` also ends reasoning, and is fed to the grammar. A completion
whose reasoning never ends is not constrained at all. Each parser's rules, read from vLLM's
source (``vllm/reasoning/``, ``vllm/parser/``):

* deepseek_r1, ernie45: the prompt ended reasoning if its last ``<think>`` or ``</think>`` is
  ``</think>``; in the output, ``</think>`` ends it.
* qwen3: the same, but only after the prompt's last ``<|im_start|>`` or ``<|im_end|>`` (an earlier
  turn's reasoning does not count), and ``<tool_call>`` ends it as ``</think>`` does.
* cohere_command3: over the prompt and the output so far, at every token: ended if the last
  ``<|START_THINKING|>`` or ``<|CHATBOT_TOKEN|>`` is a ``<|START_THINKING|>`` with an
  ``<|END_THINKING|>`` after it, or where neither occurs, if any ``<|END_THINKING|>`` does.
* minimax_m3: as deepseek_r1, with ``<mm:think>`` and ``</mm:think>``. (vLLM 0.32's gate also
  ends it at the first token of an output whose prompt has no ``<mm:think>``, or has a
  ``</mm:think>`` before its last one, a side effect of its streaming check; pagedlm does not.)

Every parser needs its markers as single tokens of the tokenizer, as vLLM's do (cohere_command3's
would take the unknown token's id there).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

FREE, END, END_FED = 0, 1, 2  # what a token is to the gate: reasoning; the end (not fed); the end, fed


@dataclass(frozen=True, slots=True)
class ReasoningParser:
    """A vLLM reasoning parser's markers as token ids."""

    name: str
    start: int
    end: int
    implicit_end: int | None = None  # qwen3's <tool_call>
    boundaries: frozenset[int] = frozenset()  # qwen3's turn markers; cohere_command3's chatbot token
    texts: tuple[str, str, str | None] = ("", "", None)  # start, end and implicit end as text

    @classmethod
    def of(cls, name: str, tokenizer: PreTrainedTokenizerBase) -> "ReasoningParser":
        """Raises ValueError for a parser pagedlm does not know, or markers that are not single
        tokens of the tokenizer (vLLM's parsers refuse such a tokenizer too)."""
        spec = _PARSERS.get(name)
        if spec is None:
            raise ValueError(f"reasoning_parser {name!r} has no structured-outputs rules in pagedlm; "
                             f"known: {', '.join(_PARSERS)}")
        start, end, implicit, boundaries = spec
        vocab = tokenizer.get_vocab()
        missing = [text for text in (start, end) if text not in vocab]
        if missing:
            raise ValueError(f"reasoning_parser {name!r} needs {' and '.join(map(repr, missing))} as single tokens "
                             "of the tokenizer, which has none")
        return cls(name, vocab[start], vocab[end], vocab.get(implicit) if implicit else None,
                   frozenset(vocab[t] for t in boundaries if t in vocab), (start, end, implicit))

    def gate(self, prompt_token_ids: list[int]) -> "ReasoningGate | None":
        """A sequence's gate after its prompt, or None where the prompt ended reasoning."""
        gate = ReasoningGate(self)
        for token_id in prompt_token_ids:
            gate.scan(token_id)
        return None if gate.ended_by_markers() else gate

    def split(self, prompt_token_ids: list[int], output_token_ids: list[int], text: str,
              text_before: Callable[[int], str]) -> "ReasoningSplit":
        """A completion's ``text`` as its reasoning and content, split at the token where this gate
        ends the reasoning, so that the content is what a constraint held: (None, text) where the
        prompt ended it; (text, None) where the output never does, or where the text stops at or
        before the end (a stop string, or a stop token left out of it); else the text before the
        end marker (less its start markers) and after it (qwen3's ``<tool_call>`` stays in the
        content). ``text_before(k)`` is the text the output's first ``k`` tokens made (the
        detokenizer's), so markers left out of the text (special tokens, with
        ``skip_special_tokens``) or spelled by other tokens split nothing wrong (found by a hunt:
        the text was searched for the marker). An empty part is None. ``num_tokens`` counts the
        output tokens before the end, less start markers (OpenAI's ``usage.
        completion_tokens_details.reasoning_tokens``, as vLLM's server writes it). vLLM's chat
        server splits by text alone and may differ: it ignores the prompt, and deepseek_r1's drops
        text before ``<think>`` (docs/jobs.md)."""
        gate = self.gate(prompt_token_ids)
        if gate is None:
            return ReasoningSplit(None, text, 0)
        at_token, kind = next(((i, kind) for i, kind in enumerate(map(gate.take, output_token_ids)) if kind != FREE),
                              (len(output_token_ids), FREE))
        num_tokens = sum(t != self.start for t in output_token_ids[:at_token])
        start, end, _ = self.texts
        if kind == FREE:
            return ReasoningSplit(text.replace(start, "") or None, None, num_tokens)
        # The content begins after the end marker, or at qwen3's <tool_call>, which it keeps.
        cut = text_before(at_token + 1) if kind == END else text_before(at_token)
        if not text.startswith(cut):
            return ReasoningSplit(text.replace(start, "") or None, None, num_tokens)
        reasoning = cut.removesuffix(end) if kind == END else cut
        return ReasoningSplit(reasoning.replace(start, "") or None, text[len(cut):] or None, num_tokens)


class ReasoningSplit(NamedTuple):
    """A completion's text as ``ReasoningParser.split`` parts it, and its reasoning's token count."""

    reasoning: str | None
    content: str | None
    num_tokens: int


class ReasoningGate:
    """Where one sequence stands in the markers of its tokens so far (prompt and output)."""

    __slots__ = ("parser", "last", "end_since_last", "any_end")

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.last: str | None = None  # the last marker's kind: "start", "end" or "boundary" (cohere: not "end")
        self.end_since_last = False  # an end marker after the last start or boundary
        self.any_end = False

    def scan(self, token_id: int) -> None:
        p = self.parser
        if token_id == p.end or token_id == p.implicit_end:
            if p.name != "cohere_command3":  # whose rule looks back to the last start or boundary
                self.last = "end"
            self.end_since_last = self.any_end = True
        elif token_id == p.start:
            self.last, self.end_since_last = "start", False
        elif token_id in p.boundaries:
            self.last, self.end_since_last = "boundary", False

    def ended_by_markers(self) -> bool:
        """vLLM's ``is_reasoning_end`` of the tokens scanned so far."""
        if self.parser.name == "cohere_command3":
            return self.end_since_last if self.last == "start" else self.last is None and self.any_end
        return self.last == "end"

    def take(self, token_id: int) -> int:
        """The next output token: FREE while reasoning goes on, else END or END_FED."""
        self.scan(token_id)
        if self.parser.name == "cohere_command3":
            return END if self.ended_by_markers() else FREE
        if token_id == self.parser.implicit_end:
            return END_FED
        return END if token_id == self.parser.end else FREE


# name -> (start, end, implicit end, boundaries), from vLLM 0.32's parsers.
_PARSERS = {
    "qwen3": ("<think>", "</think>", "<tool_call>", ("<|im_start|>", "<|im_end|>")),
    "deepseek_r1": ("<think>", "</think>", None, ()),
    "ernie45": ("<think>", "</think>", None, ()),
    "cohere_command3": ("<|START_THINKING|>", "<|END_THINKING|>", None, ("<|CHATBOT_TOKEN|>",)),
    "minimax_m3": ("<mm:think>", "</mm:think>", None, ()),
}
